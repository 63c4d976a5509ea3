"""Draws docs/trust_ratios.png: per-layer ||w||/||g|| of a small net trained
with LARS on scikit-learn's 8x8 digits (no download, about a minute on CPU).

    python benchmarks/trust_ratio_figure.py --output docs/trust_ratios.png

Prints the plotted ratios per layer and step, and the test accuracy.

    python benchmarks/trust_ratio_figure.py --spread_seeds=0,1,2,3,4

trains once per seed (the seed picks the split and the initial weights) and
prints, as min / median / max over the seeds, the test accuracy and the
conv1 and fc6 kernel ratios at steps 1, 90, 180 and 360: the spread the docs
publish. Op determinism is on: a rerun on the same machine and versions
prints the same numbers; another CPU sums floats in another order.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_lamb  # noqa: E402
from keras_lamb.callbacks import TrustRatioMonitor  # noqa: E402
from keras_lamb.schedules import warmup_polynomial_decay  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("output", "docs/trust_ratios.png",
                        "Where to write the PNG.")
    flags.DEFINE_integer("epochs", 60, "Training epochs.")
    flags.DEFINE_integer("batch_size", 256, "Global batch size.")
    flags.DEFINE_float("peak_learning_rate", 2.0, "LARS peak rate.")
    flags.DEFINE_integer("warmup_epochs", 5, "Linear warmup epochs.")
    flags.DEFINE_integer("every_n_steps", 10, "Monitor period in steps.")
    flags.DEFINE_integer("seed", 0, "Random seed (data split and init).")
    flags.DEFINE_list("spread_seeds", [], "Train once per seed and print "
                      "the spread of the statistics instead of drawing.")


def load_data(seed):
    """Digits as (8, 8, 1) images in [0, 1], split 80/20."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    return train_test_split(x, digits.target, test_size=0.2,
                            random_state=seed, stratify=digits.target)


def build_model():
    """Six weight layers, named so the plot's labels read in order."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
        layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3"),
        layers.Flatten(),
        layers.Dense(64, activation="relu", name="fc4"),
        layers.Dense(32, activation="relu", name="fc5"),
        layers.Dense(10, name="fc6"),
    ])


def train(epochs, batch_size, peak_learning_rate, warmup_epochs,
          every_n_steps, seed):
    """Trains with LARS and a TrustRatioMonitor; returns (monitor, accuracy)."""
    keras.utils.set_random_seed(seed)
    x_train, x_test, y_train, y_test = load_data(seed)
    steps_per_epoch = -(-len(x_train) // batch_size)
    schedule = warmup_polynomial_decay(
        peak_learning_rate,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=warmup_epochs * steps_per_epoch,
        end_learning_rate=1e-4,
        power=2.0,
        schedule_step="after_warmup",
    )
    optimizer = keras_lamb.LARS(
        learning_rate=schedule,
        exclude_from_weight_decay="bias",
        exclude_from_layer_adaptation="bias",
        track_trust_ratios=True,
    )
    model = build_model()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    monitor = TrustRatioMonitor(every_n_steps=every_n_steps)
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs,
              callbacks=[monitor], verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return monitor, accuracy


def kernel_ratios(monitor, steps=(1, 90, 180, 360)):
    """`{step: {layer: ||w|| / ||g||}}` of the kernels at `steps`."""
    out = {}
    for step, stats in monitor.records:
        if step in steps:
            out[step] = {path.split("/")[-2]: s["weight_norm"] / s["update_norm"]
                         for path, s in stats.items()
                         if path.endswith("kernel") and s["update_norm"] > 0}
    return out


def spread_table(seeds):
    rows, orders = {}, []
    for seed in seeds:
        monitor, accuracy = train(
            FLAGS.epochs, FLAGS.batch_size, FLAGS.peak_learning_rate,
            FLAGS.warmup_epochs, FLAGS.every_n_steps, seed)
        rows.setdefault("test accuracy", []).append(accuracy)
        by_step = kernel_ratios(monitor)
        for step, ratios in by_step.items():
            for layer in ("conv1", "fc6"):
                rows.setdefault(f"{layer} kernel, step {step}", []).append(
                    ratios[layer])
            rows.setdefault(f"conv1 / fc6, step {step}", []).append(
                ratios["conv1"] / ratios["fc6"])
        last = by_step[max(by_step)]
        order = sorted(last, key=last.get)
        orders.append(f"seed {seed} at step {max(by_step)}, smallest to "
                      f"largest: {', '.join(order)}")
        print(f"seed {seed}: test accuracy {accuracy:.4f}", flush=True)
    lines = [f"min / median / max over seeds {', '.join(map(str, seeds))}:",
             "", "| statistic | min | median | max |", "|---|---:|---:|---:|"]
    for name, values in rows.items():
        v = np.asarray(values)
        lines.append(f"| {name} | {v.min():.3g} | {np.median(v):.3g} | "
                     f"{v.max():.3g} |")
    print("\n".join(lines + [""] + orders))


def main(_):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    if FLAGS.spread_seeds:
        spread_table([int(s) for s in FLAGS.spread_seeds])
        return
    monitor, accuracy = train(
        FLAGS.epochs, FLAGS.batch_size, FLAGS.peak_learning_rate,
        FLAGS.warmup_epochs, FLAGS.every_n_steps, FLAGS.seed,
    )
    figure = keras_lamb.plot.trust_ratios(
        monitor, path=FLAGS.output, panels=["kernel", "bias"],
        title=rf"LARS on 8x8 digits, batch {FLAGS.batch_size}: "
              r"$\|w\| / \|g\|$ per variable" "\n"
              "(biases excluded from weight decay and layer adaptation)",
    )
    plotted = [int(line.get_label().split()[-1])
               for line in figure.axes[0].get_lines()]
    print(f"wrote {FLAGS.output}; test accuracy {accuracy:.4f}")
    print("||w|| / ||g|| per variable at the plotted steps:")
    for step, stats in monitor.records:
        if step not in plotted:
            continue
        ratios = {
            "/".join(path.split("/")[-2:]): s["weight_norm"] / s["update_norm"]
            for path, s in stats.items()
            if s["weight_norm"] > 0 and s["update_norm"] > 0
        }
        values = np.array(list(ratios.values()))
        print(f"step {step:4d}: " + "  ".join(
            f"{name}={r:.3g}" for name, r in ratios.items())
            + f"  max/min={values.max() / values.min():.3g}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
