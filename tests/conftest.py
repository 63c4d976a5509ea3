import os
import socket
import time

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


def write_tiny_fashion_mnist(path):
    """The four Fashion-MNIST IDX files of a tiny random data set (64
    training and 32 test images of 8x8) in `path`; returns `path`."""
    from tpu_scripts.resnet import data

    rng = np.random.default_rng(0)
    data.write_fashion_mnist(
        path,
        (rng.integers(0, 256, (64, 8, 8)), rng.integers(0, 10, 64)),
        (rng.integers(0, 256, (32, 8, 8)), rng.integers(0, 10, 32)),
    )
    return path


def small_run_flags(data_dir, **overrides):
    """ResNet script flags of a tiny run on `write_tiny_fashion_mnist`'s
    data: 8x8 images, a 2-stage ResNet, LARS, 6 steps."""
    values = dict(
        dataset="fashion_mnist", data_dir=data_dir, model="small_resnet",
        small_resnet_widths="4,8", small_resnet_blocks=1,
        global_batch_size=16, optimizer="lars", learning_rate=2.0,
        warmup_epochs=0.5, steps_per_loop=2, seed=1, train_steps=6,
    )
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def read_until(process, text, timeout=240):
    """Lines of `process`'s output up to the first containing `text` (the
    process is killed and the test fails if it never prints it)."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()
    pytest.fail(f"never printed {text!r}:\n" + "".join(lines)[-3000:])


def jax_device_count():
    """JAX's device count in this process (0 on other backends)."""
    if BACKEND != "jax":
        return 0
    import jax

    return jax.device_count()


def free_ports(count):
    """`count` free TCP ports on 127.0.0.1 (for loopback workers)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# ---------------------------------------------------------------------------
# Background jobs. Most of the suite runs on one core, in this process; the
# tests that only start subprocesses and check what those print or write
# (the JAX reruns, the 2-replica checks, the benchmark and demo smoke runs)
# can run on the other. A test module declares such work with
# `job = background(name, function)` and marks the test that consumes it
# `@pytest.mark.background(name)`; those tests move to the end of the
# session (`in_place=True`: a test that shares module fixtures stays where it
# is), and once collection is done the jobs of the selected tests start one
# after another on a thread (their results are then ready or nearly when
# the tests run). The test calls `job.result()`, which waits, or runs the
# job itself if the thread has not started it, and re-raises whatever the
# function raised. Assertions stay in the
# tests. KERAS_LAMB_TEST_BACKGROUND=0 runs each job inline, in its test.

import collections  # noqa: E402
import threading  # noqa: E402

_JOBS = {}


class BackgroundJob:
    def __init__(self, name, function):
        self.name, self.function = name, function
        self._done = threading.Event()
        self._claimed = False
        self._lock = threading.Lock()
        self._value = self._error = None

    def run(self):
        """Runs the function here unless another thread has claimed it."""
        with self._lock:
            if self._claimed:
                return
            self._claimed = True
        try:
            self._value = self.function()
        except BaseException as e:  # re-raised in the test
            self._error = e
        finally:
            self._done.set()

    def result(self):
        self.run()  # inline if the background thread has not started it
        # While the thread runs this one, run here a job it has not reached
        # (the last queued): both cores stay busy to the end.
        while not self._done.is_set():
            other = _next_job(from_end=True)
            if other is None:
                break
            other.run()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


_QUEUE = collections.deque()  # jobs to run, the thread's order
_QUEUE_LOCK = threading.Lock()


def _next_job(from_end=False):
    with _QUEUE_LOCK:
        while _QUEUE:
            job = _QUEUE.pop() if from_end else _QUEUE.popleft()
            if not job._claimed:
                return job
    return None


def background(name, function, seconds=0):
    """Declares `function` (no arguments, returns what the test checks) as
    the background job `name`, which takes about `seconds` (on an idle
    machine; the thread starts the longest first); returns its
    `BackgroundJob`."""
    if name not in _JOBS:  # a module imported twice declares it once
        _JOBS[name] = BackgroundJob(name, function)
        _JOBS[name].seconds = seconds
    return _JOBS[name]


def _background_names(item):
    return [m.args[0] for m in item.iter_markers("background")]


def _skipped(item):
    """Whether a `skip` marker or a `skipif` with a true (bool) condition
    applies to `item`: its job need not start."""
    if any(True for _ in item.iter_markers("skip")):
        return True
    for m in item.iter_markers("skipif"):
        conditions = m.args or (m.kwargs.get("condition"),)
        if any(c is True for c in conditions):
            return True
    return False


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "background(name, in_place=False): the test consumes "
        "background job `name` (see tests/conftest.py); it runs at the end "
        "of the session unless in_place")
    config.addinivalue_line(
        "markers", "no_tensorflow_needed: the test also runs where "
        "`import tensorflow` fails (test_jax_engine.py)")


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("KERAS_LAMB_TEST_BACKGROUND", "1") == "0":
        return

    def moved(item):
        return any(not m.kwargs.get("in_place")
                   for m in item.iter_markers("background"))

    # Last, and in reverse: the thread runs their jobs from the first one
    # on, so the test that ends the session claims (and runs, here) any job
    # the thread has not reached; the two meet in the middle.
    last = [item for item in items if moved(item)]
    items[:] = [item for item in items if not moved(item)] + last[::-1]


def pytest_collection_finish(session):
    if (os.environ.get("KERAS_LAMB_TEST_BACKGROUND", "1") == "0"
            or session.config.option.collectonly):
        return
    selected = [item for item in session.items if not _skipped(item)]
    in_place = [item for item in selected
                if all(m.kwargs.get("in_place")
                       for m in item.iter_markers("background"))]
    moved = [item for item in selected if item not in in_place]

    def jobs(items):
        names = [n for item in items for n in _background_names(item)]
        return [_JOBS[n] for n in dict.fromkeys(names) if n in _JOBS]

    # The in-place tests' jobs first (their tests come early), then the
    # longest first: what is left to share at the end is short.
    first = jobs(in_place)
    rest = sorted((j for j in jobs(moved) if j not in first),
                  key=lambda j: -j.seconds)
    _QUEUE.extend(first + rest)
    if _QUEUE:
        threading.Thread(target=_run_queue, name="background-jobs",
                         daemon=True).start()


def _run_queue():
    while (job := _next_job()) is not None:
        job.run()
