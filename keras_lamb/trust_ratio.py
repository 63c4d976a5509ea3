"""The pieces LAMB and LARS share: norms, the safe trust ratio, exclusions.

Both optimizers scale each variable's step by a ratio of norms (You et al.
2017, 2019). This module holds the numerics of that ratio and the rules that
decide which variables take part in weight decay and in layer adaptation, so
that the two optimizers cannot drift apart.
"""

import math
import numbers
import re

import keras
import numpy as np
from keras import ops

__all__ = [
    "ExclusionRule",
    "compute_dtype",
    "l2_norm",
    "safe_trust_ratio",
    "sum_of_squares",
    "sums_of_squares",
    "variable_path",
]

SUM_OF_SQUARES_METHODS = ("reduce", "matvec", "rows", "multi_output")
# Below this many values a tensor's norm is not worth a matrix-vector product.
_MATVEC_MIN_SIZE = 4096


def compute_dtype(dtype):
    """The dtype a variable's step is computed in: float32 for float16,
    bfloat16 and float32 variables, float64 for float64 ones."""
    if keras.backend.standardize_dtype(dtype) == "float64":
        return "float64"
    return "float32"


def l2_norm(x):
    """Euclidean norm of all entries of `x`, in `compute_dtype(x.dtype)`."""
    x = ops.cast(x, compute_dtype(x.dtype))
    return ops.sqrt(ops.sum(ops.square(x)))


def sum_of_squares(x, method="reduce"):
    """`sum(x**2)` over all entries of the float32 (or float64) tensor `x`.

    Args:
        x: a float32 or float64 tensor of static shape.
        method: how the sum is formed; both agree up to float32 summation
            order.
            - `"reduce"`: `sum(square(x))`, one fused reduction (fastest
              where the compiler emits fast reductions: JAX's XLA on CPU,
              XLA on GPU and TPU).
            - `"matvec"`: the squares viewed as rows, multiplied by a vector
              of ones, then the rows summed. TensorFlow's XLA:CPU emits a
              reduction to a scalar as one serial loop but a matrix-vector
              product as a vectorised kernel: 4.6x faster on 23 M values
              (`benchmarks/norm_methods.py`).
            - `"rows"`: the squares viewed as rows, each row summed, then
              the row sums: a two-stage reduction written out, which GPU
              compilers emit as a row reduction fused with the squaring.
            - `"multi_output"`: a method of `sums_of_squares` (several
              tensors); for one tensor, `"reduce"`.
    """
    if method == "multi_output":
        method = "reduce"
    return _sum_squares(ops.square(x), (), tuple(x.shape), method)


def sums_of_squares(tensors, method="reduce"):
    """`sum_of_squares` of several tensors of one shape and dtype, in one
    pass.

    The squares are stacked and reduced together, so a compiler emits one
    reduction that reads each input once, whatever it makes of two sibling
    reductions. Returns a tuple of scalars.

    `method="multi_output"` forms the sums in one reduction with one output
    per tensor instead, without stacking (`keras_lamb.jax_cpu`, the JAX
    backend's; elsewhere, one `"reduce"` per tensor).
    """
    if method == "multi_output":
        if keras.backend.backend() == "jax":
            from keras_lamb import jax_cpu

            return jax_cpu.sums_of_squares(tensors)
        return tuple(_sum_squares(ops.square(x), (), tuple(x.shape), "reduce")
                     for x in tensors)
    count = len(tensors)
    squares = ops.stack([ops.square(x) for x in tensors])
    sums = _sum_squares(squares, (count,), tuple(tensors[0].shape), method)
    return tuple(sums[i] for i in range(count))


def _sum_squares(squares, lead, shape, method):
    """Sums `squares` (shape `lead + shape`) over the `shape` axes."""
    if method not in SUM_OF_SQUARES_METHODS:
        raise ValueError(
            f"Unknown sum_of_squares method {method!r}; expected one of "
            f"{SUM_OF_SQUARES_METHODS}."
        )
    rows = _row_view(shape) if method != "reduce" else None
    if rows is None:
        if not lead:
            return ops.sum(squares)
        return ops.sum(ops.reshape(squares, lead + (-1,)), axis=-1)
    squares = ops.reshape(squares, lead + rows)
    if method == "rows":
        return ops.sum(ops.sum(squares, axis=-1), axis=-1)
    products = ops.matmul(
        ops.reshape(squares, (-1, rows[1])),
        ops.ones((rows[1],), squares.dtype),
    )
    return ops.sum(ops.reshape(products, lead + (rows[0],)), axis=-1)


def _row_view(shape):
    """A `(rows, columns)` view of `shape` with 128+ columns, or `None`."""
    if any(dim is None for dim in shape):
        return None
    size = math.prod(shape)
    if size < _MATVEC_MIN_SIZE:
        return None
    columns = 1
    for dim in reversed(shape):
        columns *= dim
        if columns >= 128:
            break
    if columns > 16384:  # a long vector: split it at a divisor of its size
        columns = next(
            (c for c in range(2048, 127, -1) if size % c == 0), None
        )
        if columns is None:
            return None
    return (size // columns, columns)


def safe_trust_ratio(numerator, denominator, norms=None):
    """`numerator / denominator` where every norm in `norms` is positive, else 1.

    `norms` defaults to `(numerator, denominator)`. A zero weight norm (a
    freshly zero-initialised bias) or a zero gradient/update norm (a layer that
    got no signal this step) would otherwise freeze the variable or divide by
    zero, so the ratio falls back to 1 there, as in both papers' reference
    code. The denominator is replaced before the division, not after, so no inf
    or nan is ever formed (a `where` applied afterwards still evaluates the
    0/0 branch, which XLA's nan checks and gradient code then see).
    """
    if norms is None:
        norms = (numerator, denominator)
    positive = ops.greater(norms[0], 0.0)
    for norm in norms[1:]:
        positive = ops.logical_and(positive, ops.greater(norm, 0.0))
    safe_denominator = ops.where(positive, denominator, 1.0)
    return ops.where(positive, numerator / safe_denominator, 1.0)


def clamp(x, lower=None, upper=None):
    """`x` clipped to `[lower, upper]` (either `None`: no bound), in `x`'s
    dtype on every backend.

    Written with `where`: Keras's torch `minimum`/`maximum` (3.15) compute
    two float64 tensors in float32, which put LAMB's bounded and clipped
    ratios and LARC 1e-8 off a float64 reference.
    """
    if lower is not None:
        low = ops.full_like(x, lower)
        x = ops.where(ops.less(x, low), low, x)
    if upper is not None:
        high = ops.full_like(x, upper)
        x = ops.where(ops.greater(x, high), high, x)
    return x


def variable_path(variable):
    """`variable.path` of a Keras variable; for a raw `tf.Variable` (TF
    custom loops), its name without the `:0` suffix (`"block1/kernel"`)."""
    path = getattr(variable, "path", None)
    if path:
        return path
    return re.sub(r":\d+$", "", variable.name)


class ExclusionRule:
    """Decides which variables an optimizer feature skips.

    Args:
        spec: `None` (exclude nothing), a regular expression, a list of
            regular expressions (a variable is excluded when any of them is
            found by `re.search` in `variable_path(variable)`, e.g.
            `"dense/bias"`), or a callable `variable -> bool` that returns
            `True` to exclude.
        argument: the name of the optimizer argument, used in error messages.
    """

    def __init__(self, spec, argument):
        self.argument = argument
        self.spec = spec
        self._patterns = []
        self._callable = None
        if spec is None:
            return
        if callable(spec) and not isinstance(spec, str):
            self._callable = spec
            return
        if isinstance(spec, str):
            patterns = [spec]
        elif isinstance(spec, (list, tuple)) and all(
            isinstance(p, str) for p in spec
        ):
            patterns = list(spec)
        else:
            raise ValueError(
                f"Argument `{argument}` must be None, a regular expression "
                "string, a list of regular expression strings, or a callable "
                f"`variable -> bool`. Received: {argument}={spec!r}"
            )
        for pattern in patterns:
            try:
                self._patterns.append(re.compile(pattern))
            except re.error as e:
                raise ValueError(
                    f"Argument `{argument}` contains an invalid regular "
                    f"expression {pattern!r} ({e}). Received: "
                    f"{argument}={spec!r}"
                ) from None

    @property
    def is_callable(self):
        return self._callable is not None

    def excludes(self, variable):
        """Whether `variable` (a Keras or raw backend variable) is excluded."""
        if self._callable is not None:
            return bool(self._callable(variable))
        path = variable_path(variable)
        return any(p.search(path) for p in self._patterns)

    def matches(self, variables):
        """`{pattern: [paths of the variables it matches]}` for each regular
        expression of the rule (for a callable: `{"<callable>": [...]}`)."""
        paths = [variable_path(v) for v in variables]
        if self._callable is not None:
            return {"<callable>": [p for p, v in zip(paths, variables)
                                   if self._callable(v)]}
        return {p.pattern: [path for path in paths if p.search(path)]
                for p in self._patterns}

    def extended(self, patterns):
        """A new rule that also excludes the given regular expressions."""
        if self._callable is not None:
            raise ValueError(
                f"`{self.argument}` is a callable; add the extra names to that "
                "callable instead of passing `var_names`."
            )
        current = [] if self.spec is None else (
            [self.spec] if isinstance(self.spec, str) else list(self.spec)
        )
        return ExclusionRule(current + list(patterns), self.argument)

    def get_config(self):
        """The serializable form of the rule; a callable cannot be saved."""
        if self._callable is not None:
            raise ValueError(
                f"Cannot serialize an optimizer whose `{self.argument}` is a "
                f"callable ({self._callable!r}): the saved config would "
                "silently lose it. Use a regular expression or a list of "
                "regular expressions matched against `variable.path` instead."
            )
        if isinstance(self.spec, tuple):
            return list(self.spec)
        return self.spec


def is_real_number(value):
    """Whether `value` is a real number: a Python or NumPy int or float,
    not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_)
    )


def check_number(name, value, low=None, high=None, low_open=False,
                 high_open=False, allow_none=False):
    """`value` as a Python float if it is a finite real in the range, else a
    `ValueError` naming the argument, the range and the received value.

    NumPy scalars (`np.float32(0.9)`, `np.int64(0)`) count as numbers, bools
    do not. With `allow_none`, `None` is returned as is.
    """
    if value is None and allow_none:
        return None
    try:
        ok = is_real_number(value) and math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        ok = False
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return float(value)
    if low is not None and high is not None:
        where = (f"in {'(' if low_open else '['}{low}, {high}"
                 f"{')' if high_open else ']'}")
    elif low is not None:
        where = f"a finite number {'>' if low_open else '>='} {low}"
    else:
        where = "a finite number"
    raise ValueError(
        f"Argument `{name}` must be {'None or ' if allow_none else ''}"
        f"{where}. Received: {name}={value!r}"
    )


def check_integer(name, value, low, allow_none=False):
    """`value` as a Python int if it is an integer >= `low` (Python or
    NumPy, not a bool), else a `ValueError`."""
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(
        value, (bool, np.bool_)
    ) and value >= low:
        return int(value)
    raise ValueError(
        f"Argument `{name}` must be {'None or ' if allow_none else ''}an "
        f"integer >= {low}. Received: {name}={value!r}"
    )


def check_bool(name, value):
    """`value` as a Python bool if it is a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"Argument `{name}` must be a bool. Received: {name}={value!r}"
        )
    return bool(value)
