"""Run by test_distribute.py in fresh processes: the same training on one
device and on 2 replicas (2 logical CPU devices, or 2 workers on 127.0.0.1)
at the same global batch, for each training option.

    python distributed_check.py fit            # Model.fit: JSON report
    python distributed_check.py trainer OUT    # tpu_scripts' Trainer
    python distributed_check.py worker OUT     # one MultiWorkerMirrored worker
                                               # (TF_CONFIG set by the caller)

`fit` and `trainer` print one JSON line `{case: max |w_one - w_two|}` with
the weights moved and negative controls; `trainer` and `worker` also save
their final weights as `.npz` in OUT. One MirroredStrategy per process: a
second one that all-reduces sparse gradients fails in TF 2.21 ("Shape
mismatch in the collective instance").
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tensorflow as tf  # noqa: E402

if sys.argv[1] != "worker":
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lamb  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 8
VOCABULARY = 40

# Model.fit cases: optimizer keywords on top of the base settings.
FIT_CASES = {
    "plain": {},
    "global_clipnorm": dict(global_clipnorm=1e-2),
    "clipnorm": dict(clipnorm=1e-2),
    "clipvalue": dict(clipvalue=1e-3),
    "accumulation": dict(gradient_accumulation_steps=2),
    "accumulation+global_clipnorm": dict(
        gradient_accumulation_steps=2, global_clipnorm=1e-2
    ),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
}
LARS_FIT_CASES = ("plain", "accumulation+global_clipnorm")


class PerReplicaClipping:
    """Negative control: Keras's own order under tf.distribute (clip each
    replica's gradient, then all-reduce), which the library replaces."""

    def _backend_apply_gradients(self, grads, trainable_variables):
        return keras.optimizers.Optimizer._backend_apply_gradients(
            self, grads, trainable_variables
        )


def make_optimizer(name, control=False, loss_scale=False, **options):
    if name == "lamb":
        cls, base = keras_lamb.LAMB, dict(learning_rate=0.05)
    else:
        cls, base = keras_lamb.LARS, dict(
            learning_rate=0.1, trust_coefficient=0.02)
    if control:
        cls = type(f"PerReplica{cls.__name__}", (PerReplicaClipping, cls), {})
    optimizer = cls(
        weight_decay=0.01, exclude_from_weight_decay="bias",
        exclude_from_layer_adaptation="bias|embeddings",
        track_trust_ratios=True, **base, **options,
    )
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_model(kind):
    keras.utils.set_random_seed(1)
    if kind == "dense":
        return keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1)])
    # Embedding: sparse (IndexedSlices) gradients with repeated indices.
    return keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(VOCABULARY, 8),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(4)])


def make_data(kind, steps=STEPS):
    rng = np.random.default_rng(0)
    n = GLOBAL_BATCH * steps
    if kind == "dense":
        x = rng.standard_normal((n, 6)).astype("float32")
        return x, rng.standard_normal((n, 1)).astype("float32")
    x = rng.integers(0, VOCABULARY, size=(n, 5)).astype("int32")
    return x, rng.integers(0, 4, size=n).astype("int32")


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# ------------------------------------------------------------------ fit


def fit(kind, name, strategy, batch=GLOBAL_BATCH, **options):
    x, y = make_data(kind)
    with strategy.scope():
        model = make_model(kind)
        model.compile(
            optimizer=make_optimizer(name, **options),
            loss="mse" if kind == "dense" else keras.losses.
            SparseCategoricalCrossentropy(from_logits=True),
        )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    ratios = [s["trust_ratio"] for s in inner.trust_ratio_stats().values()]
    return model.get_weights(), ratios


def fit_report():
    one_device = tf.distribute.get_strategy()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {}

    def compare(case, kind, name, one_options, two_options):
        one, one_ratios = fit(kind, name, one_device, **one_options)
        two, two_ratios = fit(kind, name, mirrored, **two_options)
        report[case] = {
            "weight_diff": max_diff(one, two),
            "trust_ratio_diff": max(
                abs(a - b) for a, b in zip(one_ratios, two_ratios)),
            "moved": max_diff(one, make_model(kind).get_weights()),
        }

    # Clipping, accumulation and EMA under a strategy are the shared code
    # of keras_lamb/tf_distribute.py: every option with LAMB; LARS (its own
    # update step, run per device, also inside the accumulation branch)
    # plain and with accumulation and the clip.
    for name, options in (("lamb", FIT_CASES), ("lars", LARS_FIT_CASES)):
        for option in options:
            kwargs = FIT_CASES[option]
            compare(f"dense/{name}/{option}", "dense", name, kwargs, kwargs)
        # k micro-batches of 16 on 2 replicas = one batch of 32 on one
        # device, with the clip and loss scaling on.
        clip = dict(global_clipnorm=1e-2, loss_scale=True)
        compare(f"embedding/{name}/accumulation+global_clipnorm+loss_scale",
                "embedding", name, dict(clip, batch=2 * GLOBAL_BATCH),
                dict(clip, gradient_accumulation_steps=2))
    # Negative control: per-replica clipping must be caught.
    compare("control/lamb/per_replica_global_clipnorm", "dense",
            "lamb", dict(global_clipnorm=1e-2),
            dict(global_clipnorm=1e-2, control=True))
    print(json.dumps(report))


# -------------------------------------------------------------- trainer


def trainer_weights(strategy, k, control=False):
    """Trains the embedding model with tpu_scripts' Trainer: LAMB with
    `global_clipnorm` under a `LossScaleOptimizer`, an L2 term in the loss,
    `k` micro-batches per update on each replica."""
    from tpu_scripts import trainer

    x, y = make_data("embedding")
    task = trainer.ClassificationTask(
        lambda: make_model("embedding"), num_classes=4,
        l2_weight_decay=1e-3,
    )

    def input_fn(ctx, epoch=0, start_step=0):
        # Per-replica batches in order; each input pipeline (worker) takes
        # every n-th, so replica r of step s gets the r-th slice of the
        # one-device batch s.
        per_replica = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
            per_replica, drop_remainder=True)
        dataset = dataset.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return dataset.skip(start_step * ctx.num_replicas_in_sync
                            // ctx.num_input_pipelines)

    input_fn.steps_per_epoch = STEPS
    loop = trainer.Trainer(
        strategy, task,
        lambda: make_optimizer("lamb", control=control, loss_scale=True,
                               global_clipnorm=1e-2),
        GLOBAL_BATCH, steps_per_loop=4, log=lambda *a, **kw: None,
        gradient_accumulation_steps=k,
    )
    loop.train(input_fn, STEPS)
    return loop.model.get_weights()


def trainer_report(out):
    one = trainer_weights(tf.distribute.get_strategy(), k=1)
    np.savez(os.path.join(out, "one_device.npz"), *one)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {
        "mirrored/k=1": max_diff(one, trainer_weights(mirrored, k=1)),
        "mirrored/k=2": max_diff(one, trainer_weights(mirrored, k=2)),
        "control/mirrored/per_replica_clip": max_diff(
            one, trainer_weights(mirrored, k=1, control=True)),
        "moved": max_diff(one, make_model("embedding").get_weights()),
    }
    print(json.dumps(report))


def worker(out):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    weights = trainer_weights(strategy, k=2)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.savez(os.path.join(out, f"worker{index}.npz"), *weights)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "fit":
        fit_report()
    elif mode == "trainer":
        trainer_report(sys.argv[2])
    elif mode == "worker":
        worker(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}: fit, trainer or worker")
