"""keras_lamb.plot.trust_ratios: the figure, the PNG, the errors."""

import math
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from keras_lamb import plot  # noqa: E402

PATHS = ["net/conv1/kernel", "net/conv1/bias", "net/fc2/kernel",
         "net/fc2/bias"]


def make_records(steps=(1, 10, 20, 30, 40, 50, 60)):
    """Synthetic records; the conv1/fc2 kernel ratio grows with the step and
    the biases start at zero (no point at step 1)."""
    records = []
    for step in steps:
        stats = {}
        for i, path in enumerate(PATHS):
            w = 0.0 if (step == 1 and "bias" in path) else 1.0 + i
            g = 10.0 ** -(i + step / 60)
            stats[path] = dict(weight_norm=w, update_norm=g,
                               trust_ratio=1e-3 * w / g,
                               learning_rate=1e-2 * w / g)
        records.append((step, stats))
    return records


def test_png_is_written_and_is_a_real_image(tmp_path):
    import matplotlib.image

    path = tmp_path / "ratios.png"
    fig = plot.trust_ratios(make_records(), path=str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    height, width = image.shape[:2]
    assert width >= 800 and height >= 600
    assert image.std() > 0.05  # not a blank canvas
    assert fig.axes[0].get_yscale() == "log"


def test_lines_are_evenly_spaced_steps_with_the_plotted_ratio():
    records = make_records()
    fig = plot.trust_ratios(records, max_lines=4)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [
        "step 1", "step 20", "step 40", "step 60"]
    last = lines[-1].get_ydata()
    stats = records[-1][1]
    expected = [stats[p]["weight_norm"] / stats[p]["update_norm"]
                for p in PATHS]
    np.testing.assert_allclose(last, expected)
    # Zero weight norms (biases at step 1) are left out, not drawn at 0.
    assert math.isnan(lines[0].get_ydata()[1])
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "conv1/kernel", "conv1/bias", "fc2/kernel", "fc2/bias"]
    assert "w" in ax.get_ylabel() and "log" in ax.get_ylabel()


def test_panels_layers_quantity_and_steps():
    fig = plot.trust_ratios(make_records(), panels=["kernel", "bias"],
                            quantity="trust_ratio", steps=[10, 60],
                            update_symbol="u")
    kernels, biases = fig.axes[:2]
    assert [t.get_text() for t in kernels.get_xticklabels()] == [
        "conv1/kernel", "fc2/kernel"]
    assert len(biases.get_lines()) == 2
    assert "trust ratio" in kernels.get_ylabel()
    fig = plot.trust_ratios(make_records(), layers="fc2")
    assert len(fig.axes[0].get_xticklabels()) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(records=[]), "Argument `records` must be a TrustRatioMonitor"),
        (dict(quantity="ratio"), "Argument `quantity` must be one of"),
        (dict(steps=[7]), "Argument `steps` must list recorded steps"),
        (dict(layers="gamma"), "Argument `layers` matches no recorded"),
        (dict(panels=["kernel", "gamma"]), "Argument `panels` matches no"),
        (dict(max_lines=0), "Argument `max_lines` must be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs.setdefault("records", make_records())
    with pytest.raises(ValueError, match=match):
        plot.trust_ratios(**kwargs)


def test_missing_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.trust_ratios(make_records())
