"""TrustRatioMonitor: recorded values, History, TensorBoard, XLA, replicas."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_lamb
from conftest import BACKEND
from keras_lamb.callbacks import TrustRatioMonitor

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="gradients by tf.GradientTape, summaries by tf.summary",
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETA, WD = 1e-3, 0.01


def make_model():
    # Nonzero biases, so that every variable has a proper ratio.
    init = keras.initializers.RandomNormal(stddev=0.5, seed=1)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh", bias_initializer=init,
                               name="hidden"),
            keras.layers.Dense(2, bias_initializer=init, name="out"),
        ],
        name="net",
    )


def make_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    return x, np.tanh(x[:, :2] * 2.0).astype("float32")


def make_optimizer(kind, **kwargs):
    cls = keras_lamb.LARS if kind == "lars" else keras_lamb.LAMB
    return cls(
        learning_rate=0.5 if kind == "lars" else 0.01,
        weight_decay=WD,
        exclude_from_weight_decay="bias",
        exclude_from_layer_adaptation="out/bias",
        **kwargs,
    )


def hand_stats(kind, path, w, g):
    """The first step's statistics from the equations, in float64."""
    decay = 0.0 if "bias" in path else WD
    w_norm = np.linalg.norm(w)
    if kind == "lars":
        update_norm = np.linalg.norm(g)
        ratio = ETA * w_norm / (update_norm + decay * w_norm)
    else:
        # Step 1 with bias correction: m_hat = g, v_hat = g**2.
        u = g / (np.abs(g) + 1e-6) + decay * w
        update_norm = np.linalg.norm(u)
        ratio = w_norm / update_norm
    if path.endswith("out/bias"):
        ratio = 1.0
    return w_norm, update_norm, ratio


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_recorded_stats_equal_hand_computation(kind):
    import tensorflow as tf

    model = make_model()
    x, y = make_data()
    lr = 0.5 if kind == "lars" else 0.01
    model.compile(make_optimizer(kind, track_trust_ratios=True), loss="mse")
    weights = [v.numpy().astype("float64") for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    grads = [g.numpy().astype("float64") for g in grads]

    monitor = TrustRatioMonitor(every_n_steps=1)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False,
              callbacks=[monitor], verbose=0)

    assert [step for step, _ in monitor.records] == [1]
    stats = monitor.records[0][1]
    paths = [v.path for v in model.trainable_variables]
    assert list(stats) == paths
    for path, w, g in zip(paths, weights, grads):
        w_norm, update_norm, ratio = hand_stats(kind, path, w, g)
        s = stats[path]
        assert s["weight_norm"] == pytest.approx(w_norm, rel=1e-5), path
        assert s["update_norm"] == pytest.approx(update_norm, rel=1e-5), path
        assert s["trust_ratio"] == pytest.approx(ratio, rel=1e-5), path
        assert s["learning_rate"] == pytest.approx(lr * ratio, rel=1e-5), path
    assert monitor.update_symbol == ("g" if kind == "lars" else "u")


def test_every_n_steps_and_history():
    model = make_model()
    x, y = make_data(40)
    model.compile(make_optimizer("lars", track_trust_ratios=True), loss="mse")
    monitor = TrustRatioMonitor(every_n_steps=3)
    history = model.fit(x, y, batch_size=4, epochs=2, callbacks=[monitor],
                        verbose=0)
    assert [s for s, _ in monitor.records] == [1, 3, 6, 9, 12, 15, 18]
    logs = history.history
    assert len(logs["trust_ratio/min"]) == 2
    # Epoch 2 ends at step 20: the summary is over that step's ratios of the
    # adapted variables (out/bias, excluded, has ratio 1 and is left out).
    stats = model.optimizer.trust_ratio_stats()
    ratios = [s["trust_ratio"] for p, s in stats.items()
              if not p.endswith("out/bias")]
    assert logs["trust_ratio/min"][-1] == pytest.approx(min(ratios))
    assert logs["trust_ratio/median"][-1] == pytest.approx(np.median(ratios))
    assert logs["trust_ratio/max"][-1] == pytest.approx(max(ratios))
    assert max(ratios) < 1.0  # LARS ratios are ~ 1e-3 * ||w|| / ||g||


def test_tensorboard_summaries(tmp_path):
    import tensorflow as tf

    model = make_model()
    x, y = make_data(16)
    model.compile(make_optimizer("lamb", track_trust_ratios=True), loss="mse")
    monitor = TrustRatioMonitor(every_n_steps=2, log_dir=str(tmp_path),
                                layers="hidden")
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[monitor], verbose=0)
    values, plugins = {}, {}
    for name in os.listdir(tmp_path):
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / name)):
            for value in event.summary.value:
                values[value.tag, event.step] = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name:
                    plugins[value.tag] = value.metadata.plugin_data.plugin_name
    tags = {tag for tag, _ in values}
    assert {step for _, step in values} == {1, 2, 4}
    assert not any("net/out/" in t for t in tags)  # not among `layers`
    # Scalars for the chosen layer, equal to the recorded values.
    step, stats = monitor.records[-1]
    for stat in ("weight_norm", "update_norm", "trust_ratio", "learning_rate"):
        for path in ("net/hidden/kernel", "net/hidden/bias"):
            assert plugins[f"{stat}/{path}"] == "scalars"
            assert float(values[f"{stat}/{path}", step]) == pytest.approx(
                stats[path][stat], rel=1e-6)
    # Histograms across all 4 variables: (left, right, count) buckets.
    for tag in ("across_layers/trust_ratio", "across_layers/update_norm",
                "across_layers/log10_trust_ratio"):
        assert plugins[tag] == "histograms"
        buckets = values[tag, step]
        assert buckets.shape == (30, 3)
    assert values["across_layers/weight_norm", step][:, 2].sum() == 4
    # The log10 histogram leaves out net/out/bias (excluded, ratio 1).
    assert values["across_layers/log10_trust_ratio", step][:, 2].sum() == 3


@pytest.mark.parametrize("jit_compile, loss_scale",
                         [(True, False), (False, True)],
                         ids=["xla", "loss_scale_optimizer"])
def test_xla_and_loss_scale_optimizer(jit_compile, loss_scale):
    model = make_model()
    x, y = make_data(16)
    optimizer = make_optimizer("lars", track_trust_ratios=True)
    inner = optimizer
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer, loss="mse", jit_compile=jit_compile)
    monitor = TrustRatioMonitor(every_n_steps=2)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[monitor], verbose=0)
    assert [s for s, _ in monitor.records] == [1, 2, 4]
    assert monitor.records[-1][1] == inner.trust_ratio_stats()
    ratios = [s["trust_ratio"] for s in monitor.records[-1][1].values()]
    assert all(0 < r <= 1 for r in ratios)


def test_tracking_off_adds_no_variables_and_monitor_adds_none():
    x, y = make_data(8)
    plain = make_model()
    plain.compile(make_optimizer("lars"), loss="mse")
    plain.fit(x, y, batch_size=4, verbose=0)
    n = len(plain.trainable_variables)
    # iteration + learning rate + one momentum per variable, nothing else.
    assert len(plain.optimizer.variables) == 2 + n
    tracked = make_model()
    tracked.compile(make_optimizer("lars", track_trust_ratios=True),
                    loss="mse")
    tracked.fit(x, y, batch_size=4, verbose=0)
    before = len(tracked.optimizer.variables)
    tracked.fit(x, y, batch_size=4, callbacks=[TrustRatioMonitor(1)],
                verbose=0)
    assert before == len(tracked.optimizer.variables) == 2 + 5 * n


@pytest.mark.parametrize(
    "optimizer, match",
    [
        (lambda: keras.optimizers.Adam(),
         "TrustRatioMonitor needs a keras_lamb optimizer"),
        (lambda: make_optimizer("lars"),
         "created with `track_trust_ratios=True`"),
        (lambda: keras.optimizers.LossScaleOptimizer(make_optimizer("lamb")),
         "LAMB to be created with `track_trust_ratios=True`"),
    ],
)
def test_wrong_optimizer_is_a_clear_error(optimizer, match):
    model = make_model()
    model.compile(optimizer(), loss="mse")
    x, y = make_data(4)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, callbacks=[TrustRatioMonitor()], verbose=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=0), "Argument `every_n_steps` must be an integer "
         ">= 1. Received: every_n_steps=0"),
        (dict(every_n_steps=2.0), "Received: every_n_steps=2.0"),
        (dict(every_n_steps=True), "Received: every_n_steps=True"),
        (dict(layers="dense("), "Argument `layers` contains an invalid"),
        (dict(layers=5), "Argument `layers` must be None, a regular"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrustRatioMonitor(**kwargs)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, keras_lamb
    from keras_lamb.callbacks import TrustRatioMonitor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = np.tanh(2 * x[:, :2]).astype("float32")
    keras.utils.set_random_seed(0)

    def build():
        return keras.Sequential([keras.Input((5,)),
                                 keras.layers.Dense(4, name="hidden"),
                                 keras.layers.Dense(2, name="out")])

    initial = build().get_weights()

    def run(strategy):
        with strategy.scope():
            model = build()
            model.set_weights(initial)
            optimizer = keras_lamb.LARS(learning_rate=0.5,
                                        track_trust_ratios=True)
            model.compile(optimizer, loss="mse")
        monitor = TrustRatioMonitor(every_n_steps=1)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                  callbacks=[monitor], verbose=0)
        replicas = {
            v.name: [float(t) for t in
                     strategy.experimental_local_results(v.value)]
            for v in optimizer.variables if v.name.startswith("trust_ratio_")
        }
        records = [[step, {p.split("/", 1)[1]: s for p, s in stats.items()}]
                   for step, stats in monitor.records]
        return records, replicas

    mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    single = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
    print(json.dumps({"mirrored": mirrored, "single": single}))
    """
)


def test_mirrored_strategy_values_are_all_reduced():
    """2 logical CPUs: each replica holds the same statistics, and they equal
    a one-device run on the same global batch."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    (m_records, m_replicas), (s_records, _) = out["mirrored"], out["single"]
    assert m_replicas
    for name, values in m_replicas.items():
        assert len(values) == 2 and values[0] == values[1], name
    assert [r[0] for r in m_records] == [r[0] for r in s_records] == [1, 2]
    for (_, m_stats), (_, s_stats) in zip(m_records, s_records):
        assert m_stats.keys() == s_stats.keys()
        for path in m_stats:
            for stat, value in m_stats[path].items():
                assert value == pytest.approx(
                    s_stats[path][stat], rel=1e-5), (path, stat)


def test_monitor_reads_only_public_attributes_of_any_subclass():
    """A LARS subclass that redefines `update_norm_of`, and the BERT script's
    summary, both go by `trust_ratio_stats()["adapted"]` and the class
    attribute, not by private lists or `isinstance` checks."""
    from tpu_scripts.bert.pretrain import trust_ratio_summary

    class ScaledLARS(keras_lamb.LARS):
        update_norm_of = "g_scaled"

    model = make_model()
    x, y = make_data()
    model.compile(ScaledLARS(learning_rate=0.5, weight_decay=WD,
                             exclude_from_layer_adaptation="out/bias",
                             track_trust_ratios=True), loss="mse")
    monitor = TrustRatioMonitor()
    history = model.fit(x, y, batch_size=16, epochs=1, callbacks=[monitor],
                        verbose=0)
    assert monitor.update_symbol == "g_scaled"
    stats = model.optimizer.trust_ratio_stats()
    assert [p for p, s in stats.items() if not s["adapted"]] == [
        "net/out/bias"]
    adapted = [s["trust_ratio"] for s in stats.values() if s["adapted"]]
    assert history.history["trust_ratio/max"] == [pytest.approx(max(adapted))]
    summary = trust_ratio_summary(
        keras.optimizers.LossScaleOptimizer(model.optimizer))
    assert summary == pytest.approx(dict(
        min=min(adapted), median=np.median(adapted), max=max(adapted)))
    # The excluded bias (ratio 1) is left out of both.
    assert stats["net/out/bias"]["trust_ratio"] == 1.0 > max(adapted)
