"""The JAX backend's norms on CPU: several sums of squares in one
multi-output reduction.

XLA:CPU (jaxlib 0.10) hands every reduction written with `sum` to YNNPACK,
which runs it on one thread and evaluates the elementwise math fused into it
slowly. A reduction of two or more operands (`jax.lax.reduce` with a tuple)
is not YNNPACK's: XLA emits it as one loop over its output, the math fused
in, split over the cores. Measured on a 2-vCPU AMD EPYC, on the shape of
BERT's word embedding (23 M values): `sum(w**2)` and `sum(u**2)`, LAMB's
update `u` formed from w, m and v inside it, 15.2 ms; both in one reduction
over rows of 16 values 8.8 ms (rows of 32: 28.0 ms), the partial sums (one
sixteenth of the tensor each) then summed by `sum`. See
results/jax_cpu/norm_forms.py and docs/performance.md. Imported only when
Keras runs on JAX.
"""

import math

import jax
from keras import ops

# Values per partial sum: the largest that XLA:CPU reduced at full speed
# (rows of 32 were 3x slower).
ROW = 16


def sums_of_squares(tensors):
    """`sum(x**2)` of each tensor in `tensors` (of one shape and float
    dtype), reading each once, in one multi-output reduction.

    Returns a tuple of scalars. A single tensor, or one whose size no row
    length of 16, 8, 4 or 2 divides, is summed with `sum`.
    """
    size = math.prod(tensors[0].shape)
    row = next((r for r in (ROW, 8, 4, 2) if size % r == 0), None)
    if len(tensors) < 2 or row is None:
        return tuple(ops.sum(ops.square(x)) for x in tensors)
    squares = tuple(ops.reshape(ops.square(x), (-1, row)) for x in tensors)
    zeros = tuple(ops.zeros((), x.dtype) for x in squares)
    partial_sums = jax.lax.reduce(squares, zeros, _add, (1,))
    return tuple(ops.sum(p) for p in partial_sums)


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))
