"""Hardening of LAMB, LARS, the trust-ratio monitor and the schedules.

Each test reproduces one item of issue 13 as a user met it: the monitor
during `fit` on JAX, float64 variables, NumPy scalars, raw tf.Variables,
quantized models, integer variables, the base optimizer's keywords and
Python-int schedule steps beyond 2**31. Backend-agnostic unless marked: runs
under TensorFlow and again under JAX (tests/test_jax_backend.py).
"""

import json
import math

import keras
import numpy as np
import pytest

import keras_lamb
from conftest import BACKEND, TOLERANCES, make_gradients, make_variables, mask
from keras_lamb.callbacks import TrustRatioMonitor
from keras_lamb.layerwise import STAT_NAMES
from keras_lamb.schedules import (
    PhasedSchedule,
    WarmUp,
    warmup_polynomial_decay,
)
from reference import NumpyLAMB, NumpyLARS

tf_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="raw tf.Variables: TensorFlow backend"
)
OPTIMIZERS = {"lamb": keras_lamb.LAMB, "lars": keras_lamb.LARS}


# ---------------------------------------------------------------------------
# 1. The monitor during `fit` (on JAX, `fit` keeps the state off the
#    variables during an epoch), checked against a NumPy simulation.


def linear_model(inputs, outputs, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(outputs, name="dense")],
        name="net",
    )


def linear_data(n, inputs=4, outputs=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, inputs)).astype("float32")
    y = rng.standard_normal((n, outputs)).astype("float32")
    return x, y


def mse_gradients(weights, x, y):
    """Gradients of Keras's "mse" (mean over outputs and batch) of
    `x @ kernel + bias`, in float64."""
    kernel, bias = weights
    x, y = x.astype("float64"), y.astype("float64")
    residual = 2 * (x @ kernel + bias - y) / y.size
    return [x.T @ residual, residual.sum(axis=0)]


def simulate_lars(weights, x, y, batch_size, lr, wd=1e-4, eta=1e-3):
    """Per step, the statistics LARS (defaults) records: `[{stat: [value per
    variable]}]`, by `NumpyLARS` on `mse_gradients`."""
    reference = NumpyLARS(lr, weight_decay=wd, eta=eta)
    history = []
    for start in range(0, len(x), batch_size):
        batch = slice(start, start + batch_size)
        grads = mse_gradients(weights, x[batch], y[batch])
        stats = {"weight_norm": [], "update_norm": [], "trust_ratio": []}
        for w, g in zip(weights, grads):
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            ratio = 1.0
            if w_norm > 0 and g_norm > 0:
                ratio = eta * w_norm / (g_norm + wd * w_norm)
            stats["weight_norm"].append(w_norm)
            stats["update_norm"].append(g_norm)
            stats["trust_ratio"].append(ratio)
        stats["learning_rate"] = [lr * r for r in stats["trust_ratio"]]
        history.append(stats)
        weights = reference.step(weights, grads)
    return history


def test_monitor_during_fit_with_no_other_callback():
    """The issue's scenario: `LARS(0.1, track_trust_ratios=True)`, only the
    monitor, `every_n_steps=2`. Each record holds the statistics of its own
    step (a NumPy simulation of the same training), and History the
    summaries of each epoch's last step."""
    model = linear_model(4, 2)
    initial = [np.array(w, dtype="float64") for w in model.get_weights()]
    model.compile(keras_lamb.LARS(0.1, track_trust_ratios=True), "mse")
    x, y = linear_data(24)
    monitor = TrustRatioMonitor(every_n_steps=2)
    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False,
                        callbacks=[monitor], verbose=0)

    # 6 steps per epoch, the simulation covers both epochs.
    expected = simulate_lars(initial, np.concatenate([x, x]),
                             np.concatenate([y, y]), 4, lr=0.1)
    assert [step for step, _ in monitor.records] == [1, 2, 4, 6, 8, 10, 12]
    paths = ["net/dense/kernel", "net/dense/bias"]
    for step, stats in monitor.records:
        assert list(stats) == paths
        for i, path in enumerate(paths):
            for stat, values in expected[step - 1].items():
                assert stats[path][stat] == pytest.approx(
                    values[i], rel=1e-4), (step, path, stat)
    # Step 1: the zero-initialised bias has ratio 1; later ones are LARS's.
    assert monitor.records[0][1]["net/dense/bias"]["trust_ratio"] == 1.0
    assert monitor.records[-1][1]["net/dense/bias"]["trust_ratio"] < 0.1
    for epoch, step in enumerate((6, 12)):
        ratios = expected[step - 1]["trust_ratio"]
        logs = history.history
        assert logs["trust_ratio/min"][epoch] == pytest.approx(
            min(ratios), rel=1e-4)
        assert logs["trust_ratio/max"][epoch] == pytest.approx(
            max(ratios), rel=1e-4)


# ---------------------------------------------------------------------------
# 5. Summaries count only real updates of the variables the optimizer trains.


def test_quantized_model_statistics_cover_only_trained_variables():
    """float8 scales and amax histories are trainable variables that Keras
    overwrites with their "gradients": no statistics (which stayed 0 and
    made History's min and median 0)."""
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
         keras.layers.Dense(2, name="out")],
        name="net",
    )
    model.quantize("float8")
    overwritten = [v.path for v in model.trainable_variables
                   if getattr(v, "overwrite_with_gradient", False)]
    assert len(overwritten) == 12  # 6 per quantized Dense layer
    optimizer = keras_lamb.LAMB(0.01, track_trust_ratios=True)
    model.compile(optimizer, "mse")
    monitor = TrustRatioMonitor(every_n_steps=1)
    x, y = linear_data(16)
    history = model.fit(x, y, batch_size=8, epochs=1, callbacks=[monitor],
                        verbose=0)

    trained = ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel",
               "net/out/bias"]
    assert [step for step, _ in monitor.records] == [1, 2]
    for _, stats in monitor.records:
        assert list(stats) == trained
        # Ratios of real updates: positive (1 for the zero biases at step 1).
        assert all(s["trust_ratio"] > 0 and s["update_norm"] > 0
                   for s in stats.values())
    stat_variables = [v for v in optimizer.variables
                      if v.name.startswith("trust_ratio_")]
    assert len(stat_variables) == len(trained)
    ratios = [s["trust_ratio"] for s in monitor.records[-1][1].values()]
    logs = history.history
    assert logs["trust_ratio/min"] == [pytest.approx(min(ratios))]
    assert logs["trust_ratio/median"] == [pytest.approx(np.median(ratios))]
    assert min(ratios) > 0


def test_gradient_accumulation_records_only_real_updates():
    """With `gradient_accumulation_steps=2`, 8 batches are 4 updates: the
    records are steps 1-4 (no step 0 of zeros), each equal to the step of
    one batch twice as large."""
    x, y = linear_data(16)
    runs = []
    for batch_size, accumulation in ((2, 2), (4, None)):
        model = linear_model(4, 2)
        model.compile(keras_lamb.LAMB(
            0.01, track_trust_ratios=True,
            gradient_accumulation_steps=accumulation), "mse")
        monitor = TrustRatioMonitor(every_n_steps=1)
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False,
                  callbacks=[monitor], verbose=0)
        runs.append(monitor.records)
    accumulated, single = runs
    assert [s for s, _ in accumulated] == [s for s, _ in single] == [1, 2, 3,
                                                                     4]
    for (_, a), (_, b) in zip(accumulated, single):
        for path in b:
            assert b[path]["update_norm"] > 0
            for stat, value in b[path].items():
                assert a[path][stat] == pytest.approx(value, rel=1e-4), (
                    path, stat)


def test_statistics_are_nan_until_a_variable_is_updated():
    """A variable without a gradient has no statistics yet (NaN, not 0),
    and the monitor's summaries leave it out."""
    used, unused = keras.Variable([3.0, 4.0]), keras.Variable([1.0])
    optimizer = keras_lamb.LARS(0.1, track_trust_ratios=True)
    optimizer.build([used, unused])
    optimizer.apply([keras.ops.ones((2,)), None], [used, unused])
    stats = optimizer.trust_ratio_stats()
    assert stats[used.path]["weight_norm"] == pytest.approx(5.0)
    assert all(math.isnan(stats[unused.path][stat]) for stat in STAT_NAMES)
    assert stats[unused.path]["adapted"] is True


# ---------------------------------------------------------------------------
# 2. float64 variables step in float64.


@pytest.fixture
def float64_enabled():
    """JAX computes in float32 unless x64 is on: float64 variables are then
    float32 arrays. On TensorFlow this does nothing."""
    if BACKEND == "jax":
        import jax

        enable_x64 = getattr(jax, "enable_x64", None)
        if enable_x64 is None:  # jax < 0.4.36
            from jax.experimental import enable_x64
        with enable_x64(True):
            yield
    else:
        yield


# The rate as the optimizer's float32 learning-rate variable holds it.
FLOAT32_LR = float(np.float32(0.05))


# Every switch of each optimizer: (optimizer arguments, reference
# arguments).
FLOAT64_SWITCHES = {
    "lamb": {
        "paper": ({}, {}),
        "no_bias_correction": (dict(bias_correction=False),
                               dict(bias_correction=False)),
        "bounds": (dict(trust_ratio_bounds=(0.05, 2.0)),
                   dict(bounds=(0.05, 2.0))),
        "lambc": (dict(clip_trust_ratio=True), dict(clip=True)),
    },
    "lars": {
        "mlperf": ({}, {}),
        "nesterov": (dict(nesterov=True), dict(nesterov=True)),
        "larc": (dict(clip_trust_ratio=True, epsilon=1e-5),
                 dict(clip=True, epsilon=1e-5)),
    },
}


def float64_pair(name, path, switch=None):
    """An optimizer (on `path`) and its float64 NumPy reference."""
    extra, ref_extra = FLOAT64_SWITCHES[name][switch] if switch else ({}, {})
    if name == "lamb":
        optimizer = keras_lamb.LAMB(
            FLOAT32_LR, weight_decay=0.1,
            exclude_from_weight_decay="layer_norm",
            exclude_from_layer_adaptation="bias", **extra)
        reference = NumpyLAMB(FLOAT32_LR, weight_decay=0.1,
                              decay_mask=mask("layer_norm"),
                              adapt_mask=mask("bias"), **ref_extra)
    else:
        optimizer = keras_lamb.LARS(
            FLOAT32_LR, weight_decay=0.01, trust_coefficient=0.02,
            exclude_from_weight_decay="bias",
            exclude_from_layer_adaptation="layer_norm", **extra)
        reference = NumpyLARS(FLOAT32_LR, weight_decay=0.01, eta=0.02,
                              decay_mask=mask("bias"),
                              adapt_mask=mask("layer_norm"), **ref_extra)
    optimizer._use_reference_path = path == "reference"
    return optimizer, reference


def max_relative_error(optimizer, reference, dtype, steps=3):
    variables = make_variables(dtype)
    weights = [np.array(v, dtype="float64") for v in variables]
    worst = 0.0
    for step in range(steps):
        grads = make_gradients(step)
        optimizer.apply(
            [keras.ops.convert_to_tensor(g, dtype) for g in grads], variables)
        weights = reference.step(weights, grads)
        for v, w in zip(variables, weights):
            error = np.abs(np.array(v, dtype="float64") - w)
            worst = max(worst, float(np.max(error / (np.abs(w) + 1e-3))))
    return worst, variables


@pytest.mark.parametrize("path", ["whole", "reference"])
@pytest.mark.parametrize("name, switch", [
    (name, switch) for name, switches in FLOAT64_SWITCHES.items()
    for switch in switches])
def test_float64_variables_follow_a_float64_reference(name, switch, path,
                                                      float64_enabled):
    # Every backend, every switch (torch rounds a Python float in
    # `power`/`minimum` against a float64 tensor to float32).
    optimizer, reference = float64_pair(name, path, switch)
    error, variables = max_relative_error(optimizer, reference, "float64")
    assert all(v.dtype == "float64" for v in variables)
    assert all(s.dtype == "float64" for s in optimizer._momentums)
    tol = TOLERANCES["float64"]
    assert error < 1e-12, error  # measured <= 1e-14 on all three backends
    if path == "whole":
        # Negative control: float32 variables miss the tolerance by far.
        optimizer, reference = float64_pair(name, path)
        error_32, _ = max_relative_error(optimizer, reference, "float32")
        assert error_32 > 100 * tol["rtol"], error_32


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_learning_rate_leaves_float64_variables_exactly(name,
                                                             float64_enabled):
    """Also next to a float32 variable (each compute dtype forms its own
    step scalars)."""
    variables = make_variables("float64")
    with keras.name_scope("single"):
        variables.append(keras.Variable(np.full((3,), 0.1), dtype="float32",
                                        name="bias"))
    before = [np.array(v) for v in variables]
    optimizer = OPTIMIZERS[name](learning_rate=0.0, weight_decay=0.1,
                                 track_trust_ratios=True)
    for step in range(3):
        grads = make_gradients(step) + [np.ones(3)]
        optimizer.apply([keras.ops.convert_to_tensor(g, v.dtype)
                         for g, v in zip(grads, variables)], variables)
    for v, b in zip(variables, before):
        assert np.array(v).dtype == b.dtype
        np.testing.assert_array_equal(np.array(v), b, err_msg=v.path)
    # The steps ran: LAMB's moments moved (LARS's momentum holds lr * step,
    # 0 here), and the statistics are recorded.
    assert int(optimizer.iterations) == 3
    if name == "lamb":
        assert np.any(np.array(optimizer._momentums[0]) != 0)
    stats = optimizer.trust_ratio_stats()
    assert stats["big/kernel"]["weight_norm"] == pytest.approx(
        np.linalg.norm(before[0]), rel=1e-6)


# ---------------------------------------------------------------------------
# 3. NumPy scalars are numbers; the config keeps Python numbers.

NUMPY_LAMB = dict(
    learning_rate=np.float32(0.002), beta_1=np.float32(0.9),
    beta_2=np.float64(0.98), epsilon=np.float32(1e-6),
    weight_decay=np.int64(0),
    trust_ratio_bounds=(np.float32(0.5), np.int32(10)),
    bias_correction=np.bool_(False), track_trust_ratios=np.bool_(True),
    global_clipnorm=np.float32(1.0), use_ema=np.bool_(True),
    ema_momentum=np.float64(0.9), ema_overwrite_frequency=np.int64(5),
    loss_scale_factor=np.float32(128), gradient_accumulation_steps=np.int32(2),
)
NUMPY_LARS = dict(
    learning_rate=np.int64(10), momentum=np.float32(0.9),
    weight_decay=np.float32(5e-5), trust_coefficient=np.float64(1e-3),
    epsilon=np.float32(0), nesterov=np.bool_(True),
    clip_trust_ratio=np.bool_(True), clipnorm=np.int64(2),
)


@pytest.mark.parametrize("name, kwargs", [("lamb", NUMPY_LAMB),
                                          ("lars", NUMPY_LARS)])
def test_numpy_scalars_are_accepted_and_stored_as_python_numbers(name,
                                                                 kwargs):
    optimizer = OPTIMIZERS[name](**kwargs)
    config = optimizer.get_config()
    for key, value in kwargs.items():
        stored = config[key]
        if key == "trust_ratio_bounds":
            assert stored == [float(b) for b in value]
            assert all(type(b) is float for b in stored)
        elif isinstance(value, np.bool_):
            assert stored is bool(value), key
        else:
            assert stored == pytest.approx(float(value)), key
            assert type(stored) in (int, float), (key, type(stored))
    # The config is plain JSON and round-trips.
    text = json.dumps(keras.optimizers.serialize(optimizer))
    restored = keras.optimizers.deserialize(json.loads(text))
    assert restored.get_config() == config


def test_numpy_scalars_in_the_monitor_and_the_schedules():
    monitor = TrustRatioMonitor(every_n_steps=np.int64(3))
    assert monitor.every_n_steps == 3 and type(monitor.every_n_steps) is int
    schedule = WarmUp(np.float32(0.5), np.int64(4),
                      initial_learning_rate=np.float64(0.1))
    json.dumps(schedule.get_config())
    assert float(schedule(2)) == pytest.approx(0.3)


BAD_NUMPY = [
    ("lamb", dict(beta_1=np.float32(1.0)),
     r"Argument `beta_1` must be in \[0, 1\). Received: beta_1=np.float32"
     r"\(1.0\)"),
    ("lamb", dict(beta_1=np.bool_(True)),
     r"Argument `beta_1` must be in \[0, 1\). Received: beta_1=np.True_"),
    ("lamb", dict(weight_decay=True),
     r"Argument `weight_decay` must be a finite number >= 0. Received: "
     r"weight_decay=True"),
    ("lamb", dict(epsilon=np.float32("nan")),
     r"Argument `epsilon` must be a finite number >= 0. Received: "
     r"epsilon=np.float32\(nan\)"),
    ("lamb", dict(trust_ratio_bounds=(np.float64("inf"), None)),
     r"Argument `trust_ratio_bounds` .* Received: trust_ratio_bounds="
     r"\(np.float64\(inf\), None\)"),
    ("lars", dict(momentum=np.float64(-0.1)),
     r"Argument `momentum` must be in \[0, 1\). Received: "
     r"momentum=np.float64\(-0.1\)"),
    ("lars", dict(trust_coefficient=np.int64(0)),
     r"Argument `trust_coefficient` must be a finite number > 0. Received: "
     r"trust_coefficient=np.int64\(0\)"),
    ("lars", dict(epsilon=10**400),
     r"Argument `epsilon` must be a finite number >= 0. Received: "
     r"epsilon=1000"),
    ("lars", dict(learning_rate=np.bool_(True)),
     r"Argument `learning_rate` must be .* Received: learning_rate=np.True_"),
]


@pytest.mark.parametrize("name, kwargs, message", BAD_NUMPY,
                         ids=[m[:36] for *_, m in BAD_NUMPY])
def test_numpy_bools_and_non_finite_scalars_are_rejected(name, kwargs,
                                                         message):
    with pytest.raises(ValueError, match=message):
        OPTIMIZERS[name](**kwargs)


# ---------------------------------------------------------------------------
# 7. The base optimizer's keywords are validated.

BAD_BASE = [
    (dict(clipnorm=math.nan), r"Argument `clipnorm` must be None or a "
     r"finite number > 0. Received: clipnorm=nan"),
    (dict(clipnorm=-1), r"Argument `clipnorm` must be None or a finite "
     r"number > 0. Received: clipnorm=-1"),
    (dict(clipnorm=0.0), r"Argument `clipnorm` .* Received: clipnorm=0.0"),
    (dict(global_clipnorm=math.inf), r"Argument `global_clipnorm` must be "
     r"None or a finite number > 0. Received: global_clipnorm=inf"),
    (dict(clipvalue="1"), r"Argument `clipvalue` must be None or a finite "
     r"number > 0. Received: clipvalue='1'"),
    (dict(loss_scale_factor=0), r"Argument `loss_scale_factor` must be None "
     r"or a finite number > 0. Received: loss_scale_factor=0"),
    (dict(loss_scale_factor=math.nan), r"Argument `loss_scale_factor` .* "
     r"Received: loss_scale_factor=nan"),
    (dict(gradient_accumulation_steps=2.5), r"Argument "
     r"`gradient_accumulation_steps` must be None or an integer >= 2. "
     r"Received: gradient_accumulation_steps=2.5"),
    (dict(gradient_accumulation_steps=1), r"Argument "
     r"`gradient_accumulation_steps` .* Received: "
     r"gradient_accumulation_steps=1"),
    (dict(gradient_accumulation_steps=True), r"Argument "
     r"`gradient_accumulation_steps` .* Received: "
     r"gradient_accumulation_steps=True"),
    (dict(ema_momentum=1.5), r"Argument `ema_momentum` must be in \[0, 1\]. "
     r"Received: ema_momentum=1.5"),
    (dict(ema_momentum=math.nan), r"Argument `ema_momentum` .* Received: "
     r"ema_momentum=nan"),
    (dict(use_ema=True, ema_overwrite_frequency=0), r"Argument "
     r"`ema_overwrite_frequency` must be None or an integer >= 1. Received: "
     r"ema_overwrite_frequency=0"),
    (dict(ema_overwrite_frequency=2.0), r"Argument `ema_overwrite_frequency` "
     r".* Received: ema_overwrite_frequency=2.0"),
    (dict(use_ema="yes"), r"Argument `use_ema` must be a bool. Received: "
     r"use_ema='yes'"),
]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("kwargs, message", BAD_BASE,
                         ids=[m[10:46] for _, m in BAD_BASE])
def test_base_optimizer_arguments_are_validated(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        OPTIMIZERS[name](**kwargs)


# ---------------------------------------------------------------------------
# 6. Integer variables are rejected at build.


@pytest.mark.skipif(BACKEND == "torch", reason=(
    "torch cannot create a trainable integer variable (requires_grad needs "
    "a float dtype): there is nothing to reject"))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_integer_trainable_variables_are_rejected_at_build(name):
    with keras.name_scope("counter"):
        counts = keras.Variable(np.array([5, -5, 7]), dtype="int32",
                                name="counts")
    weights = keras.Variable([1.0, 2.0], name="weights")
    optimizer = OPTIMIZERS[name](1e-6)
    with pytest.raises(ValueError, match=(
            r"can only train floating-point variables, but variable "
            r"`counter/counts` has dtype int32")):
        optimizer.apply([keras.ops.ones((2,)), keras.ops.ones((3,), "int32")],
                        [weights, counts])
    assert not optimizer.built
    assert np.array(counts).tolist() == [5, -5, 7]
    assert np.array(weights).tolist() == [1.0, 2.0]


# ---------------------------------------------------------------------------
# 4. Raw tf.Variables in a TensorFlow custom loop.


@tf_only
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_raw_tf_variables_with_tracking(name):
    """A variable made under `tf.name_scope` (name "block1/kernel:0") and
    one without: tracking builds, keys them by name without ":0", matches
    the exclusions against that, and leaves the update unchanged."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    values = [rng.standard_normal((3, 2)), rng.standard_normal(2),
              rng.standard_normal(4)]
    grads = [tf.constant(rng.standard_normal(v.shape), tf.float32)
             for v in values]

    def train(track):
        with tf.name_scope("block1"):
            kernel = tf.Variable(values[0], dtype=tf.float32, name="kernel")
            bias = tf.Variable(values[1], dtype=tf.float32, name="bias")
        free = tf.Variable(values[2], dtype=tf.float32, name="w")
        variables = [kernel, bias, free]
        optimizer = OPTIMIZERS[name](
            0.1, weight_decay=0.01, exclude_from_weight_decay="bias$",
            exclude_from_layer_adaptation="^w$", track_trust_ratios=track)

        @tf.function
        def step():
            optimizer.apply(grads, variables)

        step()
        first = optimizer.trust_ratio_stats() if track else None
        step()
        return optimizer, first, [v.numpy() for v in variables]

    tracked, first, tracked_weights = train(True)
    _, _, plain_weights = train(False)
    for a, b in zip(tracked_weights, plain_weights):
        np.testing.assert_array_equal(a, b)
    assert tracked._apply_decay == [True, False, True]
    assert tracked._apply_adaptation == [True, True, False]
    assert tracked._trainable_variables[0].name == "block1/kernel:0"
    paths = ["block1/kernel", "block1/bias", "w"]
    assert list(first) == list(tracked.trust_ratio_stats()) == paths
    for path, w, g in zip(paths, values, grads):
        assert first[path]["weight_norm"] == pytest.approx(
            np.linalg.norm(w), rel=1e-6)
        if name == "lars":
            assert first[path]["update_norm"] == pytest.approx(
                np.linalg.norm(g.numpy()), rel=1e-6)
    assert first["w"]["trust_ratio"] == 1.0  # excluded from adaptation
    assert first["block1/kernel"]["trust_ratio"] != 1.0


# ---------------------------------------------------------------------------
# 8. Python-int schedule steps beyond 2**31 on every backend.

BIG = 2**31 - 1


def test_python_int_steps_beyond_int32_on_every_backend():
    poly = keras.optimizers.schedules.PolynomialDecay
    warmup = WarmUp(0.5, 4)
    decay = warmup_polynomial_decay(1.0, 100, 10, end_learning_rate=0.01)
    after = warmup_polynomial_decay(1.0, 100, 10, end_learning_rate=0.01,
                                    schedule_step="after_warmup")
    phased = PhasedSchedule([10, BIG], [0.1, WarmUp(poly(1.0, 100, 0.0), 10),
                                        0.25])
    for step in (2**31, 2**40, np.int64(2**40), 2**62):
        assert float(warmup(step)) == pytest.approx(0.5)
        assert float(decay(step)) == pytest.approx(0.01)
        assert float(after(step)) == pytest.approx(0.01)
        assert float(phased(step)) == pytest.approx(0.25)
    # Exact at the last int32 step: one step before is still phase 1.
    assert float(phased(BIG - 1)) == 0.0
    assert float(phased(BIG)) == pytest.approx(0.25)
    # Small Python ints and integer tensors give the same values.
    for step in (0, 5, 15, 200):
        tensor = keras.ops.convert_to_tensor(step, "int32")
        assert float(phased(step)) == pytest.approx(float(phased(tensor)))
        assert float(decay(step)) == pytest.approx(float(decay(tensor)))
    assert float(phased(-3)) == pytest.approx(0.1)
