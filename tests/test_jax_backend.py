"""The suite's runs on Keras's JAX backend, each a pytest subprocess.

Keras picks its backend once, at import, so each JAX run is a second pytest
process: the backend-agnostic optimizer tests (this is how the optimizers
are measured on GPUs); `keras.distribution` on 8 virtual CPU devices; and
the core install, with `import tensorflow` failing. test_torch_backend.py
runs the same optimizer modules on torch with `run_on_backend`.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import BACKEND, background

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The optimizer modules, run on every backend.
AGNOSTIC_MODULES = [
    "test_numerics.py",
    "test_config_and_validation.py",
    "test_training.py",
    "test_fast_path.py",
    "test_hardening.py",
    "test_exclusions.py",
    "test_callbacks.py",
    "test_schedules.py",
    "test_recipes.py",
    "test_peer_mappings.py",
]
# Run as `python -c`, before pytest or Keras import anything: TensorFlow then
# fails to import as it does where it is not installed.
WITHOUT_TENSORFLOW = (
    "import sys; sys.modules['tensorflow'] = None; import pytest; "
    "sys.exit(pytest.main(sys.argv[1:]))"
)

pytestmark = [
    pytest.mark.skipif(BACKEND == "jax", reason="already running on JAX"),
    pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                       reason="jax not installed"),
]


def run_on_jax(modules, launcher=("-m", "pytest"), timeout=900, args=(),
               **env):
    """Runs `modules` in a JAX pytest process (with pytest `args`);
    returns (returncode, stdout tail, stderr tail)."""
    return run_on_backend("jax", modules, launcher, timeout, args=args,
                          JAX_PLATFORMS="cpu", **env)


def run_on_backend(backend, modules, launcher=("-m", "pytest"), timeout=900,
                   args=(), **env):
    """Runs `modules` in a pytest process on Keras's `backend`; returns
    (returncode, stdout tail, stderr tail)."""
    env = dict(os.environ, KERAS_BACKEND=backend, **env)
    env.pop("KERAS_LAMB_TEST_BACKGROUND", None)
    # This checkout's keras_lamb, not an installed one.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, *launcher, "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", *args, *[os.path.join(HERE, m) for m in modules]],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE,
    )
    return result.returncode, result.stdout[-6000:], result.stderr[-3000:]


def checked(job):
    """The output tail of a backend run, which must have passed."""
    returncode, tail, stderr = job.result()
    assert returncode == 0, tail + stderr
    print(tail.splitlines()[-1])
    return tail


def distribution_run():
    xla_flags = " ".join(p for p in (
        os.environ.get("XLA_FLAGS"),
        "--xla_force_host_platform_device_count=8") if p)
    return run_on_jax(["test_jax_distribution.py"], XLA_FLAGS=xla_flags)


SUITE = background("jax_suite", lambda: run_on_jax(AGNOSTIC_MODULES),
                   seconds=134)
DISTRIBUTION = background("jax_distribution", distribution_run,
                          seconds=38)
def jax_engine_run(module, launcher=("-m", "pytest"), args=()):
    env = dict(XLA_FLAGS=" ".join(p for p in (
        os.environ.get("XLA_FLAGS"),
        "--xla_force_host_platform_device_count=8") if p))
    return run_on_jax([module], launcher=launcher, args=args, **env)


# Two jobs, so that both cores can run them at the end of the session.
JAX_ENGINE = background(
    "jax_engine", lambda: jax_engine_run("test_jax_engine.py"), seconds=200)
JAX_ENGINE_BERT = background(
    "jax_engine_bert", lambda: jax_engine_run("test_jax_engine_bert.py"),
    seconds=110)
JAX_ENGINE_WITHOUT_TF = background(
    "jax_engine_without_tensorflow", lambda: jax_engine_run(
        "test_jax_engine.py", ("-c", WITHOUT_TENSORFLOW),
        ("-m", "no_tensorflow_needed")),
    seconds=25)
WITHOUT_TF = background("jax_without_tensorflow", lambda: run_on_jax(
    ["test_without_tensorflow.py"], launcher=("-c", WITHOUT_TENSORFLOW)),
    seconds=13)


@pytest.mark.background("jax_suite")
def test_optimizer_suite_on_jax_backend():
    tail = checked(SUITE)
    assert " passed" in tail and "optax" not in tail.split("SKIPPED")[-1], tail


@pytest.mark.background("jax_distribution")
def test_keras_distribution_on_jax_backend():
    tail = checked(DISTRIBUTION)
    summary = tail.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


@pytest.mark.background("jax_without_tensorflow")
def test_core_without_tensorflow():
    tail = checked(WITHOUT_TF)
    summary = tail.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


@pytest.mark.background("jax_engine")
def test_jax_engine():
    """The training scripts' JAX engine on 8 virtual CPU devices: ResNet,
    kills, a full disk, two processes."""
    tail = checked(JAX_ENGINE)
    summary = tail.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


@pytest.mark.background("jax_engine_bert")
def test_jax_engine_bert():
    """BERT pre-training and SQuAD on the JAX engine (8 virtual devices;
    the records are read with tf.data on the host)."""
    tail = checked(JAX_ENGINE_BERT)
    summary = tail.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


@pytest.mark.background("jax_engine_without_tensorflow")
def test_jax_engine_without_tensorflow():
    """The JAX engine's in-memory and synthetic runs with `import
    tensorflow` failing."""
    tail = checked(JAX_ENGINE_WITHOUT_TF)
    summary = tail.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail
