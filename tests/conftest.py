import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tolerances for comparing an optimizer run against the float64 reference,
# by the dtype of the variables; one table for the whole suite.
TOLERANCES = {
    "float64": dict(rtol=1e-10, atol=1e-12),
    "float32": dict(rtol=2e-5, atol=2e-6),
    "float16": dict(rtol=2e-2, atol=2e-3),
    "bfloat16": dict(rtol=5e-2, atol=1e-2),
}

BACKEND = keras.backend.backend()

# Five variables with norms spanning five orders of magnitude, a zero-initialised
# one (its trust ratio falls back to 1), a LayerNorm-like one and a bias.
VARIABLE_SPECS = [
    # (scope, name, shape, weight scale, gradient scale)
    ("big", "kernel", (8, 6), 3.0, 0.5),
    ("small", "kernel", (5,), 0.01, 10.0),
    ("zeros", "kernel", (4,), 0.0, 1.0),
    ("layer_norm", "gamma", (3, 3), 1.0, 0.01),
    ("dense", "bias", (6,), 0.1, 1.0),
]


def make_variables(dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    variables = []
    for scope, name, shape, scale, _ in VARIABLE_SPECS:
        value = scale * rng.standard_normal(shape)
        with keras.name_scope(scope):
            variables.append(keras.Variable(value, dtype=dtype, name=name))
    return variables


def make_gradients(step, seed=1):
    rng = np.random.default_rng([seed, step])
    return [
        (g_scale * rng.standard_normal(shape)).astype("float64")
        for _, _, shape, _, g_scale in VARIABLE_SPECS
    ]


def mask(pattern):
    """True for variables whose path does NOT contain `pattern`."""
    return [pattern not in f"{scope}/{name}" for scope, name, *_ in VARIABLE_SPECS]


@pytest.fixture
def variables():
    return make_variables()


def run_lockstep(optimizer, reference, steps=6, dtype="float32"):
    """Steps `optimizer` and the numpy `reference` on the same gradients and
    asserts after every step that the weights agree."""
    variables = make_variables(dtype)
    ref_weights = [keras.ops.convert_to_numpy(v).astype("float64") for v in variables]
    tol = TOLERANCES[dtype]
    for step in range(steps):
        grads = make_gradients(step)
        optimizer.apply([keras.ops.convert_to_tensor(g, dtype=dtype) for g in grads], variables)
        ref_weights = reference.step(ref_weights, grads)
        for v, ref in zip(variables, ref_weights):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(v).astype("float64"), ref,
                err_msg=f"{v.path} at step {step + 1}", **tol,
            )
    return variables


def free_ports(count):
    """`count` free TCP ports on 127.0.0.1 (for loopback workers)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
