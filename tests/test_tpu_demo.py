"""The README's first command: tpu_scripts.demo, in a reduced mode, and its
plot."""

import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest

pytest.importorskip("sklearn")

from tpu_scripts import demo  # noqa: E402
from conftest import background  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_size(path):
    """(width, height) of a PNG file, from its signature and IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def run_demo():
    """The demo, its plot into a folder it must create; returns (the
    CompletedProcess, the plot's path)."""
    plot = pathlib.Path(tempfile.mkdtemp(prefix="keras_lamb_demo_")) / (
        "new_folder") / "demo.png"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "tpu_scripts.demo", "--epochs=1",
         "--full_batch_lr_multipliers=1", f"--plot={plot}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    return result, plot


DEMO = background("demo", run_demo, seconds=28)


@pytest.mark.background("demo")
def test_demo_prints_progress_table_and_plot():
    result, plot = DEMO.result()
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
    assert out.rstrip().endswith(f"Plot: {plot}")  # after the table
    assert png_size(plot) == (1650, 720)  # 11 x 4.8 inches at 150 dpi
    image = pytest.importorskip("matplotlib.image").imread(plot)
    assert image.shape == (720, 1650, 4) and image.std() > 0.05  # drawn
    assert os.listdir(plot.parent) == ["demo.png"]  # no temporary left
    shutil.rmtree(plot.parent.parent)


def fake_run(name, batch_size, lr, accuracy, multiplier=1.0):
    return dict(optimizer=name, batch_size=batch_size, peak_lr=lr,
                multiplier=multiplier, test_accuracy=accuracy)


def test_plot_draws_every_run_on_log_axes():
    pytest.importorskip("matplotlib")
    tried = {
        "lars": [fake_run("lars", 1000, 0.5 * m, a, m)
                 for m, a in ((0.25, 0.90), (1.0, 0.95), (4.0, 0.10))],
        "adam": [fake_run("adam", 1000, 0.01 * m, a, m)
                 for m, a in ((4.0, 0.80), (0.25, 0.93), (1.0, 0.97))],
    }
    results = [fake_run("lars", 32, 2.0, 0.96), fake_run("adam", 32, 2e-3,
                                                         0.98),
               tried["lars"][1], tried["adam"][1]]  # kept: adam x 1/4
    figure = demo.plot_accuracy_vs_learning_rate(
        results, tried, 32, 1000, "digits, 1000 / 200", chance=10.0)
    small, full = figure.axes
    assert small.get_xscale() == full.get_xscale() == "log"
    assert "batch 32" in small.get_title()
    assert "full batch 1000" in full.get_title()
    assert "1/4, 1, 4" in full.get_title()
    assert figure.get_suptitle() == "digits, 1000 / 200"

    def lines(axes, color):
        return [line for line in axes.get_lines()
                if line.get_color() == color and line.get_linestyle() == "-"]

    adam = demo.STYLES["adam"]["color"]
    (line,) = lines(full, adam)  # one line per optimizer, sorted by rate
    np.testing.assert_allclose(line.get_xdata(), [0.0025, 0.01, 0.04])
    np.testing.assert_allclose(line.get_ydata(), [93, 97, 80])
    (point,) = lines(small, adam)
    assert list(point.get_xdata()) == [2e-3] and list(point.get_ydata()) == [
        98.0]
    rings = [line for line in full.get_lines()
             if line.get_markerfacecolor() == "none"]
    assert sorted((line.get_xdata()[0], line.get_ydata()[0])
                  for line in rings) == [(0.0025, 93.0), (0.5, 95.0)]
    assert {t.get_text() for t in small.texts} >= {"96.0 %", "98.0 %"}
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["LARS", "Adam", "kept (lowest final training loss)"]


@pytest.mark.parametrize("path, message", [
    ("demo.bmpx", "must end in a format matplotlib writes: .*\\.png"),
    ("demo", "must end in a format matplotlib writes"),
    ("file/demo.png", "cannot write under .*file \\(not a writable "
                      "directory\\)"),
])
def test_plot_path_errors_name_the_flag(tmp_path, path, message):
    pytest.importorskip("matplotlib")
    from absl import app

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(app.UsageError, match="--plot=.*" + message):
        demo.check_plot_path(str(tmp_path / path))
    demo.check_plot_path(str(tmp_path / "a" / "b" / "demo.svg"))  # fine
    demo.check_plot_path("")  # no plot


def test_plot_without_matplotlib_says_what_to_do(monkeypatch):
    from absl import app

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(app.UsageError, match="--plot needs matplotlib.*"
                       "pass --plot= to run without the plot"):
        demo.check_plot_path("demo.png")


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
