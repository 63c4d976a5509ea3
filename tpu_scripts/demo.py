r"""LARS and LAMB vs momentum and Adam, at a small batch and with every
training example in one batch: 38 s on a 2-vCPU AMD EPYC, offline.

    python -m tpu_scripts.demo

trains on scikit-learn's bundled 8x8 handwritten digits (1,797 images, ships
inside scikit-learn: no download) with `keras.Model.fit`, prints the loss as
it falls, and ends with a table of test accuracies. Every optimizer trains the
same model from the same initial weights for the same number of epochs, so
at the full batch it gets far fewer steps. Learning rates: at the small batch
one standard rate per optimizer; at the full batch that rate scaled by the
optimizer's own rule (`keras_lamb.recipes.scale_learning_rate`), times each
of `--full_batch_lr_multipliers` (the same grid for every optimizer: 1/16,
1/4, 1, 4), keeping the rate with the lowest final training loss (the test set
is not used to choose); a second table shows every rate tried, i.e. how
sensitive each optimizer is to its scaling rule. Every run warms up linearly,
then decays (cosine). The same numbers are drawn in `--plot` (default
`demo.png`): test accuracy against peak learning rate, one line per
optimizer, the small batch and the full batch side by side.

    python -m tpu_scripts.demo --dataset=fashion_mnist

switches to Fashion-MNIST: the IDX files in `--data_dir` or
/usr/share/datasets/fashion-mnist (Debian/Ubuntu: `apt-get install
dataset-fashion-mnist`) when present, else TFDS (needs the network).

Context: the LARS authors' MNIST logs at batch 60k (the full training set)
report momentum 93.7 %, LARS 97.7 %, LAMB 98.9 %.
"""

import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
    sys.path.insert(
        0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

DEMO_OPTIMIZERS = ("lars", "lamb", "momentum", "adam")
DATASETS = ("digits", "fashion_mnist")
DATASET_TITLES = {"digits": "scikit-learn digits (8x8)",
                  "fashion_mnist": "Fashion-MNIST"}
SYSTEM_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Per optimizer: the rate at the small batch, and how it scales with the
# batch (keras_lamb.recipes.scale_learning_rate): linear for momentum
# (Goyal et al.), square root for Adam and LAMB (You et al. 2019), square
# root for LARS (the MLPerf table's peak rates grow roughly so).
DEMO_SETTINGS = {
    "lars": dict(learning_rate=2.0, rule="sqrt"),
    "lamb": dict(learning_rate=4e-3, rule="sqrt"),
    "momentum": dict(learning_rate=0.05, rule="linear"),
    "adam": dict(learning_rate=2e-3, rule="sqrt"),
}


def define_flags(flag_values=flags.FLAGS):
    """Defines every flag of the demo on `flag_values`."""
    f = dict(flag_values=flag_values)
    flags.DEFINE_enum(
        "dataset", "digits", DATASETS, "digits: scikit-learn's bundled 8x8 "
        "digits (offline). fashion_mnist: IDX files from --data_dir or "
        f"{SYSTEM_FASHION_MNIST_DIR}, else TFDS.", **f)
    flags.DEFINE_string(
        "data_dir", None, "Directory of the Fashion-MNIST IDX files "
        f"(default: {SYSTEM_FASHION_MNIST_DIR}).", **f)
    flags.DEFINE_integer(
        "epochs", 0, "Epochs for every run (0: 60 for digits, 20 for "
        "Fashion-MNIST). A small value gives a quick smoke run.", **f)
    flags.DEFINE_integer("small_batch_size", 32, "The small batch.", **f)
    flags.DEFINE_list(
        "optimizers", list(DEMO_OPTIMIZERS), "Optimizers to compare (of "
        f"{', '.join(DEMO_OPTIMIZERS)}).", **f)
    flags.DEFINE_list(
        "full_batch_lr_multipliers", ["0.0625", "0.25", "1", "4"],
        "At the full "
        "batch, each optimizer tries its scaled rate times each of these "
        "and keeps the lowest final training loss.", **f)
    flags.DEFINE_float(
        "warmup_fraction", 0.1, "Fraction of the steps spent in linear "
        "warmup.", **f)
    flags.DEFINE_integer(
        "train_examples", 0, "Use only the first N training examples (0: "
        "all).", **f)
    flags.DEFINE_integer("seed", 0, "Seed of the split, the initial "
                         "weights and the data order.", **f)
    flags.DEFINE_string(
        "plot", "demo.png", "Where to write the plot of test accuracy "
        "against peak learning rate, per optimizer, small and full batch "
        "side by side (the extension picks the format: png, svg, pdf). "
        "Empty: no plot.", **f)


# ----------------------------------------------------------------------------
# Data.


def load_digits(seed=0):
    """scikit-learn's 8x8 digits, 80/20 split by class: float32 images
    scaled to [0, 1], flattened."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    source = ("scikit-learn's bundled digits (sklearn.datasets.load_digits, "
              "1,797 8x8 images)")
    return (x_train, y_train), (x_test, y_test), source


def load_fashion_mnist(data_dir=None):
    """Fashion-MNIST from IDX files, else TFDS; a clear error when neither
    is available. Returns flattened float32 images in [0, 1]."""
    directory = data_dir or SYSTEM_FASHION_MNIST_DIR
    from tpu_scripts.resnet import data  # the IDX reader

    if data.has_fashion_mnist(directory):
        train = data.load_fashion_mnist(directory, "train")
        test = data.load_fashion_mnist(directory, "test")
        source = f"Fashion-MNIST IDX files in {directory}"
    else:
        try:
            import tensorflow_datasets as tfds

            train, test = tfds.as_numpy(tfds.load(
                "fashion_mnist", split=["train", "test"], batch_size=-1,
                as_supervised=True,
            ))
            source = "Fashion-MNIST from TFDS"
        except Exception as e:  # no network, no tfds, ...
            raise SystemExit(
                f"No Fashion-MNIST available: no IDX files in {directory} "
                f"and TFDS failed ({type(e).__name__}: {str(e)[:200]}).\n"
                "Install the offline files with `apt-get install "
                "dataset-fashion-mnist` (Debian/Ubuntu; they go to "
                f"{SYSTEM_FASHION_MNIST_DIR}), pass --data_dir=DIR with the "
                "four IDX files, or connect to the network for TFDS. The "
                "default `--dataset=digits` needs nothing."
            ) from None

    def flat(split):
        images, labels = split
        images = np.asarray(images, "float32").reshape(len(images), -1)
        return images / 255.0, np.asarray(labels, "int32")

    return flat(train), flat(test), source


# ----------------------------------------------------------------------------
# Training.


def build_model(input_dim, num_classes):
    """A 2-hidden-layer MLP, as in the LARS authors' MNIST runs: no batch
    norm, so nothing but the optimizer keeps the layers' steps in scale."""
    import keras

    return keras.Sequential([
        keras.Input((input_dim,)),
        keras.layers.Dense(256, activation="relu", name="hidden_1"),
        keras.layers.Dense(256, activation="relu", name="hidden_2"),
        keras.layers.Dense(num_classes, name="logits"),
    ], name="mlp")


def make_optimizer(name, batch_size, small_batch_size, total_steps,
                   warmup_fraction, multiplier=1.0):
    """The optimizer `name` with its scaled rate (times `multiplier`),
    warmup and cosine decay; returns `(optimizer, peak_rate)`."""
    import keras

    import keras_lamb
    from keras_lamb.recipes import scale_learning_rate
    from keras_lamb.schedules import WarmUp

    settings = DEMO_SETTINGS[name]
    peak = multiplier * scale_learning_rate(
        settings["learning_rate"], small_batch_size, batch_size,
        settings["rule"])
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    schedule = WarmUp(
        keras.optimizers.schedules.CosineDecay(
            peak, max(1, total_steps - warmup)),
        warmup, schedule_step="after_warmup",
    )
    if name == "lars":
        optimizer = keras_lamb.LARS(
            schedule, momentum=0.9, weight_decay=1e-4,
            exclude_from_weight_decay="bias",
            exclude_from_layer_adaptation="bias",
        )
    elif name == "lamb":
        optimizer = keras_lamb.LAMB(
            schedule, weight_decay=1e-4, exclude_from_weight_decay="bias",
            exclude_from_layer_adaptation="bias",
        )
    elif name == "momentum":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    elif name == "adam":
        optimizer = keras.optimizers.Adam(schedule)
    else:
        raise ValueError(
            f"Unknown optimizer {name!r}; expected one of: "
            f"{', '.join(DEMO_OPTIMIZERS)}."
        )
    return optimizer, peak


def epochs_dataset(x, y, batch_size, epochs, seed):
    """All epochs as one `tf.data` stream (reshuffled every epoch, last
    partial batch kept, as `fit(x, y, shuffle=True)` does): one `fit` epoch
    instead of `epochs`, which saves Keras's per-epoch setup (most of the time
    of a 60-step full-batch run)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if batch_size < len(x):
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).repeat(epochs)


def train_one(name, batch_size, train, test, epochs, small_batch_size,
              warmup_fraction, seed, log, multiplier=1.0):
    """Trains one (optimizer, batch) with `fit`; returns the results."""
    import keras

    (x_train, y_train), (x_test, y_test) = train, test
    keras.utils.set_random_seed(seed)  # same initial weights for every run
    model = build_model(x_train.shape[1], int(y_train.max()) + 1)
    steps_per_epoch = -(-len(x_train) // batch_size)
    optimizer, peak = make_optimizer(
        name, batch_size, small_batch_size, epochs * steps_per_epoch,
        warmup_fraction, multiplier,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_epoch,  # one call per epoch
        # XLA compilation costs more than it saves for these small runs.
        jit_compile=False,
    )
    every = max(1, epochs // 4)

    class Progress(keras.callbacks.Callback):
        """Prints an epoch's mean loss every `every` epochs."""

        epoch, last_loss = 0, float("nan")

        def on_train_batch_end(self, batch, logs=None):
            self.epoch += 1  # one execution = one epoch (steps_per_execution)
            self.last_loss = float(logs["loss"])
            if self.epoch % every == 0 or self.epoch == 1:
                log(f"  {name:8s} batch {batch_size:5d} lr {peak:<7.3g} epoch "
                    f"{self.epoch:3d}/{epochs}  loss {logs['loss']:.4f}  "
                    f"train accuracy {logs['accuracy']:.3f}")
            self.model.reset_metrics()  # the next logs cover one epoch

    start = time.time()
    progress = Progress()
    model.fit(epochs_dataset(x_train, y_train, batch_size, epochs, seed),
              epochs=1, shuffle=False, verbose=0, callbacks=[progress])
    logits = keras.ops.convert_to_numpy(model(x_test, training=False))
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))
    log(f"  {name:8s} batch {batch_size:5d} lr {peak:<7.3g} test accuracy "
        f"{100 * accuracy:.1f} % ({time.time() - start:.0f} s)")
    return dict(optimizer=name, batch_size=batch_size, peak_lr=peak,
                multiplier=multiplier, steps=epochs * steps_per_epoch,
                test_accuracy=accuracy, final_loss=progress.last_loss,
                seconds=time.time() - start)


def format_grid_table(tried, multipliers):
    """Full-batch test accuracy of every rate tried, per optimizer."""
    rows = ["| optimizer | " + " | ".join(f"rule x {m:g}" for m in multipliers)
            + " |", "|---|" + "---:|" * len(multipliers)]
    for name, runs in tried.items():
        rows.append(f"| {name} | " + " | ".join(
            f"{100 * r['test_accuracy']:.1f} % (lr {r['peak_lr']:.3g})"
            for r in runs) + " |")
    return "\n".join(rows)


def format_table(results, small_batch_size, full_batch_size):
    rows = [
        "| optimizer | batch "
        f"{small_batch_size} | batch {full_batch_size} (full) |",
        "|---|---:|---:|",
    ]
    for name in dict.fromkeys(r["optimizer"] for r in results):
        cells = []
        for batch in (small_batch_size, full_batch_size):
            r = next((r for r in results if r["optimizer"] == name
                      and r["batch_size"] == batch), None)
            cells.append("" if r is None else
                         f"{100 * r['test_accuracy']:.1f} % "
                         f"(lr {r['peak_lr']:.3g}, {r['steps']} steps)")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------
# The plot.

# One colour (Okabe-Ito, readable with colour-blindness) and marker each.
STYLES = {
    "lars": dict(color="#0072B2", marker="o", label="LARS"),
    "lamb": dict(color="#D55E00", marker="s", label="LAMB"),
    "momentum": dict(color="#009E73", marker="^", label="SGD + momentum"),
    "adam": dict(color="#CC79A7", marker="D", label="Adam"),
}


def check_plot_path(path):
    """Raises `app.UsageError` naming `--plot` when the plot could not be
    written (no matplotlib, an unknown extension, a parent that is a file or
    read-only), before any training."""
    if not path:
        return
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise app.UsageError(
            "--plot needs matplotlib (`pip install matplotlib`, part of the "
            "`scripts` extra); pass --plot= to run without the plot."
        ) from None
    formats = sorted(Figure().canvas.get_supported_filetypes())
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        raise app.UsageError(
            f"--plot={path!r} must end in a format matplotlib writes: "
            f"{', '.join('.' + f for f in formats)}."
        )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the folders still to make
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise app.UsageError(
            f"--plot={path!r}: cannot write under {parent} (not a writable "
            "directory)."
        )


def _fraction(multiplier):
    """0.0625 -> '1/16', 4.0 -> '4'."""
    from fractions import Fraction

    return str(Fraction(multiplier).limit_denominator(1000))


def plot_accuracy_vs_learning_rate(results, tried, small_batch_size,
                                   full_batch_size, title, chance=None):
    """Test accuracy against peak learning rate (log axis), one line per
    optimizer: the small batch on the left, the full batch on the right with
    every rate tried and the kept one (lowest final training loss) ringed.

    Args:
        results: the runs of the final table (`train_one`'s dicts).
        tried: `{optimizer: [full-batch runs]}`, every rate tried.
        small_batch_size, full_batch_size: the two batch sizes.
        title: the figure's title.
        chance: `None` or the accuracy (%) of guessing, drawn as a dotted
            line: where diverged runs end up.

    Returns:
        A `matplotlib.figure.Figure` (Agg canvas; no pyplot state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    small_axes, full_axes = figure.subplots(1, 2, sharex=True, sharey=True)
    small = {name: [r for r in results if r["optimizer"] == name
                    and r["batch_size"] == small_batch_size]
             for name in tried}
    kept = [r for r in results if r["batch_size"] == full_batch_size]
    for axes, runs_by_optimizer in ((small_axes, small), (full_axes, tried)):
        for name, runs in runs_by_optimizer.items():
            runs = sorted(runs, key=lambda r: r["peak_lr"])
            axes.plot([r["peak_lr"] for r in runs],
                      [100 * r["test_accuracy"] for r in runs],
                      linewidth=1.8, markersize=7, **STYLES[name])
        axes.set_xscale("log")
        axes.set_xlabel("peak learning rate (log scale)")
        axes.grid(True, which="major", alpha=0.4)
        axes.grid(True, which="minor", axis="x", alpha=0.12)
    _write_values(small_axes, [r for runs in small.values() for r in runs])
    if chance is not None:
        for axes in (small_axes, full_axes):
            axes.axhline(chance, color="0.45", linestyle=":", linewidth=1.2)
        small_axes.annotate("chance: where a diverged run ends", (1, chance),
                            xycoords=("axes fraction", "data"),
                            textcoords="offset points", xytext=(-4, 5),
                            ha="right", fontsize=9, color="0.35")
    for run in kept:
        full_axes.plot(run["peak_lr"], 100 * run["test_accuracy"], marker="o",
                       markersize=16, markerfacecolor="none",
                       markeredgewidth=1.6, linestyle="none",
                       color=STYLES[run["optimizer"]]["color"])
    multipliers = sorted({r["multiplier"] for runs in tried.values()
                          for r in runs})
    small_axes.set_title(f"batch {small_batch_size}: one standard rate per "
                         "optimizer", fontsize=11)
    full_axes.set_title(
        f"full batch {full_batch_size}: scaled rate × "
        f"{', '.join(_fraction(m) for m in multipliers)}", fontsize=11)
    small_axes.set_ylabel("test accuracy (%)")
    handles = [Line2D([], [], linewidth=1.8, markersize=7, **STYLES[name])
               for name in tried]
    handles.append(Line2D([], [], marker="o", markersize=13,
                          markerfacecolor="none", markeredgewidth=1.6,
                          linestyle="none", color="0.3",
                          label="kept (lowest final training loss)"))
    figure.legend(handles=handles, loc="outside lower center",
                  ncols=len(handles), fontsize=10, frameon=False)
    figure.suptitle(title, fontsize=12)
    return figure


def _write_values(axes, runs):
    """Writes each run's accuracy under its marker, on two alternating rows
    (neighbouring rates can be close on the log axis)."""
    for i, r in enumerate(sorted(runs, key=lambda r: r["peak_lr"])):
        axes.annotate(f"{100 * r['test_accuracy']:.1f} %",
                      (r["peak_lr"], 100 * r["test_accuracy"]),
                      textcoords="offset points",
                      xytext=(0, -18 - 14 * (i % 2)),
                      ha="center", fontsize=9,
                      color=STYLES[r["optimizer"]]["color"])


def save_figure(figure, path):
    """Writes `figure` to `path` (format from the extension) atomically:
    a reader never sees half a file. Returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        figure.savefig(temp, dpi=150)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path


def run(flags_, log=print):
    """The whole demo; returns the list of results."""
    return run_with_grid(flags_, log)[0]


def run_with_grid(flags_, log=print):
    """The whole demo; returns `(results, tried)`: the kept runs, and
    `{optimizer: [the full-batch run of each rate multiplier]}`."""
    for name in flags_.optimizers:
        if name not in DEMO_OPTIMIZERS:
            raise app.UsageError(
                f"Unknown optimizer {name!r} in --optimizers; expected "
                f"{', '.join(DEMO_OPTIMIZERS)}."
            )
    check_plot_path(flags_.plot)
    if flags_.dataset == "digits":
        train, test, source = load_digits(flags_.seed)
        epochs = flags_.epochs or 60
    else:
        train, test, source = load_fashion_mnist(flags_.data_dir)
        epochs = flags_.epochs or 20
    if flags_.train_examples:
        train = tuple(a[: flags_.train_examples] for a in train)
    full = len(train[0])
    log(f"Data: {source}; {full} training, {len(test[0])} test examples.")
    log(f"Each run: {epochs} epochs, warmup "
        f"{100 * flags_.warmup_fraction:g} % then cosine decay; batch "
        f"{flags_.small_batch_size} and the full batch {full}.")
    multipliers = [float(m) for m in flags_.full_batch_lr_multipliers]
    log(f"Full batch: each optimizer's scaled rate times "
        f"{', '.join(flags_.full_batch_lr_multipliers)}; the lowest final "
        "training loss is kept.")
    _deterministic_ops()
    start, results, tried = time.time(), [], {}
    for name in flags_.optimizers:
        results.append(train_one(
            name, flags_.small_batch_size, train, test, epochs,
            flags_.small_batch_size, flags_.warmup_fraction, flags_.seed, log,
        ))
    for name in flags_.optimizers:
        tried[name] = [
            train_one(name, full, train, test, epochs,
                      flags_.small_batch_size, flags_.warmup_fraction,
                      flags_.seed, log, multiplier)
            for multiplier in multipliers
        ]
        results.append(min(tried[name],
                           key=lambda r: _loss_key(r["final_loss"])))
    log("")
    log(f"Full batch ({full}), test accuracy of every rate tried:")
    log(format_grid_table(tried, multipliers))
    log("")
    log(f"Test accuracy after {epochs} epochs (peak learning rate, steps); "
        "full batch: the rate with the lowest final training loss:")
    log(format_table(results, flags_.small_batch_size, full))
    log(f"Total time {time.time() - start:.0f} s.")
    if flags_.plot:
        title = (f"Test accuracy against peak learning rate: "
                 f"{DATASET_TITLES[flags_.dataset]}, {full:,} training / "
                 f"{len(test[0]):,} test examples, {epochs} epochs per run")
        figure = plot_accuracy_vs_learning_rate(
            results, tried, flags_.small_batch_size, full, title,
            chance=100 / (int(train[1].max()) + 1))
        log(f"Plot: {save_figure(figure, flags_.plot)}")
    return results, tried


def _deterministic_ops():
    """Same numbers on every run of the demo (TensorFlow backend)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _loss_key(loss):
    return loss if np.isfinite(loss) else float("inf")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(flags.FLAGS, log=lambda *a: print(*a, flush=True))


if __name__ == "__main__":
    define_flags()
    app.run(main)
