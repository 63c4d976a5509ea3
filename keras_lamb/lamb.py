"""LAMB: layer-wise adaptive moments (You et al. 2019, Algorithm 2)."""

import keras
from keras import ops

from keras_lamb.layerwise import LayerwiseAdaptiveOptimizer, dense_cast
from keras_lamb.trust_ratio import (
    check_bool,
    clamp,
    check_number,
    compute_dtype,
    l2_norm,
    safe_trust_ratio,
)


@keras.saving.register_keras_serializable(package="keras_lamb")
class LAMB(LayerwiseAdaptiveOptimizer):
    """LAMB, the layer-wise adaptive large-batch optimizer of You et al.

    For each variable `w` with gradient `g`, at step `t` (counted from 1):

    ```
    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * g**2
    m_hat = m / (1 - beta_1**t)            # if bias_correction
    v_hat = v / (1 - beta_2**t)            # if bias_correction
    u = m_hat / (sqrt(v_hat) + epsilon) + weight_decay * w
    r = phi(||w||) / ||u||                 # 1 when ||w|| or ||u|| is 0
    r = min(r, 1)                          # if clip_trust_ratio (LAMBC)
    w = w - learning_rate * r * u
    ```

    `phi` clips `||w||` to `trust_ratio_bounds = (lower, upper)` (identity when
    `None`). Weight decay is part of `u`, so it is scaled by the trust ratio
    like the rest of the step; this is the paper's algorithm, and it differs
    from `keras.optimizers.Lamb(weight_decay=...)`, which decays the weights
    separately, outside the ratio. Variables matched by
    `exclude_from_weight_decay` get no decay term; variables matched by
    `exclude_from_layer_adaptation` use `r = 1` (plain Adam steps). The two
    rules are independent. The step (norms and ratio included) is computed
    in float32 for float16, bfloat16 and float32 variables, and in float64
    for float64 variables. Integer variables are rejected at `build`.

    Non-finite gradients: outside `keras.optimizers.LossScaleOptimizer` a
    nan/inf gradient makes the moments and the variable nan, as with Keras's
    own Adam. Wrap the optimizer in `LossScaleOptimizer` (which skips such
    steps) or clip gradients if your model can produce them.

    Args:
        learning_rate: float >= 0, a `LearningRateSchedule`, or a callable.
            Defaults to `1e-3`.
        beta_1: float in [0, 1), decay of the first moment. Defaults to `0.9`.
        beta_2: float in [0, 1), decay of the second moment. Defaults to
            `0.999`.
        epsilon: float >= 0 added to `sqrt(v_hat)`. Defaults to `1e-6`, as in
            the BERT recipes.
        weight_decay: float >= 0, the `lambda` of the paper. Defaults to `0.0`.
        exclude_from_weight_decay: `None`, a regular expression, a list of
            regular expressions searched in `variable.path` (for BERT:
            `"layer_norm|LayerNorm|bias"`), or a callable `variable -> bool`.
        exclude_from_layer_adaptation: the same forms; matched variables take
            plain Adam steps (`r = 1`). Independent of the decay exclusions.
        bias_correction: bool, divide the moments by `1 - beta**t`. Defaults to
            `True`.
        trust_ratio_bounds: `None` or `(lower, upper)` with `0 <= lower <=
            upper` (either may be `None` for no bound): the clip `phi` applied
            to `||w||` in the numerator of the ratio.
        clip_trust_ratio: bool; if `True`, `r = min(r, 1)` after the zero-norm
            fallback: LAMBC (Fong et al., arXiv:2011.13584), timm's
            `trust_clip=True`. Defaults to `False` (the paper's Alg. 2).
        track_trust_ratios: bool; if `True`, the optimizer keeps the last
            step's per-variable norms and ratio (`trust_ratio_stats()`), at the
            cost of four float32 scalars per variable. Defaults to `False`.
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
        - You et al., *Large Batch Optimization for Deep Learning: Training
          BERT in 76 minutes*, ICLR 2020, arXiv:1904.00962, Algorithm 2.

    Example:

    >>> import keras, keras_lamb
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(
    ...     optimizer=keras_lamb.LAMB(
    ...         learning_rate=1e-3,
    ...         weight_decay=0.01,
    ...         exclude_from_weight_decay="bias",
    ...         exclude_from_layer_adaptation="bias",
    ...     ),
    ...     loss="mse",
    ... )
    """

    # `update_norm` in `trust_ratio_stats()` is ||u||: the Adam step plus
    # weight decay, before the trust ratio.
    update_norm_of = "u"

    def __init__(
        self,
        learning_rate=1e-3,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-6,
        weight_decay=0.0,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        bias_correction=True,
        trust_ratio_bounds=None,
        clip_trust_ratio=False,
        track_trust_ratios=False,
        warn_unmatched_exclusions=True,
        name="lamb",
        **kwargs,
    ):
        beta_1 = check_number("beta_1", beta_1, 0, 1, high_open=True)
        beta_2 = check_number("beta_2", beta_2, 0, 1, high_open=True)
        epsilon = check_number("epsilon", epsilon, low=0)
        bias_correction = check_bool("bias_correction", bias_correction)
        trust_ratio_bounds = _check_bounds(trust_ratio_bounds)
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
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.bias_correction = bias_correction
        self.trust_ratio_bounds = trust_ratio_bounds
        self.clip_trust_ratio = clip_trust_ratio

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )

    def _slots(self, index):
        return [self._momentums[index], self._velocities[index]]

    def _torch_update(self, grads, variables, learning_rate):
        from keras_lamb import torch_step

        torch_step.lamb_update(self, grads, variables, learning_rate)

    def _step_scalars(self, learning_rate, dtype):
        """The step's scalars in `dtype`, computed once per step, not per
        variable.

        The bias corrections are folded into two scalars: with
        `c_1 = sqrt(1 - beta_2**t) / (1 - beta_1**t)`,
        `m_hat / (sqrt(v_hat) + epsilon) = c_1 * m / (sqrt(v) + epsilon_t)`
        where `epsilon_t = epsilon * sqrt(1 - beta_2**t)`.
        """
        scalars = {"lr": ops.cast(learning_rate, dtype),
                   "c1": 1.0, "epsilon": self.epsilon}
        if self.bias_correction:
            t = ops.cast(self.iterations + 1, dtype)
            # The betas as tensors of `dtype`: torch's `power` would round
            # a Python float base to float32 (6.7e-6 off after one float64
            # step).
            sqrt_bc2 = ops.sqrt(1 - ops.power(ops.convert_to_tensor(self.beta_2, dtype), t))
            scalars["c1"] = sqrt_bc2 / (
                1 - ops.power(ops.convert_to_tensor(self.beta_1, dtype), t))
            scalars["epsilon"] = self.epsilon * sqrt_bc2
        return scalars

    def _layerwise_update(self, w, g, state, use_decay, use_adaptation,
                          scalars, norms):
        """The step of one variable `w`; `norms(*tensors)` gives norms.

        Returns `(new_w, [m, v], stats)`, `stats` being `None` unless
        tracking. The update is kept as `u = c_1 * e` so that `c_1`
        multiplies scalars only.
        """
        m, v = state
        # m_t = beta_1 m + (1 - beta_1) g and v_t likewise, written so that
        # each op can reuse its input's buffer when not compiled with XLA.
        m = m + (1 - self.beta_1) * (g - m)
        v = v + (1 - self.beta_2) * (ops.square(g) - v)
        c1, lr = scalars["c1"], scalars["lr"]
        e = self._direction(m, v, w, use_decay, scalars)  # u / c_1
        w_norm = u_norm = None
        if use_adaptation or self._stats is not None:
            e_for_norm = e
            if self._recompute_for_norm(w):
                # The same values, formed a second time so that a compiler
                # cannot merge the two: each consumer then fuses its own
                # copy of the elementwise math, and `e` is never stored.
                # `abs` is the identity on v >= 0, so the bits are equal.
                e_for_norm = self._direction(
                    m, ops.abs(v), w, use_decay, scalars
                )
            w_norm, e_norm = norms(w, e_for_norm)
            u_norm = c1 * e_norm
        ratio = 1.0
        if use_adaptation:
            ratio = self._trust_ratio(w_norm, u_norm)
        new_w = w - (lr * c1 * ratio) * e
        stats = self._stats_values(w_norm, u_norm, ratio, lr)
        return new_w, [m, v], stats

    def _direction(self, m, v, w, use_decay, scalars):
        """`u / c_1`: the bias-corrected Adam step plus weight decay."""
        e = m / (ops.sqrt(v) + scalars["epsilon"])
        if use_decay:
            e = e + (self.weight_decay / scalars["c1"]) * w
        return e

    def _trust_ratio(self, w_norm, u_norm):
        """phi(||w||) / ||u||, 1 when ||w|| or ||u|| is 0; at most 1 with
        `clip_trust_ratio` (LAMBC)."""
        phi = w_norm
        if self.trust_ratio_bounds is not None:
            phi = clamp(w_norm, *self.trust_ratio_bounds)
        ratio = safe_trust_ratio(phi, u_norm, norms=(w_norm, u_norm))
        if self.clip_trust_ratio:
            ratio = clamp(ratio, upper=1.0)
        return ratio

    def _reference_update_step(self, gradient, variable, learning_rate):
        """One variable's step, the paper's equations line by line.

        The oracle of the fast path (`_layerwise_update`), selected by the
        private flag `_use_reference_path`.
        """
        index, use_decay, use_adaptation = self._layer_flags(variable)
        dtype = compute_dtype(variable.dtype)
        g = dense_cast(gradient, dtype)
        w = ops.cast(variable, dtype)
        m_slot = self._momentums[index]
        v_slot = self._velocities[index]
        m = self.beta_1 * ops.cast(m_slot, dtype) + (1 - self.beta_1) * g
        v = self.beta_2 * ops.cast(v_slot, dtype) + (
            1 - self.beta_2
        ) * ops.square(g)
        m_hat, v_hat = m, v
        if self.bias_correction:
            t = ops.cast(self.iterations + 1, dtype)
            m_hat = m / (1 - ops.power(ops.convert_to_tensor(self.beta_1, dtype), t))
            v_hat = v / (1 - ops.power(ops.convert_to_tensor(self.beta_2, dtype), t))
        u = m_hat / (ops.sqrt(v_hat) + self.epsilon)
        if use_decay:
            u = u + self.weight_decay * w
        lr = ops.cast(learning_rate, dtype)
        w_norm = u_norm = None
        if use_adaptation:
            w_norm = l2_norm(w)
            u_norm = l2_norm(u)
            ratio = self._trust_ratio(w_norm, u_norm)
        else:
            ratio = ops.ones((), dtype)
        # Statistics first: on eager TF `w` still aliases the variable.
        if self._stats is not None:
            self._record_stats(
                index,
                weight_norm=l2_norm(w) if w_norm is None else w_norm,
                update_norm=l2_norm(u) if u_norm is None else u_norm,
                trust_ratio=ratio,
                learning_rate=lr * ratio,
            )
        self.assign(m_slot, ops.cast(m, m_slot.dtype))
        self.assign(v_slot, ops.cast(v, v_slot.dtype))
        self.assign(variable, ops.cast(w - lr * ratio * u, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "bias_correction": self.bias_correction,
                "clip_trust_ratio": self.clip_trust_ratio,
                "trust_ratio_bounds": (
                    None
                    if self.trust_ratio_bounds is None
                    else list(self.trust_ratio_bounds)
                ),
            }
        )
        return config


def _check_bounds(bounds):
    if bounds is None:
        return None
    message = (
        "Argument `trust_ratio_bounds` must be None or a pair (lower, upper) "
        "of finite numbers (or None) with 0 <= lower <= upper. Received: "
        f"trust_ratio_bounds={bounds!r}"
    )
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        raise ValueError(message)
    try:
        lower, upper = (
            None if b is None else check_number("trust_ratio_bounds", b, low=0)
            for b in bounds
        )
    except ValueError:
        raise ValueError(message) from None
    if lower is not None and upper is not None and lower > upper:
        raise ValueError(message)
    return (lower, upper)
