"""The suite's runs on Keras's JAX backend, each a pytest subprocess.

Keras picks its backend once, at import, so each JAX run is a second pytest
process: the backend-agnostic optimizer tests (this is how the optimizers
are measured on GPUs); `keras.distribution` on 8 virtual CPU devices; and
the core install, with `import tensorflow` failing.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import BACKEND

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
AGNOSTIC_MODULES = [
    "test_numerics.py",
    "test_config_and_validation.py",
    "test_training.py",
    "test_fast_path.py",
    "test_hardening.py",
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


def run_on_jax(modules, launcher=("-m", "pytest"), timeout=900, **env):
    """Runs `modules` in a JAX pytest process; returns its output's tail."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", **env)
    # This checkout's keras_lamb, not an installed one.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, *launcher, "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", *[os.path.join(HERE, m) for m in modules]],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE,
    )
    tail = result.stdout[-6000:]
    assert result.returncode == 0, tail + result.stderr[-3000:]
    print(tail.splitlines()[-1])
    return tail


def test_optimizer_suite_on_jax_backend():
    tail = run_on_jax(AGNOSTIC_MODULES)
    assert " passed" in tail and "optax" not in tail.split("SKIPPED")[-1], tail


def test_keras_distribution_on_jax_backend():
    xla_flags = " ".join(p for p in (
        os.environ.get("XLA_FLAGS"),
        "--xla_force_host_platform_device_count=8") if p)
    tail = run_on_jax(["test_jax_distribution.py"], XLA_FLAGS=xla_flags)
    summary = tail.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


def test_core_without_tensorflow():
    tail = run_on_jax(["test_without_tensorflow.py"],
                      launcher=("-c", WITHOUT_TENSORFLOW))
    summary = tail.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail
