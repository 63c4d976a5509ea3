"""Optimizers and learning-rate schedules chosen by name, for the scripts.

`make_optimizer` returns the optimizer and the coefficient of an L2 penalty
for the loss: the SGD optimizers (`momentum`, `nesterov`) decay weights the
way Goyal et al. and the ResNet reference code do, by an L2 term in the loss
(the gradient becomes `g + weight_decay * w`, which then goes through the
momentum buffer); LARS and LAMB put `weight_decay * w` inside their trust
ratio; AdamW decays decoupled. Recipes (`--recipe`) come from
`keras_lamb.recipes`; this module is the `--recipe=none` path.
"""

import keras

import keras_lamb
from keras_lamb.schedules import WarmUp

OPTIMIZER_NAMES = ("lars", "lamb", "momentum", "nesterov", "adamw")
DECAY_NAMES = ("cosine", "polynomial", "constant")
SCALING_RULES = ("linear", "sqrt", "none")


def scale_learning_rate(base_learning_rate, base_batch_size, batch_size, rule):
    """The learning rate for `batch_size` from one tuned at
    `base_batch_size`: `linear` (Goyal et al.), `sqrt` (Krizhevsky; You et
    al. for LAMB) or `none`."""
    try:
        from keras_lamb.recipes import scale_learning_rate as scale
    except ImportError:
        scale = None
    if scale is not None:
        return scale(base_learning_rate, base_batch_size, batch_size, rule)
    ratio = batch_size / base_batch_size
    factors = {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}
    if rule not in factors:
        raise ValueError(
            f"Unknown scaling rule {rule!r}; expected one of: "
            f"{', '.join(SCALING_RULES)}."
        )
    return base_learning_rate * factors[rule]


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


def make_optimizer(name, learning_rate, momentum=0.9, beta_1=0.9,
                   beta_2=0.999, epsilon=None, weight_decay=0.0,
                   trust_coefficient=1e-3, exclude_from_weight_decay=None,
                   exclude_from_layer_adaptation=None,
                   track_trust_ratios=False, clip_trust_ratio=False):
    """`(optimizer, l2_in_loss)` for `name` in `OPTIMIZER_NAMES`.

    `exclude_*` are regular expressions searched in `variable.path` (AdamW:
    in `variable.name`, Keras's own rule). `epsilon=None` keeps each
    optimizer's default.
    """
    eps = {} if epsilon is None else {"epsilon": epsilon}
    if name in ("momentum", "nesterov"):
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=momentum, nesterov=name == "nesterov"
        )
        return optimizer, weight_decay
    if name == "adamw":
        optimizer = keras.optimizers.AdamW(
            learning_rate, weight_decay=weight_decay, beta_1=beta_1,
            beta_2=beta_2, **eps,
        )
        if exclude_from_weight_decay:
            optimizer.exclude_from_weight_decay(
                var_names=[exclude_from_weight_decay]
            )
        return optimizer, 0.0
    if name == "lars":
        optimizer = keras_lamb.LARS(
            learning_rate, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            clip_trust_ratio=clip_trust_ratio,
            track_trust_ratios=track_trust_ratios, **eps,
        )
        return optimizer, 0.0
    if name == "lamb":
        optimizer = keras_lamb.LAMB(
            learning_rate, beta_1=beta_1, beta_2=beta_2,
            weight_decay=weight_decay,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            track_trust_ratios=track_trust_ratios, **eps,
        )
        return optimizer, 0.0
    raise ValueError(
        f"Unknown --optimizer={name!r}; expected one of: "
        f"{', '.join(OPTIMIZER_NAMES)}."
    )
