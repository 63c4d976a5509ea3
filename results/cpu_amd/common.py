"""Shared by the experiment scripts of this folder: the repository on the
import path, and interleaved timing of compiled optimizer steps with
`benchmarks/optimizer_step.py`'s `Timer`."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(REPO, "benchmarks"), REPO]

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from optimizer_step import Timer  # noqa: E402


def same_shape_variables(shape, count):
    """`count` float32 variables of `shape` and gradients for them."""
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal(shape).astype("float32"),
                                name=f"kernel{i}") for i in range(count)]
    grads = [tf.constant(1e-3 * rng.standard_normal(shape).astype("float32"))
             for _ in variables]
    return variables, grads


def compiled_step(optimizer, variables):
    """A zero-argument XLA-compiled step of `optimizer` taking `grads`."""
    optimizer.build(variables)
    return tf.function(lambda grads: (optimizer.apply(grads, variables),
                                      optimizer.iterations)[1],
                       jit_compile=True)


def median_ms(steps, grads, reps):
    """Median ms of each compiled step in `steps`, interleaved."""
    results = Timer({name: (lambda f=f: f(grads).numpy())
                     for name, f in steps.items()}, reps, warmup=1).run()
    return {name: r["ms"] for name, r in results.items()}
