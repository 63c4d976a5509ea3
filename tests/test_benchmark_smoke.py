"""The benchmark script runs end to end on tiny shapes (`--smoke`)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

from conftest import background

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "optimizer_step.py")
OPTIMIZERS = ["keras_lamb.LAMB", "keras_lamb.LARS", "keras.Adam",
              "keras_lamb.LAMB[reference]",
              "keras_lamb.LARS[adapt-all+rows+joint]",
              "keras_lamb.LAMB[store+separate+multi_output]"]


def run_script(script, *args):
    """Runs `script` with `args` plus --jsonl/--markdown into a temporary
    folder; returns (the CompletedProcess, the JSON lines, the table)."""
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = pathlib.Path(tmp) / "out.jsonl"
        markdown = pathlib.Path(tmp) / "out.md"
        result = subprocess.run(
            [sys.executable, script, *args,
             "--jsonl", str(jsonl), "--markdown", str(markdown)],
            capture_output=True, text=True, timeout=600,
        )
        return (result,
                jsonl.read_text() if jsonl.exists() else "",
                markdown.read_text() if markdown.exists() else "")


OPTIMIZER_STEP = background("benchmark_smoke", lambda: run_script(
    SCRIPT, "--smoke", "--backend", "all", "--xla", "on",
    "--optimizers", ",".join(OPTIMIZERS + ["optax.lamb"]),
    "--steps-per-sample", "2"), seconds=24)


@pytest.mark.background("benchmark_smoke")
def test_benchmark_smoke():
    result, jsonl, table = OPTIMIZER_STEP.result()
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in jsonl.splitlines()]
    assert records[0]["kind"] == "run"
    steps = [r for r in records if r.get("kind") == "step"]
    expected = {"tensorflow": OPTIMIZERS, "jax": OPTIMIZERS + ["optax.lamb"]}
    for backend, names in expected.items():
        if importlib.util.find_spec(backend) is None:
            assert any(r.get("skipped") for r in records
                       if r.get("backend") == backend)
            continue
        if backend == "jax" and importlib.util.find_spec("optax") is None:
            names = OPTIMIZERS
        got = {r["optimizer"] for r in steps if r["backend"] == backend}
        assert got == set(names), (backend, got)
        bandwidth = [r for r in records if r.get("kind") == "bandwidth"
                     and r["backend"] == backend]
        assert len(bandwidth) == 1 and bandwidth[0]["gb_per_s"] > 0
    for r in steps:
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["gb_per_s"] > 0
        assert r["floor_bytes_per_param"] in (20, 28, 40)
        if r["optimizer"].startswith("keras_lamb.LAMB"):
            assert r["ref"] == "keras.Adam" and r["x_ref"] > 0
        if r["backend"] == "jax":
            # Read from the optimized HLO: an optimizer step is a few
            # kernels per variable at least (5 variables in the smoke set).
            assert r["hlo_kernels"] >= 5 and r["steps_per_sample"] == 2
    assert table.startswith("| backend | XLA | shapes | optimizer | ms |")
    assert table.count("| smoke |") == len(steps)
    # The JSON lines also go to stdout, followed by the table.
    assert result.stdout.count('"kind": "step"') == len(steps)
    assert "| keras_lamb.LAMB |" in result.stdout


def test_benchmark_rejects_unknown_optimizers():
    for name in ["keras.Adam[reference]", "keras_lamb.LAMB[fast]",
                 "keras_lamb.LAMB[rows", "sgd"]:
        result = subprocess.run(
            [sys.executable, SCRIPT, "--smoke", "--optimizers", name],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2, name
        assert "unknown optimizers" in result.stderr, result.stderr


TRAIN_STEP = os.path.join(os.path.dirname(HERE), "benchmarks", "train_step.py")


TRAIN_STEP_SMOKE = background("train_step_smoke", lambda: run_script(
    TRAIN_STEP, "--smoke", "--models", "resnet"), seconds=29)


@pytest.mark.background("train_step_smoke")
def test_train_step_smoke():
    """The end-to-end benchmark fits a tiny ResNet (keras-hub, XLA) with
    LARS and SGD-momentum and times the optimizer alone on its variables.
    (`--models bert` runs the same code on a tiny BERT masked LM; it is left
    out here to keep the suite fast.)"""
    result, jsonl, table = TRAIN_STEP_SMOKE.result()
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in jsonl.splitlines()]
    assert records[0]["kind"] == "run"
    steps = {r["optimizer"]: r for r in records
             if r.get("kind") == "train_step"}
    assert set(steps) == {"keras_lamb.LARS", "keras.SGD-momentum"}
    for r in steps.values():
        assert r["model"] == "resnet" and r["size"] == "smoke"
        assert r["step_ms"] > 0 and r["optimizer_ms"] > 0
        assert r["ref"] == "keras.SGD-momentum" and r["n_params"] > 1000
        assert r["optimizer_share_percent"] == pytest.approx(
            100 * r["optimizer_ms"] / r["step_ms"])
    assert steps["keras.SGD-momentum"]["x_ref"] == 1.0
    lars = steps["keras_lamb.LARS"]
    assert lars["extra_percent"] == pytest.approx(100 * (lars["x_ref"] - 1))
    assert table.count("| resnet (smoke) |") == 2
    assert table in result.stdout


def test_train_step_rejects_bad_flags():
    for flags, message in [(["--models", "gpt"], "--models"),
                           (["--steps", "0"], "--steps")]:
        result = subprocess.run(
            [sys.executable, TRAIN_STEP, *flags],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2, flags
        assert message in result.stderr, result.stderr


TORCH_STEP = background("benchmark_smoke_torch", lambda: run_script(
    SCRIPT, "--smoke", "--backend", "torch",
    "--optimizers", ",".join(OPTIMIZERS), "--steps-per-sample", "2"),
    seconds=15)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch not installed (the torch extra)")
@pytest.mark.background("benchmark_smoke_torch")
def test_benchmark_smoke_on_torch_with_its_peers():
    result, jsonl, table = TORCH_STEP.result()
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in jsonl.splitlines()]
    got = {r["optimizer"] for r in records if r.get("kind") == "step"}
    peers = {"torch.AdamW", "torch.SGD-momentum"}
    if importlib.util.find_spec("timm") is not None:
        peers |= {"timm.Lamb", "timm.Lars"}
    assert got == set(OPTIMIZERS) | peers, got
    ratios = {r["optimizer"]: r.get("x_ref") for r in records
              if r.get("kind") == "step"}
    assert ratios["keras_lamb.LAMB"] > 0 and "| torch | off | smoke |" in table
