"""The optimizer modules on Keras's torch backend, in a pytest subprocess
(Keras picks its backend once, at import), as keras-rs runs its suite once
per backend. Skipped where torch is not installed: the test extra leaves it
out (`pip install -e ".[test,torch]"`, as CI does, adds it)."""

import importlib.util

import pytest

from conftest import BACKEND, background
from test_jax_backend import AGNOSTIC_MODULES, checked, run_on_backend

pytestmark = [
    pytest.mark.skipif(BACKEND == "torch", reason="already running on torch"),
    pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                       reason="torch not installed (the torch extra)"),
]

SUITE = background(
    "torch_suite",
    lambda: run_on_backend("torch", AGNOSTIC_MODULES, CUDA_VISIBLE_DEVICES=""),
    seconds=90)


@pytest.mark.background("torch_suite")
def test_optimizer_suite_on_torch_backend():
    tail = checked(SUITE)
    summary = tail.splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, tail
    # What torch truly lacks is skipped, with its reason printed.
    skipped = tail.split("short test summary info")[-1]
    assert "torch cannot create a trainable integer variable" in skipped, tail
