"""Large-batch training recipes from the papers, as ready optimizers.

Each function returns `(optimizer, schedule, notes)`: a compiled-ready Keras
optimizer whose learning rate is `schedule`, and a dict with the numbers used
and their source. The sources' numbers are module-level tables, so that tests
can check them against the papers and users can read them in one place.

Step convention (see `keras_lamb.schedules.WarmUp`): steps count optimizer
updates from 0, and `round()` turns fractions of a run into whole steps.
"""

import math
import numbers

import keras

from keras_lamb.lamb import LAMB
from keras_lamb.lars import LARS
from keras_lamb.schedules import (
    PhasedSchedule,
    WarmUp,
    warmup_polynomial_decay,
)

__all__ = [
    "BERT_EXCLUDE",
    "LAMB_BERT_TABLE",
    "LAMB_BERT_64K_32K_PHASES",
    "MLPERF_RESNET50_LARS_TABLE",
    "RESNET_EXCLUDE",
    "adamw_control",
    "goyal_momentum",
    "lamb_bert",
    "lamb_bert_64k_32k",
    "lars_resnet50",
    "nesterov_control",
    "scale_learning_rate",
]

# Variables of keras-hub's BertBackbone (and of TF1 BERT checkpoints) that the
# LAMB recipes exclude from weight decay and from layer adaptation:
# `embeddings_layer_norm/gamma`, `.../self_attention_layer_norm/beta`,
# `.../query/bias`, ... (keras-hub 0.32 paths; TF1 BERT used `LayerNorm`).
BERT_EXCLUDE = "layer_norm|LayerNorm|bias"

# Batch norm and biases of keras.applications.ResNet50 (`conv1_bn/gamma`,
# `conv1_conv/bias`, `predictions/bias`) and keras-hub ResNetBackbone
# (`stack0_block0_1_bn/beta`); `batch_norm` also covers Keras's default
# `batch_normalization` layer names, the MLPerf reference's skip list.
RESNET_EXCLUDE = "bn|batch_norm|bias"

# LAMB paper (You et al., arXiv:1904.00962), table "Untuned LAMB for BERT
# training across different batch sizes (fixed #epochs)": square-root scaling
# of the rate, warmup ratio doubling with the batch ("LEGW").
# global_batch_size: (peak_learning_rate = 5 / (2**k * 10**3), warmup_ratio,
#                     iterations)
LAMB_BERT_TABLE = {
    512: (5 / (2**3.0 * 10**3), 1 / 320, 1_000_000),
    1024: (5 / (2**2.5 * 10**3), 1 / 160, 500_000),
    2048: (5 / (2**2.0 * 10**3), 1 / 80, 250_000),
    4096: (5 / (2**1.5 * 10**3), 1 / 40, 125_000),
    8192: (5 / (2**1.0 * 10**3), 1 / 20, 62_500),
    16384: (5 / (2**0.5 * 10**3), 1 / 10, 31_250),
    32768: (5 / (2**0.0 * 10**3), 1 / 5, 15_625),
}
LAMB_BERT_SETTINGS = dict(
    weight_decay=0.01,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-6,
    global_clipnorm=1.0,
    decay_power=1.0,
    end_learning_rate=0.0,
)

# NVIDIA DeepLearningExamples, PyTorch BERT `scripts/run_pretraining.sh`
# (LAMB, 64k/32k): one dict per phase.
LAMB_BERT_64K_32K_PHASES = (
    dict(global_batch_size=65_536, sequence_length=128,
         peak_learning_rate=6e-3, warmup_ratio=0.2843, steps=7_038),
    dict(global_batch_size=32_768, sequence_length=512,
         peak_learning_rate=4e-3, warmup_ratio=0.128, steps=1_563),
)
NVIDIA_BERT_DECAY_POWER = 0.5

# MLPerf ResNet-50 TensorFlow/TPU reference, `lars_util.poly_rate_schedule`:
# rows (global batch sizes below, peak_learning_rate, warmup_epochs,
# momentum); the last row has no upper bound. Momentum 0.94 at 32k is from
# the MLPerf submissions, not from the reference code (a flag there).
MLPERF_RESNET50_LARS_TABLE = (
    (16_384, 10.0, 5, 0.9),
    (32_768, 25.0, 5, 0.9),
    (None, 31.2, 25, 0.94),
)
MLPERF_RESNET50_LARS_SETTINGS = dict(
    end_learning_rate=1e-4,
    decay_power=2.0,
    trust_coefficient=1e-3,
    epsilon=0.0,
    label_smoothing=0.1,
)

# Goyal et al. (arXiv:1706.02677): rate 0.1 per 256 images, 5-epoch gradual
# warmup from 0.1, x0.1 at epochs 30, 60, 80 of 90, momentum 0.9, wd 1e-4.
GOYAL_SETTINGS = dict(
    base_learning_rate=0.1,
    base_batch_size=256,
    warmup_epochs=5,
    reference_epochs=90,
    decay_epochs=(30, 60, 80),
    decay_factor=0.1,
    momentum=0.9,
    weight_decay=1e-4,
)

SCALING_RULES = ("linear", "sqrt")


def _check_int(name, value, low=1):
    if (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and value >= low
    ):
        return int(value)
    raise ValueError(
        f"Argument `{name}` must be an integer >= {low}. "
        f"Received: {name}={value!r}"
    )


def _check_positive(name, value, allow_zero=False):
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if ok:
        return float(value)
    raise ValueError(
        f"Argument `{name}` must be a finite number "
        f"{'>=' if allow_zero else '>'} 0. Received: {name}={value!r}"
    )


def _check_warmup(warmup_steps, total_steps, how):
    """Raises unless 1 <= warmup_steps < total_steps."""
    if not 1 <= warmup_steps < total_steps:
        raise ValueError(
            f"Argument `warmup_steps` must be in [1, total_steps) = "
            f"[1, {total_steps}) ({how}). Received: "
            f"warmup_steps={warmup_steps}"
        )


def scale_learning_rate(base_learning_rate, base_batch_size, batch_size,
                        rule="linear"):
    """Scales a learning rate tuned at one batch size to another.

    `linear`: `base_learning_rate * batch_size / base_batch_size` (Goyal et
    al. 2017, arXiv:1706.02677, for SGD with momentum). `sqrt`:
    `base_learning_rate * sqrt(batch_size / base_batch_size)` (the LAMB
    paper's scaling for BERT, arXiv:1904.00962; Krizhevsky 2014).

    Args:
        base_learning_rate: finite number >= 0.
        base_batch_size: integer >= 1, the batch size the rate was tuned at.
        batch_size: integer >= 1, the new batch size.
        rule: `"linear"` or `"sqrt"`. Defaults to `"linear"`.

    Returns:
        The scaled rate, a float.

    >>> scale_learning_rate(0.1, 256, 8192)
    3.2
    >>> scale_learning_rate(5e-3, 32768, 512, rule="sqrt")
    0.000625
    """
    base_learning_rate = _check_positive(
        "base_learning_rate", base_learning_rate, allow_zero=True
    )
    base_batch_size = _check_int("base_batch_size", base_batch_size)
    batch_size = _check_int("batch_size", batch_size)
    if rule not in SCALING_RULES:
        raise ValueError(
            f"Argument `rule` must be one of {SCALING_RULES}. "
            f"Received: rule={rule!r}"
        )
    factor = batch_size / base_batch_size
    if rule == "sqrt":
        factor = math.sqrt(factor)
    return base_learning_rate * factor


def lamb_bert(global_batch_size, total_steps=None, weight_decay=0.01,
              track_trust_ratios=False):
    """LAMB for BERT-Large pre-training at one batch size (You et al.).

    Numbers: `LAMB_BERT_TABLE`, the LAMB paper's table of untuned LAMB for
    BERT across batch sizes at a fixed number of epochs: for batch 512, 1k,
    2k, 4k, 8k, 16k, 32k the peak rate is `5 / (2**k * 10**3)` with k = 3.0,
    2.5, ..., 0.0 (6.25e-4 ... 5e-3, square-root scaling), the warmup ratio
    is 1/320, 1/160, ..., 1/5 (doubling with each doubling of the batch) and
    the run is 1M, 500k, ..., 15,625 iterations, so every entry warms up for
    3,125 steps. Between table entries the same two rules are applied: peak
    `5e-3 * sqrt(B / 32768)` (square-root scaling), warmup ratio
    `(1/5) * B / 32768`, and `round(1e6 * 512 / B)` iterations; the notes say
    `"interpolated": True`. Batch sizes outside [512, 32768] are outside the
    table and rejected (see `lamb_bert_64k_32k` for 64k).

    Fixed settings (`LAMB_BERT_SETTINGS`): weight decay 0.01, beta_1 0.9,
    beta_2 0.999, epsilon 1e-6, gradient clipping at global norm 1.0, linear
    decay (power 1) to 0. LayerNorm parameters and biases (`BERT_EXCLUDE`,
    matching keras-hub's BERT paths) are excluded from weight decay and from
    layer adaptation. The schedule follows the BERT reference code: linear
    warmup to the peak, then `PolynomialDecay(peak, total_steps)` evaluated
    at the global step.

    Args:
        global_batch_size: integer in [512, 32768], sequences per step.
        total_steps: `None` (the table's fixed-epoch iteration count) or an
            integer > the warmup, to shorten or lengthen the run; the warmup
            stays `warmup_ratio * total_steps`.
        weight_decay: finite number >= 0. Defaults to `0.01`.
        track_trust_ratios: passed to `LAMB`.

    Returns:
        `(optimizer, schedule, notes)`.

    References:
        - You et al., *Large Batch Optimization for Deep Learning: Training
          BERT in 76 minutes*, ICLR 2020, arXiv:1904.00962, table of untuned
          LAMB for BERT (square-root LR scaling, LEGW warmup).
    """
    global_batch_size = _check_int("global_batch_size", global_batch_size)
    smallest, largest = min(LAMB_BERT_TABLE), max(LAMB_BERT_TABLE)
    if not smallest <= global_batch_size <= largest:
        raise ValueError(
            f"Argument `global_batch_size` must be in [{smallest}, {largest}], "
            "the range of the LAMB paper's table (use `lamb_bert_64k_32k()` "
            "for the 64k/32k two-phase recipe). Received: "
            f"global_batch_size={global_batch_size}"
        )
    weight_decay = _check_positive("weight_decay", weight_decay,
                                   allow_zero=True)
    interpolated = global_batch_size not in LAMB_BERT_TABLE
    if interpolated:
        scale = global_batch_size / largest
        peak = LAMB_BERT_TABLE[largest][0] * math.sqrt(scale)
        warmup_ratio = LAMB_BERT_TABLE[largest][1] * scale
        table_steps = round(LAMB_BERT_TABLE[smallest][2] * smallest
                            / global_batch_size)
    else:
        peak, warmup_ratio, table_steps = LAMB_BERT_TABLE[global_batch_size]
    if total_steps is None:
        total_steps = table_steps
    total_steps = _check_int("total_steps", total_steps, low=2)
    warmup_steps = max(1, round(warmup_ratio * total_steps))
    _check_warmup(warmup_steps, total_steps,
                  f"warmup ratio {warmup_ratio:.6g} of total_steps")
    settings = LAMB_BERT_SETTINGS
    schedule = warmup_polynomial_decay(
        peak, total_steps, warmup_steps,
        end_learning_rate=settings["end_learning_rate"],
        power=settings["decay_power"],
    )
    optimizer = LAMB(
        learning_rate=schedule,
        beta_1=settings["beta_1"],
        beta_2=settings["beta_2"],
        epsilon=settings["epsilon"],
        weight_decay=weight_decay,
        exclude_from_weight_decay=BERT_EXCLUDE,
        exclude_from_layer_adaptation=BERT_EXCLUDE,
        global_clipnorm=settings["global_clipnorm"],
        track_trust_ratios=track_trust_ratios,
    )
    notes = dict(
        source="You et al., arXiv:1904.00962, untuned LAMB for BERT table",
        global_batch_size=global_batch_size,
        interpolated=interpolated,
        peak_learning_rate=peak,
        warmup_ratio=warmup_ratio,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay_power=settings["decay_power"],
        end_learning_rate=settings["end_learning_rate"],
        weight_decay=weight_decay,
        epsilon=settings["epsilon"],
        global_clipnorm=settings["global_clipnorm"],
        exclude_from_weight_decay=BERT_EXCLUDE,
        exclude_from_layer_adaptation=BERT_EXCLUDE,
    )
    return optimizer, schedule, notes


def lamb_bert_64k_32k(weight_decay=0.01, track_trust_ratios=False):
    """LAMB for BERT-Large with mixed batch sizes: 64k/seq 128, then 32k/512.

    The LAMB paper trains BERT in 8,599 iterations with batch 65,536 at
    sequence length 128 and then batch 32,768 at sequence length 512,
    re-warming the learning rate for the second phase. Its text does not give
    every number of that schedule that we could confirm (peak rates, warmup
    lengths, decay power per phase), so this recipe uses NVIDIA's public LAMB
    recipe (`LAMB_BERT_64K_32K_PHASES`): phase 1 batch 65,536, sequence 128,
    peak 6e-3, warmup 28.43 %, 7,038 steps; phase 2 batch 32,768, sequence
    512, peak 4e-3, warmup 12.8 %, 1,563 steps (8,601 in all, two more than
    the paper's 8,599). NVIDIA decays with power 0.5 (`(1 - t/T)**0.5`),
    warms up to the peak and evaluates the decay at the phase's step, which
    `warmup_polynomial_decay` reproduces. Phase 2 restarts its clock at step
    7,038 (`PhasedSchedule`), warming up again from 0.

    One optimizer runs both phases, so its moments carry over; switching the
    data pipeline (batch size, sequence length) at `notes["phase_boundaries"]`
    is up to the training loop. Other settings as `lamb_bert`: weight decay
    0.01, epsilon 1e-6, global clipnorm 1.0, LayerNorm and biases excluded
    from decay and adaptation. Warmup steps are `round(ratio * steps)`: 2,001
    and 200.

    Args:
        weight_decay: finite number >= 0. Defaults to `0.01`.
        track_trust_ratios: passed to `LAMB`.

    Returns:
        `(optimizer, schedule, notes)`; `notes["phases"]` lists each phase's
        batch size, sequence length, peak, warmup and steps.

    References:
        - You et al., arXiv:1904.00962 (mixed-batch BERT training).
        - NVIDIA DeepLearningExamples, PyTorch/LanguageModeling/BERT,
          `scripts/run_pretraining.sh` (phase 1 and phase 2 defaults) and
          its `PolyWarmUpScheduler` (degree 0.5).
    """
    weight_decay = _check_positive("weight_decay", weight_decay,
                                   allow_zero=True)
    phases, schedules, boundaries, start = [], [], [], 0
    for phase in LAMB_BERT_64K_32K_PHASES:
        warmup_steps = round(phase["warmup_ratio"] * phase["steps"])
        schedules.append(warmup_polynomial_decay(
            phase["peak_learning_rate"], phase["steps"], warmup_steps,
            power=NVIDIA_BERT_DECAY_POWER,
        ))
        phases.append(dict(phase, warmup_steps=warmup_steps,
                           start_step=start))
        if start:
            boundaries.append(start)
        start += phase["steps"]
    schedule = PhasedSchedule(boundaries, schedules)
    settings = LAMB_BERT_SETTINGS
    optimizer = LAMB(
        learning_rate=schedule,
        beta_1=settings["beta_1"],
        beta_2=settings["beta_2"],
        epsilon=settings["epsilon"],
        weight_decay=weight_decay,
        exclude_from_weight_decay=BERT_EXCLUDE,
        exclude_from_layer_adaptation=BERT_EXCLUDE,
        global_clipnorm=settings["global_clipnorm"],
        track_trust_ratios=track_trust_ratios,
    )
    notes = dict(
        source=(
            "NVIDIA DeepLearningExamples BERT LAMB recipe (the LAMB paper's "
            "own 64k/32k values could not be confirmed from its text)"
        ),
        phases=phases,
        phase_boundaries=boundaries,
        total_steps=start,
        decay_power=NVIDIA_BERT_DECAY_POWER,
        end_learning_rate=0.0,
        weight_decay=weight_decay,
        epsilon=settings["epsilon"],
        global_clipnorm=settings["global_clipnorm"],
        exclude_from_weight_decay=BERT_EXCLUDE,
        exclude_from_layer_adaptation=BERT_EXCLUDE,
    )
    return optimizer, schedule, notes


def lars_resnet50(global_batch_size, epochs, steps_per_epoch,
                  weight_decay=1e-4, momentum=None, track_trust_ratios=False):
    """LARS for ResNet-50 on ImageNet, the MLPerf recipe.

    Numbers: `MLPERF_RESNET50_LARS_TABLE`, from the MLPerf ResNet-50
    TensorFlow/TPU reference (`lars_util.poly_rate_schedule`): peak rate 10
    for global batches below 16,384, 25 below 32,768 and 31.2 from 32,768;
    warmup 5, 5 and 25 epochs respectively; then polynomial decay with power
    2 to 1e-4, starting at the end of the warmup (the reference decays
    `max(1, step - warmup)` over `total - warmup + 1` steps; here
    `step - warmup` over `total - warmup`, which differs by under one step).
    Momentum 0.9, and 0.94 at 32,768 and above as in the MLPerf submissions
    (the reference code takes it as a flag). Trust coefficient 1e-3, epsilon
    0. Batch norm parameters and biases (`RESNET_EXCLUDE`, matching
    keras.applications and keras-hub ResNet paths) are excluded from weight
    decay and from layer adaptation, as the reference's skip list
    `['batch_normalization', 'bias']` does. The reference also uses label
    smoothing 0.1: put `notes["label_smoothing"]` in your loss
    (`keras.losses.CategoricalCrossentropy(label_smoothing=0.1)`).

    Args:
        global_batch_size: integer >= 1.
        epochs: finite number > 0 (MLPerf runs use 35-45); total steps are
            `round(epochs * steps_per_epoch)`.
        steps_per_epoch: integer >= 1 (ImageNet: 1,281,167 images /
            global batch).
        weight_decay: finite number >= 0. Defaults to `1e-4` (the MLPerf
            rules allow 1e-4 * 2**N).
        momentum: `None` (from the table) or a float in [0, 1).
        track_trust_ratios: passed to `LARS`.

    Returns:
        `(optimizer, schedule, notes)`.

    References:
        - You, Gitman, Ginsburg, *Large Batch Training of Convolutional
          Networks*, arXiv:1708.03888.
        - MLPerf Training ResNet-50 reference (TensorFlow/TPU),
          `lars_util.py`, `poly_rate_schedule` and `init_lars_optimizer`.
    """
    global_batch_size = _check_int("global_batch_size", global_batch_size)
    epochs = _check_positive("epochs", epochs)
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch)
    for below, peak, warmup_epochs, table_momentum in (
        MLPERF_RESNET50_LARS_TABLE
    ):
        if below is None or global_batch_size < below:
            break
    if momentum is None:
        momentum = table_momentum
    settings = MLPERF_RESNET50_LARS_SETTINGS
    total_steps = round(epochs * steps_per_epoch)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    _check_warmup(warmup_steps, total_steps,
                  f"{warmup_epochs} warmup epochs of {epochs:g} epochs")
    schedule = warmup_polynomial_decay(
        peak, total_steps, warmup_steps,
        end_learning_rate=settings["end_learning_rate"],
        power=settings["decay_power"],
        schedule_step="after_warmup",
    )
    optimizer = LARS(
        learning_rate=schedule,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=settings["trust_coefficient"],
        epsilon=settings["epsilon"],
        exclude_from_weight_decay=RESNET_EXCLUDE,
        exclude_from_layer_adaptation=RESNET_EXCLUDE,
        track_trust_ratios=track_trust_ratios,
    )
    notes = dict(
        source=("MLPerf ResNet-50 TF/TPU reference, "
                "lars_util.poly_rate_schedule"),
        global_batch_size=global_batch_size,
        peak_learning_rate=peak,
        warmup_epochs=warmup_epochs,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay_power=settings["decay_power"],
        end_learning_rate=settings["end_learning_rate"],
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=settings["trust_coefficient"],
        label_smoothing=settings["label_smoothing"],
        exclude_from_weight_decay=RESNET_EXCLUDE,
        exclude_from_layer_adaptation=RESNET_EXCLUDE,
    )
    return optimizer, schedule, notes


def goyal_momentum(global_batch_size, epochs, steps_per_epoch,
                   weight_decay=1e-4, exclude_from_weight_decay=None,
                   nesterov=False):
    """SGD with momentum and the linear scaling rule (Goyal et al. 2017).

    Numbers (`GOYAL_SETTINGS`): rate `0.1 * global_batch_size / 256`;
    gradual warmup over 5 epochs, linear from 0.1 (the batch-256 rate) to the
    scaled rate; the rate divided by 10 at epochs 30, 60 and 80 of a 90-epoch
    run, moved proportionally for other epoch budgets (`keras.optimizers.
    schedules.PiecewiseConstantDecay`, whose boundary step still uses the
    earlier rate); momentum 0.9; weight decay 1e-4.

    Weight decay: this returns `keras.optimizers.SGD(weight_decay=...)`,
    whose decay is *decoupled*: before each step `w -= lr * weight_decay *
    w`, outside the momentum buffer. Goyal et al. add `weight_decay * w` to
    the gradient (an L2 term), which then accumulates in the momentum; with
    momentum 0.9 that decay acts about 10 times more strongly at a steady
    rate. To reproduce the paper exactly, pass `weight_decay=0` and add
    `keras.regularizers.L2(weight_decay / 2)` to the layers (Keras's L2
    penalty `l * sum(w**2)` has gradient `2 * l * w`). Whether the paper
    decays batch-norm parameters could not be confirmed here, so it is an
    argument: `exclude_from_weight_decay` takes Keras's `var_names` (matched
    against `variable.name`, e.g. `["gamma", "beta", "bias"]`; Keras does not
    save this list in the optimizer config).

    Args:
        global_batch_size: integer >= 1.
        epochs: finite number > 0, the epoch budget (90 in the paper).
        steps_per_epoch: integer >= 1.
        weight_decay: finite number >= 0. Defaults to `1e-4`.
        exclude_from_weight_decay: `None`, a name pattern or a list of them.
        nesterov: bool. Defaults to `False`.

    Returns:
        `(optimizer, schedule, notes)`.

    References:
        - Goyal et al., *Accurate, Large Minibatch SGD: Training ImageNet in
          1 Hour*, arXiv:1706.02677, sections 2.1-2.2 and 5.1.
    """
    global_batch_size = _check_int("global_batch_size", global_batch_size)
    epochs = _check_positive("epochs", epochs)
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch)
    weight_decay = _check_positive("weight_decay", weight_decay,
                                   allow_zero=True)
    settings = GOYAL_SETTINGS
    base = settings["base_learning_rate"]
    peak = scale_learning_rate(base, settings["base_batch_size"],
                               global_batch_size)
    total_steps = round(epochs * steps_per_epoch)
    warmup_steps = round(settings["warmup_epochs"] * steps_per_epoch)
    boundaries = [
        round(e / settings["reference_epochs"] * epochs * steps_per_epoch)
        for e in settings["decay_epochs"]
    ]
    if not 1 <= warmup_steps < boundaries[0]:
        raise ValueError(
            "Argument `epochs` must leave the "
            f"{settings['warmup_epochs']}-epoch warmup ({warmup_steps} steps) "
            f"room before the first decay (step {boundaries[0]}, epoch "
            f"{settings['decay_epochs'][0]} of {settings['reference_epochs']} "
            f"scaled to the budget). Received: epochs={epochs:g}"
        )
    values = [peak * settings["decay_factor"] ** i
              for i in range(len(boundaries) + 1)]
    schedule = WarmUp(
        keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values),
        warmup_steps=warmup_steps,
        initial_learning_rate=min(base, peak),
    )
    optimizer = keras.optimizers.SGD(
        learning_rate=schedule,
        momentum=settings["momentum"],
        nesterov=nesterov,
        weight_decay=weight_decay or None,
    )
    if isinstance(exclude_from_weight_decay, str):
        exclude_from_weight_decay = [exclude_from_weight_decay]
    if exclude_from_weight_decay:
        optimizer.exclude_from_weight_decay(
            var_names=list(exclude_from_weight_decay)
        )
    notes = dict(
        source="Goyal et al., arXiv:1706.02677",
        global_batch_size=global_batch_size,
        peak_learning_rate=peak,
        initial_learning_rate=min(base, peak),
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay_boundaries=boundaries,
        decay_values=values,
        momentum=settings["momentum"],
        weight_decay=weight_decay,
        weight_decay_mode="decoupled (keras.optimizers.SGD)",
        exclude_from_weight_decay=exclude_from_weight_decay,
    )
    return optimizer, schedule, notes


def nesterov_control(global_batch_size, epochs, steps_per_epoch,
                     peak_learning_rate, warmup_epochs, weight_decay,
                     momentum, end_learning_rate=1e-4, decay_power=2.0):
    """Nesterov momentum with LARS's schedule: the control for LARS.

    Nado et al. (2021) show that standard Nesterov momentum, tuned, matches
    LARS on ResNet-50 at large batch sizes, so a LARS result needs this
    baseline beside it. Their tuned values (peak rate, warmup, weight decay,
    momentum) could not be confirmed from the text available to us, so they
    are required arguments here, not defaults. The schedule has the shape of
    `lars_resnet50`'s (linear warmup, then polynomial decay from the end of
    the warmup; `end_learning_rate=1e-4`, `decay_power=2` by default, our
    choice so that the comparison changes only the optimizer). Weight decay is
    `keras.optimizers.SGD`'s, decoupled (see `goyal_momentum`).

    Args:
        global_batch_size: integer >= 1 (recorded in the notes).
        epochs: finite number > 0.
        steps_per_epoch: integer >= 1.
        peak_learning_rate: finite number >= 0.
        warmup_epochs: finite number > 0.
        weight_decay: finite number >= 0.
        momentum: float in [0, 1).
        end_learning_rate: finite number >= 0. Defaults to `1e-4`.
        decay_power: finite number > 0. Defaults to `2.0`.

    Returns:
        `(optimizer, schedule, notes)`.

    References:
        - Nado et al., *A Large Batch Optimizer Reality Check: Traditional,
          Generic Optimizers Suffice Across Batch Sizes*, arXiv:2102.06356.
    """
    global_batch_size = _check_int("global_batch_size", global_batch_size)
    epochs = _check_positive("epochs", epochs)
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch)
    warmup_epochs = _check_positive("warmup_epochs", warmup_epochs)
    weight_decay = _check_positive("weight_decay", weight_decay,
                                   allow_zero=True)
    total_steps = round(epochs * steps_per_epoch)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    _check_warmup(warmup_steps, total_steps,
                  f"{warmup_epochs:g} warmup epochs of {epochs:g} epochs")
    schedule = warmup_polynomial_decay(
        peak_learning_rate, total_steps, warmup_steps,
        end_learning_rate=end_learning_rate, power=decay_power,
        schedule_step="after_warmup",
    )
    optimizer = keras.optimizers.SGD(
        learning_rate=schedule, momentum=momentum, nesterov=True,
        weight_decay=weight_decay or None,
    )
    notes = dict(
        source=("Nado et al., arXiv:2102.06356 (structure only; the values "
                "are the caller's)"),
        global_batch_size=global_batch_size,
        peak_learning_rate=float(peak_learning_rate),
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay_power=float(decay_power),
        end_learning_rate=float(end_learning_rate),
        momentum=momentum,
        weight_decay=weight_decay,
        weight_decay_mode="decoupled (keras.optimizers.SGD)",
    )
    return optimizer, schedule, notes


def adamw_control(global_batch_size, total_steps, peak_learning_rate,
                  warmup_steps, weight_decay, beta_1=0.9, beta_2=0.999,
                  epsilon=1e-6, decay_power=1.0):
    """AdamW with LAMB's BERT schedule: the control for LAMB.

    Nado et al. (2021) show that Adam, tuned, matches LAMB for BERT
    pre-training at large batch sizes. Their tuned values could not be
    confirmed from the text available to us, so the peak rate, warmup and
    weight decay are required arguments. Everything else mirrors `lamb_bert`
    so that only the optimizer differs: warmup to the peak, then
    `PolynomialDecay(peak, total_steps, 0, decay_power)` at the global step;
    betas 0.9/0.999, epsilon 1e-6 (defaults, overridable), clipping at global
    norm 1.0, and no decay for LayerNorm and bias variables. Keras's `AdamW`
    matches its exclusions against `variable.name` (`gamma`, `beta`, `bias`
    in keras-hub's BERT), not the path, and does not save them in its config.

    Args:
        global_batch_size: integer >= 1 (recorded in the notes).
        total_steps: integer >= 2.
        peak_learning_rate: finite number >= 0.
        warmup_steps: integer in [1, total_steps).
        weight_decay: finite number >= 0 (decoupled, AdamW's).
        beta_1, beta_2, epsilon: Adam's. Defaults: `0.9`, `0.999`, `1e-6`.
        decay_power: finite number > 0. Defaults to `1.0`.

    Returns:
        `(optimizer, schedule, notes)`.

    References:
        - Nado et al., arXiv:2102.06356.
        - Loshchilov and Hutter, *Decoupled Weight Decay Regularization*,
          arXiv:1711.05101.
    """
    global_batch_size = _check_int("global_batch_size", global_batch_size)
    weight_decay = _check_positive("weight_decay", weight_decay,
                                   allow_zero=True)
    schedule = warmup_polynomial_decay(
        peak_learning_rate, total_steps, warmup_steps, power=decay_power,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=weight_decay, beta_1=beta_1,
        beta_2=beta_2, epsilon=epsilon,
        global_clipnorm=LAMB_BERT_SETTINGS["global_clipnorm"],
    )
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    notes = dict(
        source=("Nado et al., arXiv:2102.06356 (structure only; the values "
                "are the caller's)"),
        global_batch_size=global_batch_size,
        peak_learning_rate=float(peak_learning_rate),
        warmup_steps=int(warmup_steps),
        total_steps=int(total_steps),
        decay_power=float(decay_power),
        end_learning_rate=0.0,
        weight_decay=weight_decay,
        weight_decay_mode="decoupled (keras.optimizers.AdamW)",
        exclude_from_weight_decay=["gamma", "beta", "bias"],
    )
    return optimizer, schedule, notes
