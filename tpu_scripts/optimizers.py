"""Optimizers and learning-rate schedules chosen by name, for the scripts.

`make_optimizer` builds the optimizer and `l2_in_loss` gives the coefficient
of the L2 penalty the loss needs with it: the SGD optimizers (`momentum`, `nesterov`) decay weights the
way Goyal et al. and the ResNet reference code do, by an L2 term in the loss
(the gradient becomes `g + weight_decay * w`, which then goes through the
momentum buffer); LARS and LAMB put `weight_decay * w` inside their trust
ratio; AdamW decays decoupled. Recipes (`--recipe`) come from
`keras_lamb.recipes`; this module is the `--recipe=none` path.
"""

import keras

import keras_lamb
from keras_lamb import recipes
from keras_lamb.schedules import WarmUp
from keras_lamb.trust_ratio import ExclusionRule

OPTIMIZER_NAMES = ("lars", "lamb", "momentum", "nesterov", "adamw")
DECAY_NAMES = ("cosine", "polynomial", "constant")
SCALING_RULES = ("linear", "sqrt", "none")


def scale_learning_rate(base_learning_rate, base_batch_size, batch_size, rule):
    """`keras_lamb.recipes.scale_learning_rate` (`linear`, `sqrt`), plus
    `none` (the rate unchanged)."""
    if rule not in SCALING_RULES:
        raise ValueError(
            f"Unknown --lr_scaling={rule!r}; expected one of: "
            f"{', '.join(SCALING_RULES)}."
        )
    if rule == "none":
        return float(base_learning_rate)
    return recipes.scale_learning_rate(
        base_learning_rate, base_batch_size, batch_size, rule
    )


def make_schedule(peak_learning_rate, total_steps, warmup_steps,
                  decay="cosine", end_learning_rate=0.0, power=2.0,
                  initial_learning_rate=0.0):
    """Linear warmup to `peak_learning_rate`, then `decay` to
    `end_learning_rate` at `total_steps` (the decay starts when the warmup
    ends: `keras_lamb.schedules.WarmUp(schedule_step="after_warmup")`).

    `decay`: `cosine` (Keras `CosineDecay`), `polynomial` (Keras
    `PolynomialDecay` with `power`; MLPerf LARS uses 2) or `constant`.
    """
    if decay not in DECAY_NAMES:
        raise ValueError(
            f"Unknown --decay={decay!r}; expected one of: "
            f"{', '.join(DECAY_NAMES)}."
        )
    decay_steps = max(total_steps - warmup_steps, 1)
    if decay == "constant":
        schedule = float(peak_learning_rate)
    elif decay == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(
            peak_learning_rate, decay_steps,
            alpha=(end_learning_rate / peak_learning_rate
                   if peak_learning_rate else 0.0),
        )
    else:
        schedule = keras.optimizers.schedules.PolynomialDecay(
            peak_learning_rate, decay_steps, end_learning_rate, power=power
        )
    if warmup_steps <= 0:
        return schedule
    return WarmUp(
        schedule, warmup_steps,
        initial_learning_rate=initial_learning_rate,
        schedule_step="after_warmup",
    )


class PathExcludingAdamW(keras.optimizers.AdamW):
    """Keras's AdamW, with weight-decay exclusions matched against
    `variable.path` (`conv1_bn/gamma`) like keras_lamb's, instead of Keras's
    `variable.name` (`gamma`), where a pattern like `bn` never matches.

    The rule is resolved at `build` from the Keras variables: on the
    TensorFlow backend the decay step only sees the raw `tf.Variable`.
    """

    def __init__(self, *args, exclude_paths=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._exclude_paths = ExclusionRule(
            exclude_paths, "exclude_from_weight_decay"
        )

    def build(self, var_list):
        if not self.built:
            excluded = [v for v in var_list
                        if self._exclude_paths.excludes(v)]
            if excluded:
                self.exclude_from_weight_decay(var_list=excluded)
        super().build(var_list)


def l2_in_loss(name, weight_decay):
    """Coefficient of the L2 loss term `name` needs: the weight decay for
    the SGD optimizers (Goyal et al.), 0 for the others, which decay inside
    their update."""
    return weight_decay if name in ("momentum", "nesterov") else 0.0


def make_optimizer(name, learning_rate, momentum=0.9, beta_1=0.9,
                   beta_2=0.999, epsilon=None, weight_decay=0.0,
                   trust_coefficient=1e-3, exclude_from_weight_decay=None,
                   exclude_from_layer_adaptation=None,
                   track_trust_ratios=False, clip_trust_ratio=False):
    """The optimizer `name` (one of `OPTIMIZER_NAMES`); SGD ones need
    `l2_in_loss(name, weight_decay)` in the loss.

    `exclude_*` are regular expressions searched in `variable.path`.
    `epsilon=None` keeps each optimizer's default.
    """
    eps = {} if epsilon is None else {"epsilon": epsilon}
    if name in ("momentum", "nesterov"):
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=momentum, nesterov=name == "nesterov"
        )
        return optimizer
    if name == "adamw":
        return PathExcludingAdamW(
            learning_rate, weight_decay=weight_decay, beta_1=beta_1,
            beta_2=beta_2, exclude_paths=exclude_from_weight_decay, **eps,
        )
    if name == "lars":
        optimizer = keras_lamb.LARS(
            learning_rate, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            clip_trust_ratio=clip_trust_ratio,
            track_trust_ratios=track_trust_ratios, **eps,
        )
        return optimizer
    if name == "lamb":
        optimizer = keras_lamb.LAMB(
            learning_rate, beta_1=beta_1, beta_2=beta_2,
            weight_decay=weight_decay,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            track_trust_ratios=track_trust_ratios, **eps,
        )
        return optimizer
    raise ValueError(
        f"Unknown --optimizer={name!r}; expected one of: "
        f"{', '.join(OPTIMIZER_NAMES)}."
    )
