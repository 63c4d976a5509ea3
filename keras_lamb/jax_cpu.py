"""The JAX backend on CPU: the norms in one multi-output reduction, and a way
to step the variables one after another. Imported only when Keras runs on
JAX.

Norms. XLA:CPU (jaxlib 0.10) hands every reduction written with `sum` to
YNNPACK, which runs it on one thread and evaluates the elementwise math fused
into it slowly. A reduction of two or more operands (`jax.lax.reduce` with a
tuple) is not YNNPACK's: XLA emits it as one loop over its output, the math
fused in, split over the cores. Measured on a 2-vCPU AMD EPYC, on the shape
of BERT's word embedding (23 M values): `sum(w**2)` and `sum(u**2)`, LAMB's
update `u` formed from w, m and v inside it, 15.2 ms; both in one reduction
over rows of 16 values 8.8 ms (rows of 32: 28.0 ms), the partial sums (one
sixteenth of the tensor each) then summed by `sum`. See
results/jax_cpu/norm_forms.py.

Order (`after`, used only when `_step_in_order` is set, off by default).
XLA:CPU runs a program's kernels as their buffers allow, not in the order the
step is written: all the variables' moment updates, then all their norms,
then all the weight updates, so each pass reads every tensor from memory
again. Made to wait for the previous variable's new weights, each variable's
passes run back to back and the later ones find its tensors in the cache: in
plain JAX, LAMB's time over Adam's, 96 tensors of 768 x 768 1.46x -> 1.18x,
24 of 768 x 3072 1.42x -> 1.34x (results/jax_cpu/step_order.py). Inside a
training step the same waits keep every gradient alive until the optimizer
reaches it, and the step got slower (results/jax_cpu/fit_order.py,
docs/performance.md).
"""

import math

import jax
import jax.numpy as jnp
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


def after(x, previous):
    """`x`, bit for bit, computed only once `previous` is.

    The value of `x` is selected by a predicate formed from one element of
    `previous` that is false for every bit pattern (the exponent bits of a
    float32 masked, compared with a value outside the mask), which XLA does
    not fold: so every kernel that reads the result waits for `previous`.
    `x` and `previous` are arrays of float dtype; an empty `previous` adds
    no dependency.
    """
    if math.prod(previous.shape) == 0:
        return x
    element = previous[(0,) * previous.ndim].astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(element, jnp.int32)
    never = (bits & 0x7F800000) == 0x7F800001
    return jax.lax.select(
        jnp.broadcast_to(never, x.shape), jnp.zeros_like(x), x)
