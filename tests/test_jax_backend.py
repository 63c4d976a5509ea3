"""Reruns the backend-agnostic optimizer tests on Keras's JAX backend.

Keras picks its backend once, at import, so the JAX run is a second pytest
process. This is how the optimizers are measured on GPUs.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import BACKEND

HERE = os.path.dirname(os.path.abspath(__file__))
AGNOSTIC_MODULES = [
    "test_numerics.py",
    "test_config_and_validation.py",
    "test_training.py",
    "test_fast_path.py",
]


@pytest.mark.skipif(BACKEND == "jax", reason="already running on JAX")
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_optimizer_suite_on_jax_backend():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", *[os.path.join(HERE, m) for m in AGNOSTIC_MODULES]],
        capture_output=True, text=True, timeout=900, env=env, cwd=HERE,
    )
    tail = result.stdout[-6000:]
    assert result.returncode == 0, tail
    assert " passed" in tail and "optax" not in tail.split("SKIPPED")[-1], tail
    print(tail.splitlines()[-1])
