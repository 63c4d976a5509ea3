"""Run by test_distribute.py in a fresh process: trains the same model on one
device and under MirroredStrategy over 2 logical CPU devices at the same global
batch, and prints the largest weight difference as JSON.

One MirroredStrategy per process: a second one that all-reduces sparse
gradients fails in TF 2.21 ("Shape mismatch in the collective instance").
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lamb  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 4


def make_optimizer(name):
    if name == "lamb":
        return keras_lamb.LAMB(
            learning_rate=0.02, weight_decay=0.01, track_trust_ratios=True,
            exclude_from_weight_decay="bias", exclude_from_layer_adaptation="bias")
    return keras_lamb.LARS(
        learning_rate=0.1, trust_coefficient=0.02, nesterov=True,
        track_trust_ratios=True,
        exclude_from_weight_decay="bias", exclude_from_layer_adaptation="bias")


def make_model(kind):
    keras.utils.set_random_seed(1)
    if kind == "dense":
        return keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1)])
    return keras.Sequential([
        keras.Input((5,), dtype="int32"), keras.layers.Embedding(40, 8),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])


def make_data(kind):
    rng = np.random.default_rng(0)
    n = GLOBAL_BATCH * STEPS
    if kind == "dense":
        x = rng.standard_normal((n, 6)).astype("float32")
    else:
        x = rng.integers(0, 40, size=(n, 5)).astype("int32")
    y = rng.standard_normal((n, 1)).astype("float32")
    return x, y


def train(kind, opt_name, strategy):
    x, y = make_data(kind)
    with strategy.scope():
        model = make_model(kind)
        model.compile(optimizer=make_optimizer(opt_name), loss="mse")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    model.fit(data, epochs=1, verbose=0, shuffle=False)
    stats = [s["trust_ratio"] for s in model.optimizer.trust_ratio_stats().values()]
    return model.get_weights(), stats


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    report = {}
    for kind in ("dense", "embedding"):
        for opt_name in ("lamb", "lars"):
            one, one_stats = train(kind, opt_name, tf.distribute.get_strategy())
            two, two_stats = train(kind, opt_name, mirrored)
            moved = max(float(np.max(np.abs(a - b))) for a, b in
                        zip(one, make_model(kind).get_weights()))
            report[f"{kind}/{opt_name}"] = {
                "max_weight_diff": max(
                    float(np.max(np.abs(a - b))) for a, b in zip(one, two)),
                "max_trust_ratio_diff": max(
                    abs(a - b) for a, b in zip(one_stats, two_stats)),
                "weights_moved": moved,
            }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
