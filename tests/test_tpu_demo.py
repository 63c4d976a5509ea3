"""The README's first command: tpu_scripts.demo, in a reduced mode."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from tpu_scripts import demo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_prints_progress_and_table():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "tpu_scripts.demo", "--epochs=1",
         "--full_batch_lr_multipliers=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Data: scikit-learn's bundled digits" in out
    assert "1437 training, 360 test examples" in out
    assert out.count(" loss ") >= 8  # progress: 8 runs, loss per run
    assert "| optimizer | rule x 1 |" in out  # every full-batch rate tried
    assert "| optimizer | batch 32 | batch 1437 (full) |" in out
    final = out[out.index("| optimizer | batch 32"):]
    rows = [line for line in final.splitlines()
            if line.startswith("| ") and "%" in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "lars", "lamb", "momentum", "adam"]
    for row in rows:
        accuracies = [float(cell.split("%")[0])
                      for cell in row.split("|")[2:4]]
        assert all(0 <= a <= 100 for a in accuracies)


def test_fashion_mnist_from_idx_files(tmp_path):
    data = pytest.importorskip("tpu_scripts.resnet.data")
    rng = np.random.default_rng(0)
    data.write_fashion_mnist(
        str(tmp_path),
        (rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)),
        (rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)),
    )
    (x, y), (tx, ty), source = demo.load_fashion_mnist(str(tmp_path))
    assert source == f"Fashion-MNIST IDX files in {tmp_path}"
    assert x.shape == (20, 784) and tx.shape == (5, 784)
    assert 0 <= x.min() and x.max() <= 1 and y.dtype == np.int32


def test_fashion_mnist_unavailable_says_what_to_install(tmp_path,
                                                       monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(SystemExit, match="apt-get install "
                       "dataset-fashion-mnist"):
        demo.load_fashion_mnist(str(tmp_path))
