"""Plots of per-layer norms and trust ratios (matplotlib, optional).

`trust_ratios` draws the figure that motivates LARS (You, Gitman, Ginsburg
2017, Table 1): the ratio ||w|| / ||g|| of each layer, on a log axis, which
differs between layers by orders of magnitude and changes during training.
matplotlib is imported when the function is called, so this module imports
without it.
"""

import math
import re

import numpy as np

__all__ = ["trust_ratios"]

QUANTITIES = (
    "norm_ratio",
    "trust_ratio",
    "learning_rate",
    "weight_norm",
    "update_norm",
)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "keras_lamb.plot needs matplotlib, an optional dependency: "
            "`pip install matplotlib`."
        ) from None
    return Figure


def _label(quantity, update_symbol):
    u = update_symbol or "g"
    # mathtext, so the double bars render in any font.
    return {
        "norm_ratio": rf"$\|w\| \,/\, \|{u}\|$",
        "trust_ratio": "trust ratio $r$",
        "learning_rate": r"effective learning rate ($lr \times r$)",
        "weight_norm": r"$\|w\|$",
        "update_norm": rf"$\|{u}\|$",
    }[quantity]


def _value(stats, quantity):
    if quantity == "norm_ratio":
        w, u = stats["weight_norm"], stats["update_norm"]
        return w / u if w > 0 and u > 0 else math.nan
    value = stats[quantity]
    return value if value > 0 else math.nan


def _pick_records(records, steps, max_lines):
    if steps is not None:
        by_step = dict(records)
        missing = [s for s in steps if s not in by_step]
        if missing:
            raise ValueError(
                "Argument `steps` must list recorded steps "
                f"({sorted(by_step)}). Received: steps={steps!r}"
            )
        return [(s, by_step[s]) for s in steps]
    if len(records) <= max_lines:
        return list(records)
    # Evenly spaced records, always the first and the last.
    indices = np.unique(
        np.round(np.linspace(0, len(records) - 1, max_lines)).astype(int)
    )
    return [records[i] for i in indices]


def trust_ratios(
    records,
    path=None,
    quantity="norm_ratio",
    steps=None,
    layers=None,
    panels=None,
    max_lines=5,
    update_symbol=None,
    title=None,
):
    """Per-layer ||w|| / ||g|| (or another statistic) at several steps.

    One line per training step, the model's variables on the x-axis in
    optimizer order (input to output), a log y-axis. Zero values (a
    zero-initialised bias at step 1) cannot be drawn on a log axis and are
    left out of their line.

    Args:
        records: a `keras_lamb.callbacks.TrustRatioMonitor` or its `records`,
            a list of `(step, {variable.path: {stat: float}})`.
        path: `None` or a file name; the figure is saved there (PNG by the
            extension, 150 dpi).
        quantity: what to draw: `"norm_ratio"` (||w|| / ||update_norm||, the
            LARS paper's ratio; ||w|| / ||u|| for LAMB), `"trust_ratio"`,
            `"learning_rate"` (effective), `"weight_norm"` or
            `"update_norm"`. Defaults to `"norm_ratio"`.
        steps: `None` or a list of recorded steps to draw. By default up to
            `max_lines` evenly spaced records, including the first and last.
        layers: `None` (all variables) or a regular expression (or a list,
            any of which may match) searched in `variable.path`.
        panels: `None` (one panel) or a list of regular expressions: one
            panel each, side by side on a shared y-axis, with the variables
            (among `layers`) whose path it matches, e.g.
            `["kernel", "bias"]`.
        max_lines: integer >= 1. Defaults to `5`.
        update_symbol: the symbol of the update norm in the labels; defaults
            to the monitor's (`"g"` for LARS, `"u"` for LAMB), else `"g"`.
        title: `None` (a default title) or a string.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    Figure = _figure_class()
    if hasattr(records, "records"):
        if update_symbol is None:
            update_symbol = getattr(records, "update_symbol", None)
        records = records.records
    if not isinstance(records, (list, tuple)) or not records:
        raise ValueError(
            "Argument `records` must be a TrustRatioMonitor or a non-empty "
            "list of (step, stats) pairs; train with the monitor first. "
            f"Received: records={records!r}"
        )
    if quantity not in QUANTITIES:
        raise ValueError(
            f"Argument `quantity` must be one of {QUANTITIES}. "
            f"Received: quantity={quantity!r}"
        )
    if not isinstance(max_lines, int) or max_lines < 1:
        raise ValueError(
            "Argument `max_lines` must be an integer >= 1. "
            f"Received: max_lines={max_lines!r}"
        )
    paths = _matching(list(records[0][1]), layers, "layers")
    if panels is None:
        groups = [(None, paths)]
    else:
        if isinstance(panels, str):
            panels = [panels]
        groups = [(q, _matching(paths, q, "panels")) for q in panels]
    chosen = _pick_records(records, steps, max_lines)
    label = _label(quantity, update_symbol)

    widths = [max(3.0, 0.5 * len(g)) for _, g in groups]
    fig = Figure(figsize=(max(6.0, sum(widths) + 2.0), 4.8))
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False,
                        gridspec_kw=dict(width_ratios=widths))[0]
    colors = _colors(len(chosen))
    missing = False
    for ax, (pattern, group) in zip(axes, groups):
        x = np.arange(len(group))
        for color, (step, stats) in zip(colors, chosen):
            y = [_value(stats[p], quantity) for p in group]
            missing = missing or any(math.isnan(v) for v in y)
            ax.plot(x, y, marker="o", color=color, label=f"step {step}")
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels(_short_paths(group), rotation=35, ha="right",
                           fontsize=8)
        ax.set_xlabel("variable (input → output)")
        if pattern is not None:
            ax.set_title(f"variables matching '{pattern}'", fontsize=9)
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", axis="y", alpha=0.15)
    axes[0].set_ylabel(label + " (log scale)")
    axes[0].legend(title="training step", fontsize=8, title_fontsize=8)
    fig.suptitle(title or f"Per-layer {label} during training")
    if missing:
        fig.text(0.005, 0.005, "Zero values (e.g. zero-initialised biases at "
                 "step 1) are not drawn on the log axis.", fontsize=7,
                 color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03 if missing else 0, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def _matching(paths, patterns, argument):
    if patterns is None:
        return list(paths)
    if isinstance(patterns, str):
        patterns = [patterns]
    matched = [p for p in paths if any(re.search(q, p) for q in patterns)]
    if not matched:
        raise ValueError(
            f"Argument `{argument}` matches no recorded variable ({paths}). "
            f"Received: {argument}={patterns!r}"
        )
    return matched


def _short_paths(paths):
    """Paths without their common leading components (`sequential/`)."""
    parts = [p.split("/") for p in paths]
    common = 0
    while all(len(q) > common + 1 for q in parts) and len(
        {q[common] for q in parts}
    ) == 1 and len(parts) > 1:
        common += 1
    return ["/".join(q[common:]) for q in parts]


def _colors(n):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]
