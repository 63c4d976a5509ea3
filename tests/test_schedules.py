"""Warmup and phased learning-rate schedules: values, serialization, XLA."""

import json

import keras
import numpy as np
import pytest

import keras_lamb
from conftest import BACKEND
from keras_lamb.schedules import PhasedSchedule, WarmUp, warmup_polynomial_decay

poly = keras.optimizers.schedules.PolynomialDecay
TF_ONLY = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="int64 steps need the TensorFlow backend"
)
BIG = 2**31 - 1  # the largest step argument a schedule accepts

# (schedule factory, [(step, expected learning rate), ...]); expected values
# written out by hand from the formulas in the docstrings.
TABLES = {
    "warmup_continuous": (
        # target = decay(10) = 0.9; the decay sees the global step.
        lambda: WarmUp(poly(1.0, 100, 0.0, power=1.0), 10),
        [(0, 0.0), (5, 0.45), (9, 0.81), (10, 0.9), (50, 0.5), (99, 0.01),
         (100, 0.0), (101, 0.0)],
    ),
    "warmup_constant_from_initial": (
        lambda: WarmUp(0.5, 4, initial_learning_rate=0.1),
        [(0, 0.1), (2, 0.3), (3, 0.4), (4, 0.5), (1000, 0.5)],
    ),
    "bert_style_warmup_to_peak": (
        # Warmup to the peak, then the decay at the global step: a jump from
        # 0.9 (step 9) to decay(10) = 0.9, then linear to 0 at step 100.
        lambda: warmup_polynomial_decay(1.0, 100, 10),
        [(0, 0.0), (1, 0.1), (9, 0.9), (10, 0.9), (55, 0.45), (99, 0.01),
         (100, 0.0)],
    ),
    "bert_style_jump": (
        # power 0.5: peak 1.0 ramps to 0.75 at step 3, then jumps to
        # (1 - 4/16)**0.5 = 0.8660 at step 4.
        lambda: warmup_polynomial_decay(1.0, 16, 4, power=0.5),
        [(3, 0.75), (4, 0.75**0.5), (12, 0.5), (16, 0.0)],
    ),
    "mlperf_style_after_warmup": (
        # Decay (1 - 0.01) * (1 - s/100)**2 + 0.01 with s = step - 10.
        lambda: warmup_polynomial_decay(
            1.0, 110, 10, end_learning_rate=0.01, power=2.0,
            schedule_step="after_warmup",
        ),
        [(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.2575), (109, 0.010099),
         (110, 0.01), (111, 0.01)],
    ),
    "phases_rewarm": (
        # Phase 1 for steps 0..19, phase 2 (re-warmed from 0) from step 20.
        lambda: PhasedSchedule(
            [20],
            [warmup_polynomial_decay(1.0, 20, 4),
             warmup_polynomial_decay(0.5, 10, 5)],
        ),
        [(3, 0.75), (19, 0.05), (20, 0.0), (21, 0.1), (24, 0.4),
         (25, 0.25), (29, 0.05), (30, 0.0), (31, 0.0)],
    ),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_schedule_table(name):
    factory, table = TABLES[name]
    schedule = factory()
    for step, expected in table:
        got = float(keras.ops.convert_to_numpy(schedule(step)))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (
            f"{name} at step {step}"
        )


def test_nvidia_bert_phase_boundary_and_last_step():
    _, schedule, _ = keras_lamb.recipes.lamb_bert_64k_32k()
    table = [
        (0, 0.0),
        (2000, 6e-3 * 2000 / 2001),  # last warmup step of phase 1
        (2001, 6e-3 * (1 - 2001 / 7038) ** 0.5),  # the reference's jump
        (7037, 6e-3 * (1 / 7038) ** 0.5),  # last step of phase 1
        (7038, 0.0),  # phase 2 restarts its warmup from 0
        (7038 + 100, 4e-3 * 100 / 200),
        (7038 + 200, 4e-3 * (1 - 200 / 1563) ** 0.5),
        (7038 + 1562, 4e-3 * (1 / 1563) ** 0.5),  # last step
        (7038 + 1563, 0.0),
    ]
    for step, expected in table:
        got = float(keras.ops.convert_to_numpy(schedule(step)))
        # rel 1e-4: PolynomialDecay forms 1 - 7037/7038 in float32.
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-9), step


@TF_ONLY
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
def test_giant_steps_are_exact(jit):
    """Steps near and beyond 2**31, as int64 tensors, eager and under XLA.

    float32 cannot tell 2**31 - 2 from 2**31 - 1 (both round to 2**31), so a
    schedule comparing steps in float32 would switch phases a step early.
    """
    import tensorflow as tf

    schedule = PhasedSchedule(
        [10, BIG], [0.1, WarmUp(poly(1.0, 100, 0.0), 10), 0.25]
    )
    fn = tf.function(schedule, jit_compile=True) if jit else schedule
    table = [
        (BIG - 1, 0.0),  # phase 1 (decayed to 0 long ago), not phase 2
        (BIG, 0.25),
        (2**31, 0.25),
        (2**40, 0.25),
        (2**62, 0.25),
        (5, 0.1),  # phase 0
        (15, 0.45),  # phase 1, warmup step 5 of 10 towards decay(10) = 0.9
    ]
    for step, expected in table:
        got = float(fn(tf.constant(step, tf.int64)))
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), step
    if jit:
        # One trace for all int64 steps: no recompilation per step.
        assert fn.experimental_get_tracing_count() == 1


@TF_ONLY
def test_python_int_steps_beyond_int32():
    schedule = WarmUp(0.5, 4)
    for step in (BIG, 2**31, 2**40):
        assert float(schedule(step)) == pytest.approx(0.5)
    decay = warmup_polynomial_decay(1.0, 100, 10, end_learning_rate=0.01)
    assert float(decay(2**40)) == pytest.approx(0.01)


def test_negative_steps_count_as_zero():
    schedule = WarmUp(0.5, 4, initial_learning_rate=0.1)
    assert float(keras.ops.convert_to_numpy(schedule(-3))) == pytest.approx(0.1)


def _all_non_default():
    """Every argument of both classes set to a non-default value."""
    warmup = WarmUp(
        poly(2e-3, 500, end_learning_rate=1e-5, power=0.5),
        warmup_steps=37,
        initial_learning_rate=1e-4,
        warmup_target=3e-3,
        schedule_step="after_warmup",
        name="my_warmup",
    )
    return PhasedSchedule(
        [100, 250],
        [
            warmup,
            0.5,
            WarmUp(keras.optimizers.schedules.CosineDecay(1e-3, 80), 20),
        ],
        name="my_phases",
    )


def _values(schedule, steps=(0, 20, 37, 99, 100, 130, 250, 260, 400)):
    return [float(keras.ops.convert_to_numpy(schedule(s))) for s in steps]


def test_serialization_round_trip():
    schedule = _all_non_default()
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(schedule)))
    assert config["registered_name"] == "keras_lamb>PhasedSchedule"
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, PhasedSchedule)
    assert restored.get_config() == schedule.get_config()
    inner = restored.schedules[0]
    assert (inner.warmup_steps, inner.initial_learning_rate,
            inner.warmup_target, inner.schedule_step, inner.name) == (
        37, 1e-4, 3e-3, "after_warmup", "my_warmup")
    assert inner.schedule_or_value.power == 0.5
    np.testing.assert_allclose(_values(restored), _values(schedule), rtol=1e-7)


def test_round_trip_inside_optimizer_config():
    schedule = _all_non_default()
    optimizer = keras_lamb.LAMB(learning_rate=schedule, weight_decay=0.01)
    config = json.loads(json.dumps(optimizer.get_config()))
    restored = keras_lamb.LAMB.from_config(config)
    assert isinstance(restored._learning_rate, PhasedSchedule)
    assert restored._learning_rate.get_config() == schedule.get_config()
    # Through Keras's generic optimizer (de)serialization as well.
    again = keras.optimizers.deserialize(
        json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    )
    np.testing.assert_allclose(
        _values(again._learning_rate), _values(schedule), rtol=1e-7
    )


def test_jit_compiled_fit_follows_the_schedule():
    keras.utils.set_random_seed(0)
    schedule = WarmUp(poly(0.01, 20, 0.0), 3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(keras_lamb.LAMB(learning_rate=schedule), loss="mse",
                  jit_compile=True)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    history = model.fit(x, x[:, :2], batch_size=4, epochs=2, verbose=0)
    optimizer = model.optimizer
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 8
    # The optimizer's current rate is the schedule at its iteration count.
    current = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    assert current == pytest.approx(0.01 * (1 - 8 / 20), rel=1e-6)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: WarmUp(1.0, 0), "Argument `warmup_steps` must be an integer "
         r"in \[1, 2147483647\]. Received: warmup_steps=0"),
        (lambda: WarmUp(1.0, -5), "Received: warmup_steps=-5"),
        (lambda: WarmUp(1.0, 2.5), "Received: warmup_steps=2.5"),
        (lambda: WarmUp(1.0, 2**31), "Received: warmup_steps=2147483648"),
        (lambda: WarmUp(-1.0, 5), "Argument `schedule_or_value` must be"),
        (lambda: WarmUp("fast", 5), "Received: schedule_or_value='fast'"),
        (lambda: WarmUp(1.0, 5, initial_learning_rate=-0.1),
         "Argument `initial_learning_rate` must be a finite number >= 0. "
         "Received: initial_learning_rate=-0.1"),
        (lambda: WarmUp(1.0, 5, warmup_target=float("nan")),
         "Argument `warmup_target`"),
        (lambda: WarmUp(1.0, 5, schedule_step="local"),
         "Argument `schedule_step` must be one of"),
        (lambda: WarmUp(poly(1.0, 100), 200),
         r"Argument `warmup_steps` must be <= the wrapped schedule's "
         r"`decay_steps` \(100\)"),
        (lambda: warmup_polynomial_decay(1.0, 100, 100),
         r"Argument `warmup_steps` must be an integer in \[1, total_steps\) = "
         r"\[1, 100\). Received: warmup_steps=100"),
        (lambda: warmup_polynomial_decay(1.0, 100, 0), "warmup_steps=0"),
        (lambda: warmup_polynomial_decay(1.0, 0, 1),
         "Argument `total_steps` must be an integer in"),
        (lambda: warmup_polynomial_decay(-1.0, 100, 10),
         "Argument `peak_learning_rate` must be a finite number >= 0"),
        (lambda: warmup_polynomial_decay(1.0, 100, 10, end_learning_rate=-1),
         "Argument `end_learning_rate`"),
        (lambda: warmup_polynomial_decay(1.0, 100, 10, power=0),
         "Argument `power` must be a finite number > 0. Received: power=0"),
        (lambda: PhasedSchedule([], [1.0]), "Argument `boundaries` must be a "
         "non-empty list"),
        (lambda: PhasedSchedule([0], [1.0, 2.0]),
         "Argument `boundaries` must be an integer in"),
        (lambda: PhasedSchedule([10, 10], [1.0, 2.0, 3.0]),
         "Argument `boundaries` must be strictly increasing"),
        (lambda: PhasedSchedule([10], [1.0]),
         r"Argument `schedules` must be a list of len\(boundaries\) \+ 1 = 2"),
        (lambda: PhasedSchedule([10], [1.0, -2.0]),
         "Argument `schedules` must be"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
