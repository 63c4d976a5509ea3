"""MirroredStrategy on 2 logical CPU devices equals one device (TF backend)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import BACKEND

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_mirrored_two_replicas_equal_one_device():
    # A subprocess: logical devices must be set before TF initialises, and
    # only one MirroredStrategy may all-reduce sparse gradients per process.
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "mirrored_check.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"dense/lamb", "dense/lars", "embedding/lamb", "embedding/lars"}
    for case, r in report.items():
        # Same global batch: the all-reduced gradients equal the one-device
        # gradients up to float32 summation order.
        assert r["weights_moved"] > 1e-3, case
        assert r["max_weight_diff"] < 1e-5, (case, r)
        assert r["max_trust_ratio_diff"] < 1e-4, (case, r)
