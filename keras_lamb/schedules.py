"""Learning-rate schedules for large-batch training: warmup and phases.

Large-batch recipes (Goyal et al. 2017; You et al. 2017, 2019) share one
shape: a linear warmup followed by a decay. Following Model Garden's
`LinearWarmup`, the warmup here wraps any Keras `LearningRateSchedule` (or a
constant) instead of each decay growing its own warmup flag; the decays
themselves are Keras's (`PolynomialDecay`, `PiecewiseConstantDecay`, ...).
`PhasedSchedule` chains schedules that each restart their clock, for the
re-warmed second phase of BERT pre-training.

All schedules take an integer step (the optimizer's `iterations`: int64 on
TensorFlow, int32 on JAX) or a Python int, compare steps in that integer type
so that steps beyond 2**31 stay exact, return a float32 scalar and use only
`keras.ops` without Python control flow on tensors, so they run inside
XLA-compiled training steps. A Python (or NumPy) integer step is compared as
a Python int, and the wrapped schedules get Python ints, so steps beyond
2**31 are exact on every backend, JAX's 32-bit integers included.
"""

import math
import numbers

import keras
from keras import ops

__all__ = ["PhasedSchedule", "WarmUp", "warmup_polynomial_decay"]

# Step arguments (warmup lengths, phase boundaries) must fit int32, so they can
# be compared with any integer step tensor, including JAX's int32 iterations.
MAX_STEP_ARGUMENT = 2**31 - 1

SCHEDULE_STEPS = ("global", "after_warmup")


def _check_steps(name, value, low=1):
    """`value` as an int in [low, 2**31 - 1], else a ValueError."""
    if (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and low <= value <= MAX_STEP_ARGUMENT
    ):
        return int(value)
    raise ValueError(
        f"Argument `{name}` must be an integer in [{low}, "
        f"{MAX_STEP_ARGUMENT}]. Received: {name}={value!r}"
    )


def _check_rate(name, value):
    """`value` as a float if it is a finite number >= 0, else a ValueError."""
    if (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
        return float(value)
    raise ValueError(
        f"Argument `{name}` must be a finite number >= 0. "
        f"Received: {name}={value!r}"
    )


def _check_schedule_or_value(name, value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    try:
        return _check_rate(name, value)
    except ValueError:
        raise ValueError(
            f"Argument `{name}` must be a "
            "`keras.optimizers.schedules.LearningRateSchedule` or a finite "
            f"number >= 0. Received: {name}={value!r}"
        ) from None


def _serialize(schedule_or_value):
    if isinstance(schedule_or_value, float):
        return schedule_or_value
    return keras.saving.serialize_keras_object(schedule_or_value)


def _deserialize(config):
    if isinstance(config, dict):
        return keras.saving.deserialize_keras_object(config)
    return config


def _evaluate(schedule_or_value, step):
    """The float32 rate of a schedule (or constant) at `step`."""
    if isinstance(schedule_or_value, float):
        return ops.convert_to_tensor(schedule_or_value, "float32")
    return ops.cast(schedule_or_value(step), "float32")


def _as_step(step):
    """The step clipped at 0: a Python int for a Python or NumPy integer,
    else a tensor in its own dtype.

    Integer steps stay integers: casting to float32 first would round steps
    above 2**24 and make boundary comparisons inexact; casting to int32 would
    overflow at 2**31 (JAX has no int64 unless x64 is enabled).
    """
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        return max(int(step), 0)
    step = ops.convert_to_tensor(step)
    if "int" not in keras.backend.standardize_dtype(step.dtype):
        step = ops.cast(step, "float32")
    return ops.maximum(step, ops.zeros((), step.dtype))


# Step arithmetic on a Python int step (exact at any size, no tensor) or on
# a step tensor (compiled into the training step).


def _constant_like(value, step):
    """A step argument (<= 2**31 - 1, validated) in the type of `step`."""
    if isinstance(step, int):
        return value
    return ops.convert_to_tensor(value, step.dtype)


def _maximum(a, b):
    return max(a, b) if isinstance(a, int) else ops.maximum(a, b)


def _minimum(a, b):
    return min(a, b) if isinstance(a, int) else ops.minimum(a, b)


def _less(a, b):
    return a < b if isinstance(a, int) else ops.less(a, b)


def _greater_equal(a, b):
    return a >= b if isinstance(a, int) else ops.greater_equal(a, b)


def _where(condition, x, y):
    if isinstance(condition, bool):
        return x if condition else y
    return ops.where(condition, x, y)


@keras.saving.register_keras_serializable(package="keras_lamb")
class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup in front of any learning-rate schedule or constant.

    For `step < warmup_steps`:

    ```
    lr(step) = initial_learning_rate
               + (target - initial_learning_rate) * step / warmup_steps
    ```

    and from `warmup_steps` on, `lr(step) = schedule(s)`, where

    - `s = step` with `schedule_step="global"` (the default, as Model Garden's
      `LinearWarmup` and the BERT reference code do: a decay over the whole
      run, `PolynomialDecay(peak, decay_steps=total_steps)`, is evaluated at
      the global step, so it has already decayed by `warmup_steps` when the
      warmup ends);
    - `s = step - warmup_steps` with `schedule_step="after_warmup"` (as the
      MLPerf ResNet-50 LARS reference does: the decay starts at the end of the
      warmup, so give it `decay_steps=total_steps - warmup_steps`).

    `target` is `warmup_target` when given, else `schedule(s)` at the first
    step after the warmup, which makes the rate continuous. The BERT reference
    code (and NVIDIA's) warms up to the peak rate and then jumps to the decay
    evaluated at the global step; pass `warmup_target=peak` for that. Steps
    are counted from 0 (the optimizer's `iterations` before its update), so
    the first step uses `initial_learning_rate`. Negative steps count as 0.

    Args:
        schedule_or_value: a `keras.optimizers.schedules.LearningRateSchedule`
            (any, including another `WarmUp`) or a finite number >= 0 (a
            constant rate after the warmup).
        warmup_steps: integer in [1, 2**31 - 1], the length of the warmup.
        initial_learning_rate: finite number >= 0, the rate at step 0.
            Defaults to `0.0`. Goyal et al. start from the small-batch rate.
        warmup_target: `None` (continuous, see above) or a finite number
            >= 0, the rate the warmup ramps to.
        schedule_step: `"global"` or `"after_warmup"`, the step the wrapped
            schedule sees (see above). Defaults to `"global"`.
        name: name of the schedule's ops. Defaults to `"WarmUp"`.

    Example:

    >>> import keras
    >>> from keras_lamb.schedules import WarmUp
    >>> decay = keras.optimizers.schedules.PolynomialDecay(
    ...     1e-3, decay_steps=1000, end_learning_rate=0.0, power=1.0)
    >>> schedule = WarmUp(decay, warmup_steps=100)
    >>> round(float(schedule(50)), 6)  # halfway to decay(100) = 9e-4
    0.00045
    """

    def __init__(
        self,
        schedule_or_value,
        warmup_steps,
        initial_learning_rate=0.0,
        warmup_target=None,
        schedule_step="global",
        name="WarmUp",
    ):
        super().__init__()
        schedule_or_value = _check_schedule_or_value(
            "schedule_or_value", schedule_or_value
        )
        warmup_steps = _check_steps("warmup_steps", warmup_steps)
        initial_learning_rate = _check_rate(
            "initial_learning_rate", initial_learning_rate
        )
        if warmup_target is not None:
            warmup_target = _check_rate("warmup_target", warmup_target)
        if schedule_step not in SCHEDULE_STEPS:
            raise ValueError(
                f"Argument `schedule_step` must be one of {SCHEDULE_STEPS}. "
                f"Received: schedule_step={schedule_step!r}"
            )
        decay_steps = getattr(schedule_or_value, "decay_steps", None)
        if (
            schedule_step == "global"
            and isinstance(decay_steps, numbers.Integral)
            and warmup_steps > decay_steps
        ):
            raise ValueError(
                "Argument `warmup_steps` must be <= the wrapped schedule's "
                f"`decay_steps` ({decay_steps}) when it sees the global step; "
                "pass schedule_step='after_warmup' to start the schedule "
                f"after the warmup. Received: warmup_steps={warmup_steps}"
            )
        self.schedule_or_value = schedule_or_value
        self.warmup_steps = warmup_steps
        self.initial_learning_rate = initial_learning_rate
        self.warmup_target = warmup_target
        self.schedule_step = schedule_step
        self.name = name

    def __call__(self, step):
        with keras.name_scope(self.name):
            step = _as_step(step)
            warmup_steps = _constant_like(self.warmup_steps, step)
            if self.schedule_step == "global":
                schedule_step = step
                end_of_warmup = warmup_steps
            else:
                schedule_step = _maximum(step - warmup_steps, 0)
                end_of_warmup = _constant_like(0, step)
            after = _evaluate(self.schedule_or_value, schedule_step)
            if self.warmup_target is None:
                target = _evaluate(self.schedule_or_value, end_of_warmup)
            else:
                target = ops.convert_to_tensor(self.warmup_target, "float32")
            # min() before the cast: exact, and the fraction never exceeds 1.
            fraction = ops.cast(
                _minimum(step, warmup_steps), "float32"
            ) / float(self.warmup_steps)
            initial = self.initial_learning_rate
            warm = initial + (target - initial) * fraction
            return _where(_less(step, warmup_steps), warm, after)

    def get_config(self):
        return {
            "schedule_or_value": _serialize(self.schedule_or_value),
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
            "warmup_target": self.warmup_target,
            "schedule_step": self.schedule_step,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule_or_value"] = _deserialize(config["schedule_or_value"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_lamb")
class PhasedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Schedules run one after another, each with its own clock.

    With `boundaries = [b_1, ..., b_n]` and `schedules = [s_0, ..., s_n]`:

    ```
    lr(step) = s_0(step)            for            step <  b_1
    lr(step) = s_i(step - b_i)      for  b_i <= step <  b_(i+1)
    lr(step) = s_n(step - b_n)      for  b_n <= step
    ```

    Each phase sees the step relative to its own start, so a `WarmUp` in phase
    `i` warms up again from its `initial_learning_rate` (BERT phase 2 in the
    LAMB paper and in NVIDIA's recipe restarts the warmup at a new peak).
    Unlike `keras.optimizers.schedules.PiecewiseConstantDecay`, whose
    intervals end at a boundary (`step <= b`), a phase here starts at its
    boundary: step `b_i` is step 0 of phase `i`.

    Args:
        boundaries: strictly increasing integers in [1, 2**31 - 1], the global
            steps at which phases 1..n start.
        schedules: `len(boundaries) + 1` learning-rate schedules or finite
            numbers >= 0.
        name: name of the schedule's ops. Defaults to `"PhasedSchedule"`.

    Example (phase 2 re-warmed from 0 to 4e-3 at step 7038):

    >>> import keras
    >>> from keras_lamb.schedules import PhasedSchedule, WarmUp
    >>> poly = keras.optimizers.schedules.PolynomialDecay
    >>> schedule = PhasedSchedule(
    ...     boundaries=[7038],
    ...     schedules=[
    ...         WarmUp(poly(6e-3, 7038, 0.0, power=0.5), 2001,
    ...                warmup_target=6e-3),
    ...         WarmUp(poly(4e-3, 1563, 0.0, power=0.5), 200,
    ...                warmup_target=4e-3),
    ...     ],
    ... )
    >>> float(schedule(7038))  # phase 2, step 0
    0.0
    """

    def __init__(self, boundaries, schedules, name="PhasedSchedule"):
        super().__init__()
        if not isinstance(boundaries, (list, tuple)) or not boundaries:
            raise ValueError(
                "Argument `boundaries` must be a non-empty list of integers. "
                f"Received: boundaries={boundaries!r}"
            )
        boundaries = [_check_steps("boundaries", b) for b in boundaries]
        if any(a >= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(
                "Argument `boundaries` must be strictly increasing. "
                f"Received: boundaries={boundaries!r}"
            )
        if (
            not isinstance(schedules, (list, tuple))
            or len(schedules) != len(boundaries) + 1
        ):
            raise ValueError(
                "Argument `schedules` must be a list of len(boundaries) + 1 = "
                f"{len(boundaries) + 1} schedules or numbers. "
                f"Received: schedules={schedules!r}"
            )
        self.boundaries = boundaries
        self.schedules = [
            _check_schedule_or_value("schedules", s) for s in schedules
        ]
        self.name = name

    def __call__(self, step):
        with keras.name_scope(self.name):
            step = _as_step(step)
            lr = _evaluate(self.schedules[0], step)
            for boundary, schedule in zip(self.boundaries, self.schedules[1:]):
                start = _constant_like(boundary, step)
                phase_lr = _evaluate(schedule, _maximum(step - start, 0))
                lr = _where(_greater_equal(step, start), phase_lr, lr)
            return lr

    def get_config(self):
        return {
            "boundaries": list(self.boundaries),
            "schedules": [_serialize(s) for s in self.schedules],
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedules"] = [_deserialize(s) for s in config["schedules"]]
        return cls(**config)


def warmup_polynomial_decay(
    peak_learning_rate,
    total_steps,
    warmup_steps,
    end_learning_rate=0.0,
    power=1.0,
    initial_learning_rate=0.0,
    schedule_step="global",
):
    """Linear warmup to a peak, then Keras's `PolynomialDecay` to an end rate.

    The warmup ramps from `initial_learning_rate` to `peak_learning_rate` over
    `warmup_steps`. The decay is
    `keras.optimizers.schedules.PolynomialDecay(peak_learning_rate,
    decay_steps, end_learning_rate, power)`:

    - `schedule_step="global"`: `decay_steps = total_steps`, evaluated at the
      global step, as the BERT reference code and NVIDIA's BERT recipe do. The
      rate jumps from the peak to `decay(warmup_steps)` when the warmup ends
      (for NVIDIA's phase 1, 6e-3 to 6e-3 * (1 - 2001/7038)**0.5 = 5.08e-3).
    - `schedule_step="after_warmup"`: `decay_steps = total_steps -
      warmup_steps`, starting at the end of the warmup, as the MLPerf
      ResNet-50 LARS reference does; the rate is continuous.

    Either way the rate reaches `end_learning_rate` at step `total_steps` and
    stays there.

    Args:
        peak_learning_rate: finite number >= 0.
        total_steps: integer in [2, 2**31 - 1], the length of the run.
        warmup_steps: integer in [1, total_steps - 1].
        end_learning_rate: finite number >= 0. Defaults to `0.0`.
        power: finite number > 0: 1 in the LAMB paper's BERT recipe, 0.5 in
            NVIDIA's, 2 in MLPerf's ResNet-50 LARS. Defaults to `1.0`.
        initial_learning_rate: finite number >= 0. Defaults to `0.0`.
        schedule_step: `"global"` or `"after_warmup"`, see above.

    Returns:
        A `WarmUp` wrapping a `PolynomialDecay`.
    """
    peak_learning_rate = _check_rate("peak_learning_rate", peak_learning_rate)
    end_learning_rate = _check_rate("end_learning_rate", end_learning_rate)
    total_steps = _check_steps("total_steps", total_steps, low=2)
    if (
        not isinstance(warmup_steps, numbers.Integral)
        or isinstance(warmup_steps, bool)
        or not 1 <= warmup_steps < total_steps
    ):
        raise ValueError(
            "Argument `warmup_steps` must be an integer in [1, total_steps) = "
            f"[1, {total_steps}). Received: warmup_steps={warmup_steps!r}"
        )
    if (
        not isinstance(power, numbers.Real)
        or isinstance(power, bool)
        or not math.isfinite(power)
        or power <= 0
    ):
        raise ValueError(
            f"Argument `power` must be a finite number > 0. Received: "
            f"power={power!r}"
        )
    if schedule_step not in SCHEDULE_STEPS:
        raise ValueError(
            f"Argument `schedule_step` must be one of {SCHEDULE_STEPS}. "
            f"Received: schedule_step={schedule_step!r}"
        )
    after_warmup = schedule_step == "after_warmup"
    decay = keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=peak_learning_rate,
        decay_steps=total_steps - warmup_steps if after_warmup else total_steps,
        end_learning_rate=end_learning_rate,
        power=float(power),
    )
    return WarmUp(
        decay,
        warmup_steps=int(warmup_steps),
        initial_learning_rate=initial_learning_rate,
        warmup_target=None if after_warmup else peak_learning_rate,
        schedule_step=schedule_step,
    )
