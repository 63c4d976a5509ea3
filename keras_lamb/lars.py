"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017)."""

import keras
from keras import ops

from keras_lamb.layerwise import LayerwiseAdaptiveOptimizer, dense_cast
from keras_lamb.trust_ratio import (
    check_bool,
    check_number,
    clamp,
    compute_dtype,
    l2_norm,
    safe_trust_ratio,
)


@keras.saving.register_keras_serializable(package="keras_lamb")
class LARS(LayerwiseAdaptiveOptimizer):
    """LARS, SGD with momentum and a per-layer trust ratio.

    For each variable `w` with gradient `g` (the form of Algorithm 1 used by
    the MLPerf ResNet-50 reference, with the learning rate inside the
    momentum buffer):

    ```
    r = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)
                                           # 1 when ||w|| or ||g|| is 0
    v = momentum * v + learning_rate * r * (g + weight_decay * w)
    w = w - v                              # nesterov=False
    w = w - (momentum * v + learning_rate * r * (g + weight_decay * w))
                                           # nesterov=True (v already updated)
    ```

    With `clip_trust_ratio=True` (LARC "clip" mode of NVIDIA apex) the ratio
    becomes `r = min(r / learning_rate, 1)`, so the variable's effective rate
    `learning_rate * r = min(trust_coefficient * ||w|| / (...),
    learning_rate)` never exceeds the global rate. Variables matched by
    `exclude_from_layer_adaptation` use `r = 1` (plain momentum SGD);
    variables matched by `exclude_from_weight_decay` use `weight_decay = 0`
    in both the ratio and the step. The step (norms and ratio included) is
    computed in float32 for float16, bfloat16 and float32 variables, and in
    float64 for float64 variables. Integer variables are rejected at `build`.

    Non-finite gradients: outside `keras.optimizers.LossScaleOptimizer` a
    nan/inf gradient makes the momentum and the variable nan, as with Keras's
    own SGD.

    Args:
        learning_rate: float >= 0, a `LearningRateSchedule`, or a callable.
            Defaults to `1.0` (LARS rates are large: 10-30 for ResNet-50 at
            batch 8k-32k).
        momentum: float in [0, 1). Defaults to `0.9`.
        weight_decay: float >= 0. Defaults to `1e-4`.
        trust_coefficient: float > 0, the `eta` of the paper. Defaults to
            `1e-3`.
        epsilon: float >= 0 added to the ratio's denominator. Defaults to
            `0.0`.
        nesterov: bool, Nesterov momentum. Defaults to `False`.
        exclude_from_weight_decay: `None`, a regular expression, a list of
            regular expressions searched in `variable.path` (for
            keras.applications ResNet: `"bn|batch_norm|bias"`), or a callable
            `variable -> bool`.
        exclude_from_layer_adaptation: the same forms; matched variables use
            `r = 1`. Independent of the decay exclusions.
        clip_trust_ratio: bool, LARC clipping as above. Defaults to `False`.
        track_trust_ratios: bool; if `True`, keep the last step's per-variable
            norms and ratio (`trust_ratio_stats()`). Defaults to `False`.
        warn_unmatched_exclusions: bool; if `True` (the default), `build`
            warns about each exclusion pattern that matches no variable (a
            typo such as `"LayerNorm"` for keras-hub's `"layer_norm"` would
            otherwise decay and adapt every variable in silence).
            `exclusions()` lists what each pattern matches.
        **kwargs: the base optimizer keywords (`clipnorm`, `global_clipnorm`,
            `clipvalue`, `use_ema`, `ema_momentum`, `ema_overwrite_frequency`,
            `loss_scale_factor`, `gradient_accumulation_steps`, `name`), each
            validated here (Keras's own optimizers accept `clipnorm=nan`).
            They act on the gradient of the global batch: under a
            `tf.distribute` strategy the replicas' gradients are all-reduced
            first, then accumulated, clipped and applied exactly as on one
            device (Keras's own optimizers clip each replica's share before
            the all-reduce). Sparse `Embedding` gradients are summed into
            dense ones before clipping, so norms count repeated rows once.

    References:
        - You, Gitman, Ginsburg, *Large Batch Training of Convolutional
          Networks*, arXiv:1708.03888, Algorithm 1.
        - MLPerf Training ResNet-50 reference (TensorFlow), LARS optimizer.
        - NVIDIA apex `LARC` for the clipping mode.

    Example:

    >>> import keras, keras_lamb
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(
    ...     optimizer=keras_lamb.LARS(
    ...         learning_rate=1.0,
    ...         exclude_from_weight_decay="bias",
    ...         exclude_from_layer_adaptation="bias",
    ...     ),
    ...     loss="mse",
    ... )
    """

    # Two separate norm reductions everywhere: the stacked one was measured
    # for LAMB, whose fused moment updates it keeps in place on GPUs
    # (`layerwise.default_joint_norms`); LARS's norms read only w and g.
    _joint_norms = False

    # `update_norm` in `trust_ratio_stats()` is ||g||, the gradient's norm.
    update_norm_of = "g"

    def __init__(
        self,
        learning_rate=1.0,
        momentum=0.9,
        weight_decay=1e-4,
        trust_coefficient=1e-3,
        epsilon=0.0,
        nesterov=False,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        clip_trust_ratio=False,
        track_trust_ratios=False,
        warn_unmatched_exclusions=True,
        name="lars",
        **kwargs,
    ):
        momentum = check_number("momentum", momentum, 0, 1, high_open=True)
        trust_coefficient = check_number(
            "trust_coefficient", trust_coefficient, low=0, low_open=True
        )
        epsilon = check_number("epsilon", epsilon, low=0)
        nesterov = check_bool("nesterov", nesterov)
        clip_trust_ratio = check_bool("clip_trust_ratio", clip_trust_ratio)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            track_trust_ratios=track_trust_ratios,
            warn_unmatched_exclusions=warn_unmatched_exclusions,
            name=name,
            **kwargs,
        )
        self.momentum = momentum
        self.trust_coefficient = trust_coefficient
        self.epsilon = epsilon
        self.nesterov = nesterov
        self.clip_trust_ratio = clip_trust_ratio

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "momentum")

    def _slots(self, index):
        return [self._momentums[index]]

    def _torch_update(self, grads, variables, learning_rate):
        from keras_lamb import torch_step

        torch_step.lars_update(self, grads, variables, learning_rate)

    def _step_scalars(self, learning_rate, dtype):
        return {"lr": ops.cast(learning_rate, dtype)}

    def _layerwise_update(self, w, g, state, use_decay, use_adaptation,
                          scalars, norms):
        """The step of one variable `w`; `norms(*tensors)` gives norms.

        Returns `(new_w, [v], stats)`, `stats` being `None` unless tracking.
        """
        (v,) = state
        lr = scalars["lr"]
        wd = self.weight_decay if use_decay else 0.0
        w_norm = g_norm = None
        if use_adaptation or self._stats is not None:
            w_norm, g_norm = norms(w, g)
        ratio = 1.0
        if use_adaptation:
            ratio = self._trust_ratio(w_norm, g_norm, wd, lr)
        step_size = lr * ratio
        step = step_size * (g + wd * w) if use_decay else step_size * g
        v = self.momentum * v + step  # v_t
        if self.nesterov:
            new_w = w - (self.momentum * v + step)
        else:
            new_w = w - v
        stats = self._stats_values(w_norm, g_norm, ratio, lr)
        return new_w, [v], stats

    def _trust_ratio(self, w_norm, g_norm, wd, lr):
        """LARS's local learning rate of one variable (or segment)."""
        # local_lr = eta ||w|| / (||g|| + wd ||w|| + eps), 1 on a zero norm
        ratio = safe_trust_ratio(
            self.trust_coefficient * w_norm,
            g_norm + wd * w_norm + self.epsilon,
            norms=(w_norm, g_norm),
        )
        if self.clip_trust_ratio:
            # LARC clip (apex): r = min(r / lr, 1) where the norms are
            # positive, so lr * r never exceeds lr; r = 1 elsewhere.
            clip = ops.logical_and(
                ops.logical_and(
                    ops.greater(w_norm, 0.0), ops.greater(g_norm, 0.0)
                ),
                ops.greater(lr, 0.0),
            )
            safe_lr = ops.where(clip, lr, ops.ones_like(lr))
            ratio = ops.where(clip, clamp(ratio / safe_lr, upper=1.0), ratio)
        return ratio

    def _reference_update_step(self, gradient, variable, learning_rate):
        """One variable's step, the algorithm line by line.

        The oracle of the fast path (`_layerwise_update`), selected by the
        private flag `_use_reference_path`.
        """
        index, use_decay, use_adaptation = self._layer_flags(variable)
        dtype = compute_dtype(variable.dtype)
        g = dense_cast(gradient, dtype)
        w = ops.cast(variable, dtype)
        wd = self.weight_decay if use_decay else 0.0
        lr = ops.cast(learning_rate, dtype)
        w_norm = g_norm = None
        if use_adaptation:
            w_norm = l2_norm(w)
            g_norm = l2_norm(g)
            ratio = self._trust_ratio(w_norm, g_norm, wd, lr)
        else:
            ratio = ops.ones((), dtype)
        step = lr * ratio * (g + wd * w) if use_decay else lr * ratio * g
        m_slot = self._momentums[index]
        m = self.momentum * ops.cast(m_slot, dtype) + step  # v_t
        if self.nesterov:
            new_w = w - (self.momentum * m + step)
        else:
            new_w = w - m
        # Statistics first: on eager TF `w` still aliases the variable.
        if self._stats is not None:
            self._record_stats(
                index,
                weight_norm=l2_norm(w) if w_norm is None else w_norm,
                update_norm=l2_norm(g) if g_norm is None else g_norm,
                trust_ratio=ratio,
                learning_rate=lr * ratio,
            )
        self.assign(m_slot, ops.cast(m, m_slot.dtype))
        self.assign(variable, ops.cast(new_w, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "clip_trust_ratio": self.clip_trust_ratio,
            }
        )
        return config
