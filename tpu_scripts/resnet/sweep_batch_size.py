r"""Scaled-down large-batch reproduction: test accuracy vs batch size.

Fashion-MNIST (IDX files), a small ResNet, a fixed epoch budget, batch sizes
from 128 up, and four optimizers with the same tuning budget: for every
(optimizer, batch size) a grid of learning rates (`--lr_multipliers` times
the optimizer's own scaling rule); the rate with the best accuracy on a
validation split held out of the training set is picked, and its *test*
accuracy is reported.

Optimizers (same warmup fraction for all; every run trains the same model
from the same initial weights on the same batches):

- `lars`: keras_lamb LARS, momentum 0.9, weight decay 1e-4 in the trust
  ratio, trust coefficient 1e-3; rate centre 10 * sqrt(B / 8192) (MLPerf's
  peak 10 at batch 8k, square-root scaled); warmup then polynomial decay
  (power 2, MLPerf's schedule).
- `lamb`: keras_lamb LAMB, weight decay 0.01; rate centre
  1e-2 * sqrt(B / 8192), meant as the same per-layer relative step as LARS
  (LAMB's rate multiplies ||w|| directly, LARS's is multiplied by the trust
  coefficient 1e-3) but missing the factor 1 / (1 - momentum) = 10 by which
  LARS's momentum buffer sums its steps (the x9 grid point is about the
  matched rate); same schedule as LARS.
- `momentum`: Goyal et al.: SGD momentum 0.9, L2 1e-4 in the loss, linear
  scaling 0.1 * B / 256, warmup from the batch-256 rate, step decay x0.1 at
  30/90, 60/90, 80/90 of the run.
- `nesterov`: the control of Nado et al. (2021): SGD Nesterov momentum 0.9,
  L2 1e-4 in the loss, LARS's schedule, rate centre 0.1 * sqrt(B / 256).

    python -m tpu_scripts.resnet.sweep_batch_size \
      --data_dir=/usr/share/datasets/fashion-mnist

Writes, to a fresh `runs/resnet_sweep-<UTC time>/` unless `--output_dir`
says otherwise, `runs.csv` (every run as it finishes, with the settings it
ran with; a rerun with the same `--output_dir` skips the runs already there
with the same settings), then, once every run has finished, `table.csv`,
`table.md` (with the settings of the runs it shows),
`accuracy_vs_batch_size.png` and `command.txt`, each atomically through
`tf.io.gfile` (`gs://` works). A folder under the repository's `results/`
(the committed results) is refused unless `--allow_results_dir`. The
committed results (`results/resnet_sweep/`) took 58 minutes of run time on
two shared CPU cores.
"""

import csv
import hashlib
import io
import json
import math
import os
import shlex
import sys
import time

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
    sys.path.insert(0, os.path.abspath(
        os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
if __name__ == "__main__":  # a script needs TensorFlow (tf.distribute)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["KERAS_BACKEND"] = "tensorflow"

from absl import app, flags, logging  # noqa: E402

# The repository's committed results: a sweep writes there only when asked
# (`--allow_results_dir`).
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "results")

SWEEP_OPTIMIZERS = ("lars", "lamb", "momentum", "nesterov")
RUN_FIELDS = ("optimizer", "batch_size", "lr_multiplier", "peak_lr",
              "val_accuracy", "test_accuracy", "train_loss", "steps",
              "seconds", "settings_id", "settings")
# Every flag that changes a run's result besides its optimizer, batch size
# and multiplier: finished runs are reused only when all of them match.
SETTING_FLAGS = ("data_dir", "epochs", "recalibrate_bn_examples",
                 "warmup_fraction", "validation_examples", "train_examples",
                 "test_examples", "widths", "blocks_per_stage", "stem_stride",
                 "seed")
LABELS = {
    "lars": "LARS",
    "lamb": "LAMB",
    "momentum": "Momentum (Goyal: linear scaling + warmup)",
    "nesterov": "Nesterov (tuned control)",
}


def define_flags(flag_values=flags.FLAGS):
    """Defines every flag of the sweep on `flag_values`."""
    f = dict(flag_values=flag_values)
    flags.DEFINE_string(
        "data_dir", "/usr/share/datasets/fashion-mnist", "Directory of the "
        "four Fashion-MNIST IDX files (`apt-get install "
        "dataset-fashion-mnist` puts them in the default).", **f)
    flags.DEFINE_string(
        "output_dir", "", "Where the runs, table, plot and command go "
        "(empty: a fresh runs/resnet_sweep-<UTC time>; the same folder "
        "again resumes a sweep).", **f)
    flags.DEFINE_boolean(
        "allow_results_dir", False, "Allow an --output_dir under the "
        "repository's results/ (the committed results; only to regenerate "
        "them).", **f)
    flags.DEFINE_list(
        "batch_sizes", ["128", "512", "2048", "8192"], "Global batch sizes.",
        **f)
    flags.DEFINE_list(
        "optimizers", list(SWEEP_OPTIMIZERS), "Optimizers to compare "
        f"(of {', '.join(SWEEP_OPTIMIZERS)}).", **f)
    flags.DEFINE_list(
        "lr_multipliers", ["0.3333", "1", "3", "9"], "The tuning budget: each "
        "optimizer's rate-rule centre is multiplied by each of these.", **f)
    flags.DEFINE_float("epochs", 2.0, "Epoch budget of every run.", **f)
    flags.DEFINE_integer(
        "recalibrate_bn_examples", 4096, "Before evaluating, recompute the "
        "BatchNorm moving statistics on this many training images with the "
        "final weights (0: keep the moving averages, which lag far behind "
        "the weights in runs of a few dozen steps).", **f)
    flags.DEFINE_float(
        "warmup_fraction", 0.15, "Fraction of the steps spent in linear "
        "warmup (at least one step), for every optimizer.", **f)
    flags.DEFINE_integer(
        "validation_examples", 5000, "Examples held out of the end of the "
        "training set to pick the learning rate.", **f)
    flags.DEFINE_integer(
        "train_examples", 0, "Train on the first N of the remaining "
        "training examples (0: all).", **f)
    flags.DEFINE_integer(
        "test_examples", 0, "Test on the first N test examples (0: all).",
        **f)
    flags.DEFINE_list("widths", ["8", "16", "32"], "small_resnet stage "
                      "widths.", **f)
    flags.DEFINE_integer("blocks_per_stage", 1, "small_resnet basic "
                         "blocks per stage.", **f)
    flags.DEFINE_integer("stem_stride", 2, "small_resnet stem stride.", **f)
    flags.DEFINE_integer("seed", 0, "Seed of the initial weights and of "
                         "the data order (the same for every run).", **f)


# ----------------------------------------------------------------------------
# One run.


def rate_centre(optimizer, batch_size):
    """Each optimizer's own learning-rate rule (the centre of its grid)."""
    if optimizer == "lars":
        return 10.0 * math.sqrt(batch_size / 8192)
    if optimizer == "lamb":
        return 1e-2 * math.sqrt(batch_size / 8192)
    if optimizer == "momentum":
        return 0.1 * batch_size / 256
    if optimizer == "nesterov":
        return 0.1 * math.sqrt(batch_size / 256)
    raise ValueError(
        f"Unknown optimizer {optimizer!r}; expected one of: "
        f"{', '.join(SWEEP_OPTIMIZERS)}."
    )


def make_run_optimizer(optimizer, peak_lr, multiplier, total_steps,
                       warmup_steps):
    """`(optimizer_fn, l2_in_loss)` of one sweep run."""
    import keras

    import keras_lamb
    from keras_lamb.recipes import RESNET_EXCLUDE
    from keras_lamb.schedules import WarmUp, warmup_polynomial_decay

    def poly():
        return warmup_polynomial_decay(
            peak_lr, total_steps, warmup_steps, power=2.0,
            schedule_step="after_warmup",
        )

    def optimizer_fn():
        if optimizer == "lars":
            return keras_lamb.LARS(
                poly(), momentum=0.9, weight_decay=1e-4,
                trust_coefficient=1e-3,
                exclude_from_weight_decay=RESNET_EXCLUDE,
                exclude_from_layer_adaptation=RESNET_EXCLUDE,
            )
        if optimizer == "lamb":
            return keras_lamb.LAMB(
                poly(), weight_decay=0.01,
                exclude_from_weight_decay=RESNET_EXCLUDE,
                exclude_from_layer_adaptation=RESNET_EXCLUDE,
            )
        if optimizer == "nesterov":
            return keras.optimizers.SGD(poly(), momentum=0.9, nesterov=True)
        # Goyal et al.: x0.1 at epochs 30, 60, 80 of 90, moved to the budget;
        # warmup from the batch-256 rate.
        boundaries = [round(e / 90 * total_steps) for e in (30, 60, 80)]
        boundaries = sorted({max(b, warmup_steps + 1) for b in boundaries})
        values = [peak_lr * 0.1**i for i in range(len(boundaries) + 1)]
        schedule = WarmUp(
            keras.optimizers.schedules.PiecewiseConstantDecay(
                boundaries, values),
            warmup_steps,
            initial_learning_rate=min(0.1 * multiplier, peak_lr),
        )
        return keras.optimizers.SGD(schedule, momentum=0.9)

    l2 = 1e-4 if optimizer in ("momentum", "nesterov") else 0.0
    return optimizer_fn, l2


def train_one(flags_, data, optimizer, batch_size, multiplier):
    """Trains one configuration; returns a row of `RUN_FIELDS`."""
    import keras
    import tensorflow as tf

    from keras_lamb.recipes import RESNET_EXCLUDE
    from tpu_scripts.resnet import models
    from tpu_scripts.resnet.data import ArrayInput
    from tpu_scripts.trainer import ClassificationTask, Trainer

    keras.backend.clear_session()  # each run starts from a clean graph
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = data
    train_input = ArrayInput(train_x, train_y, batch_size, True,
                             augmentation="none", seed=flags_.seed)
    val_input = ArrayInput(val_x, val_y, 1000, False)
    test_input = ArrayInput(test_x, test_y, 1000, False)
    total_steps = int(round(flags_.epochs * train_input.steps_per_epoch))
    warmup_steps = max(1, int(round(flags_.warmup_fraction * total_steps)))
    peak_lr = rate_centre(optimizer, batch_size) * multiplier
    optimizer_fn, l2 = make_run_optimizer(
        optimizer, peak_lr, multiplier, total_steps, warmup_steps
    )
    widths = [int(w) for w in flags_.widths]

    def model_fn():
        keras.utils.set_random_seed(flags_.seed)  # same initial weights
        return models.small_resnet(
            train_x.shape[1:], 10, widths=widths,
            blocks_per_stage=flags_.blocks_per_stage,
            stem_stride=flags_.stem_stride,
        )

    task = ClassificationTask(model_fn, 10, l2_weight_decay=l2,
                              l2_exclude=RESNET_EXCLUDE)
    trainer = Trainer(
        tf.distribute.get_strategy(), task, optimizer_fn, batch_size,
        steps_per_loop=train_input.steps_per_epoch, log=lambda *a, **k: None,
    )
    start = time.time()
    outcome = trainer.train(train_input, total_steps)
    if flags_.recalibrate_bn_examples:
        recalibrate_batchnorm(
            trainer.model, train_x[: flags_.recalibrate_bn_examples]
        )
    val = trainer.evaluate(val_input)["accuracy"]
    test = trainer.evaluate(test_input)["accuracy"]
    return dict(
        optimizer=optimizer, batch_size=batch_size,
        lr_multiplier=multiplier, peak_lr=peak_lr, val_accuracy=val,
        test_accuracy=test, train_loss=outcome["train"]["loss"],
        steps=total_steps, seconds=round(time.time() - start, 1),
    )


def recalibrate_batchnorm(model, images):
    """Sets every BatchNorm layer's moving mean and variance to the
    statistics of `images` (uint8 NHWC) under the current weights ("precise
    BN", Wu and Johnson 2021): one forward pass in training mode with the
    moving-average momentum at 0."""
    import keras

    from tpu_scripts.resnet.data import normalize

    layers = [layer for layer in model._flatten_layers()
              if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        model(normalize(images, images.shape[-1]), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


# ----------------------------------------------------------------------------
# Tables and plot.


def best_rows(runs):
    """The run with the best validation accuracy per (optimizer, batch)."""
    best = {}
    for row in runs:
        key = (row["optimizer"], int(row["batch_size"]))
        val = float(row["val_accuracy"])
        if math.isnan(val):
            val = -1.0
        if key not in best or val > best[key][0]:
            best[key] = (val, row)
    return {key: row for key, (_, row) in sorted(best.items())}


def write_tables(best, output_dir, protocol, command, total_seconds,
                 multipliers=(), settings=None):
    """Writes table.csv and table.md; a `*` marks a rate picked at an end of
    the grid `multipliers` (the optimum may lie beyond it). `settings` (the
    runs' `run_settings`) are stated under the table."""
    from tpu_scripts import run_state

    optimizers = [o for o in SWEEP_OPTIMIZERS
                  if any(k[0] == o for k in best)]
    batches = sorted({k[1] for k in best})
    table_csv = io.StringIO()
    writer = csv.writer(table_csv)
    writer.writerow(["optimizer", "batch_size", "peak_lr",
                     "lr_multiplier", "val_accuracy", "test_accuracy",
                     "steps"])
    for (opt, batch), row in best.items():
        writer.writerow([opt, batch, f"{float(row['peak_lr']):.4g}",
                         row["lr_multiplier"],
                         f"{float(row['val_accuracy']):.4f}",
                         f"{float(row['test_accuracy']):.4f}",
                         row["steps"]])
    lines = [
        "# Fashion-MNIST test accuracy vs global batch size",
        "",
        "Test accuracy (%) of the learning rate with the best validation "
        "accuracy; the picked peak rate in parentheses"
        + ("; `*`: picked at an end of the grid." if multipliers else "."),
        "",
        "| batch | steps | " + " | ".join(LABELS[o] for o in optimizers)
        + " |",
        "|---:|---:|" + "---:|" * len(optimizers),
    ]
    for batch in batches:
        cells = []
        steps = ""
        for opt in optimizers:
            row = best.get((opt, batch))
            if row is None:
                cells.append("")
                continue
            steps = row["steps"]
            edge = multipliers and float(row["lr_multiplier"]) in (
                min(multipliers), max(multipliers))
            cells.append(f"{100 * float(row['test_accuracy']):.2f} "
                         f"({float(row['peak_lr']):.3g}{'*' if edge else ''})")
        lines.append(f"| {batch} | {steps} | " + " | ".join(cells) + " |")
    run_state.write_text(os.path.join(output_dir, "table.csv"),
                         table_csv.getvalue())
    if settings:
        lines += ["", f"Settings of every run shown (id "
                  f"{settings_id(settings)}): "
                  + ", ".join(f"{k}={v}" for k, v in sorted(
                      settings.items())) + "."]
    lines += ["", "Protocol: " + protocol, "",
              f"Sweep time (sum of the runs): {total_seconds / 60:.1f} min.",
              "",
              "Command:", "", "```", command, "```", ""]
    run_state.write_text(os.path.join(output_dir, "table.md"),
                         "\n".join(lines))
    return "\n".join(lines)


def write_plot(best, output_dir, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    markers = {"lars": "o", "lamb": "s", "momentum": "^", "nesterov": "v"}
    for opt in SWEEP_OPTIMIZERS:
        points = sorted((b, 100 * float(r["test_accuracy"]))
                        for (o, b), r in best.items() if o == opt)
        if points:
            axes.plot(*zip(*points), marker=markers[opt], label=LABELS[opt])
    axes.set_xscale("log", base=2)
    batches = sorted({b for _, b in best})
    axes.set_xticks(batches, [str(b) for b in batches])
    axes.minorticks_off()
    axes.set_xlabel("global batch size")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    from tpu_scripts import run_state

    path = os.path.join(output_dir, "accuracy_vs_batch_size.png")
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    run_state.write_text(path, image.getvalue(), mode="wb")
    return path


def read_runs(path):
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        return list(csv.DictReader(io.StringIO(f.read())))


def write_runs(path, runs):
    """Writes every run to `path` (CSV) atomically."""
    from tpu_scripts import run_state

    text = io.StringIO()
    writer = csv.DictWriter(text, RUN_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(runs)
    run_state.write_text(path, text.getvalue())


def run_settings(flags_):
    """`{flag: value}` of `SETTING_FLAGS` (what a finished run is keyed
    by, with its optimizer, batch size and multiplier)."""
    return {name: (list(value) if isinstance(value, (list, tuple))
                   else value)
            for name in SETTING_FLAGS
            for value in [getattr(flags_, name)]}


def settings_id(settings):
    return hashlib.sha1(
        json.dumps(settings, sort_keys=True).encode()
    ).hexdigest()[:10]


def run_key(row):
    return (row.get("settings_id") or "", row["optimizer"],
            int(row["batch_size"]), float(row["lr_multiplier"]))


# ----------------------------------------------------------------------------


def sweep_output_dir(output_dir, sweep, allow_results_dir=False):
    """The folder a sweep writes to: `output_dir`, or, when empty, a fresh
    `runs/<sweep>-<UTC time>` (`/runs/` is not committed). Raises
    `run_state.FlagError` for a folder under the repository's `results/`
    unless `allow_results_dir`."""
    import tensorflow as tf

    from tpu_scripts import run_state

    if not output_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        output_dir = os.path.join("runs", f"{sweep}-{stamp}")
        suffix = 1
        while tf.io.gfile.exists(output_dir):
            suffix += 1
            output_dir = os.path.join("runs", f"{sweep}-{stamp}-{suffix}")
        return output_dir
    if "://" not in output_dir and not allow_results_dir:
        path = os.path.realpath(output_dir)
        results = os.path.realpath(RESULTS_DIR)
        if path == results or path.startswith(results + os.sep):
            raise run_state.FlagError(
                f"--output_dir={output_dir} is under the repository's "
                f"results/ ({results}), the committed results: a sweep "
                "would replace them. Leave --output_dir empty (a fresh "
                "runs/ folder), or pass --allow_results_dir to regenerate "
                "them.")
    return output_dir


def load_data(flags_):
    from tpu_scripts import run_state
    from tpu_scripts.resnet import data

    if not data.has_fashion_mnist(flags_.data_dir):
        raise run_state.FlagError(
            f"No Fashion-MNIST IDX files in {flags_.data_dir!r}: install "
            "them (`apt-get install dataset-fashion-mnist`) or pass "
            "--data_dir."
        )
    x, y = data.load_fashion_mnist(flags_.data_dir, "train")
    test_x, test_y = data.load_fashion_mnist(flags_.data_dir, "test")
    split = len(x) - flags_.validation_examples
    train = (x[:split], y[:split])
    if flags_.train_examples:
        train = (train[0][: flags_.train_examples],
                 train[1][: flags_.train_examples])
    if flags_.test_examples:
        test_x, test_y = (test_x[: flags_.test_examples],
                          test_y[: flags_.test_examples])
    return train, (x[split:], y[split:]), (test_x, test_y)


def protocol_text(flags_, data):
    train, val, test = data
    return (
        f"{len(train[0])} training, {len(val[0])} validation (held out of "
        f"the training set) and {len(test[0])} test images; small_resnet "
        f"widths {','.join(flags_.widths)}, {flags_.blocks_per_stage} "
        f"block(s) per stage, stem stride {flags_.stem_stride}; "
        f"{flags_.epochs:g} epochs for every run, no augmentation, "
        f"warmup {100 * flags_.warmup_fraction:g} % of the steps; "
        + (f"BatchNorm statistics recomputed on "
           f"{flags_.recalibrate_bn_examples} training images before "
           "evaluation; " if flags_.recalibrate_bn_examples else "")
        + "same "
        "initial weights and data order for every run. Tuning budget, the "
        f"same for every optimizer: {len(flags_.lr_multipliers)} learning "
        f"rates per batch size, the optimizer's rule times "
        f"{{{', '.join(flags_.lr_multipliers)}}}; rules: LARS "
        "10*sqrt(B/8192), LAMB 1e-2*sqrt(B/8192), momentum (Goyal) "
        "0.1*B/256, Nesterov 0.1*sqrt(B/256). The rate with the best "
        "validation accuracy is picked; its test accuracy is reported. "
        "One seed per configuration."
    )


def validate_flags(flags_):
    """Raises `run_state.FlagError` naming the flag for a bad value."""
    from tpu_scripts import run_state

    def check(name, ok, requirement):
        if not ok:
            raise run_state.FlagError(
                f"--{name} must be {requirement}. Received: "
                f"{getattr(flags_, name)!r}.")

    def numbers(values, kind):
        """`values` as `kind`, or `[]` if one is not a finite number."""
        try:
            parsed = [kind(v) for v in values]
        except ValueError:
            return []
        return parsed if all(math.isfinite(v) for v in parsed) else []

    for name in ("epochs", "warmup_fraction"):
        check(name, math.isfinite(getattr(flags_, name)), "a finite number")

    check("batch_sizes", flags_.batch_sizes and all(
        b > 0 for b in numbers(flags_.batch_sizes, int))
        and numbers(flags_.batch_sizes, int), "positive integers")
    check("lr_multipliers", flags_.lr_multipliers and all(
        m > 0 for m in numbers(flags_.lr_multipliers, float))
        and numbers(flags_.lr_multipliers, float), "positive finite numbers")
    check("optimizers", flags_.optimizers and set(flags_.optimizers)
          <= set(SWEEP_OPTIMIZERS), f"some of {', '.join(SWEEP_OPTIMIZERS)}")
    check("epochs", flags_.epochs > 0, "positive")
    check("warmup_fraction", 0 <= flags_.warmup_fraction < 1, "in [0, 1)")
    for name in ("recalibrate_bn_examples", "validation_examples",
                 "train_examples", "test_examples"):
        check(name, getattr(flags_, name) >= 0, ">= 0")
    for name in ("blocks_per_stage", "stem_stride"):
        check(name, getattr(flags_, name) >= 1, ">= 1")
    check("widths", flags_.widths and all(
        w > 0 for w in numbers(flags_.widths, int))
        and numbers(flags_.widths, int), "positive integers")


def run_sweep(flags_, argv, train=None, log=print):
    """Runs the configurations of `flags_` not yet in `runs.csv` with the
    same settings (`train`: `train_one`), then writes the table and plot.
    Returns the table text."""
    from tpu_scripts import run_state

    train = train or train_one
    validate_flags(flags_)
    out = sweep_output_dir(flags_.output_dir, "resnet_sweep",
                           flags_.allow_results_dir)
    command = "python -m tpu_scripts.resnet.sweep_batch_size " + " ".join(
        shlex.quote(a) for a in argv
    )
    log(f"Output: {out}/", flush=True)
    data = load_data(flags_)
    protocol = protocol_text(flags_, data)
    log("Protocol:", protocol, flush=True)
    settings = run_settings(flags_)
    current = settings_id(settings)
    runs_path = os.path.join(out, "runs.csv")
    runs = read_runs(runs_path)
    done = {run_key(r) for r in runs}
    configs = [(current, o, int(b), float(m)) for b in flags_.batch_sizes
               for o in flags_.optimizers for m in flags_.lr_multipliers]
    for i, key in enumerate(configs, 1):
        if key in done:
            continue
        _, opt, batch, mult = key
        row = dict(train(flags_, data, opt, batch, mult),
                   settings_id=current,
                   settings=json.dumps(settings, sort_keys=True))
        runs.append(row)
        write_runs(runs_path, runs)
        log(f"[{i}/{len(configs)}] {opt:8s} batch {batch:5d} lr "
            f"{row['peak_lr']:.4g} (x{mult:g}): val "
            f"{row['val_accuracy']:.4f} test {row['test_accuracy']:.4f} "
            f"train loss {row['train_loss']:.4f}, {row['steps']} steps, "
            f"{row['seconds']:.0f} s", flush=True)
    shown = [r for r in runs if run_key(r) in set(configs)]
    total = sum(float(r["seconds"]) for r in shown)
    best = best_rows(shown)
    table = write_tables(best, out, protocol, command, total,
                         [float(m) for m in flags_.lr_multipliers], settings)
    title = (f"Fashion-MNIST, small ResNet, {flags_.epochs:g} epochs, best "
             f"of {len(flags_.lr_multipliers)} learning rates per point")
    plot = write_plot(best, out, title)
    # Last: a command.txt says that the sweep it names finished.
    run_state.write_text(os.path.join(out, "command.txt"), command + "\n")
    log(table)
    log(f"Wrote {out}/table.md, table.csv, runs.csv, command.txt, {plot}.")
    return table


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.ERROR)  # not TF's per-run retracing notes
    from tpu_scripts import run_state

    run_state.exit_on_flag_error(run_sweep, flags.FLAGS, sys.argv[1:])


if __name__ == "__main__":
    define_flags()
    app.run(main)
