"""Base class of the layer-wise adaptive optimizers (LAMB, LARS)."""

import numbers

import keras
from keras import ops

from keras_lamb.trust_ratio import ExclusionRule, check_number

STAT_NAMES = ("weight_norm", "update_norm", "trust_ratio", "learning_rate")


def _check_learning_rate(learning_rate):
    if isinstance(learning_rate, numbers.Real) and not isinstance(
        learning_rate, bool
    ):
        return check_number("learning_rate", float(learning_rate), low=0)
    if isinstance(
        learning_rate, keras.optimizers.schedules.LearningRateSchedule
    ) or callable(learning_rate):
        return learning_rate
    raise ValueError(
        "Argument `learning_rate` must be a finite number >= 0, a "
        "`keras.optimizers.schedules.LearningRateSchedule` or a callable. "
        f"Received: learning_rate={learning_rate!r}"
    )


def dense_float32(gradient):
    """The gradient as a dense float32 tensor.

    Sparse `IndexedSlices` gradients (TF backend, `keras.layers.Embedding`) are
    densified: the trust ratio needs the norm of the whole update anyway, and
    Adam-style moments touch every row. `ops.add` densifies them with the
    duplicate indices summed, exactly as the dense gradient would have them.
    """
    if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
        gradient = ops.add(gradient, 0.0)
    return ops.cast(gradient, "float32")


class LayerwiseAdaptiveOptimizer(keras.optimizers.Optimizer):
    """Shared machinery of optimizers that scale each variable's step.

    Handles validation of the shared arguments, the two independent exclusion
    rules (weight decay, layer adaptation) resolved once at `build` time, the
    opt-in trust-ratio statistics, and serialization. Subclasses implement
    `update_step` and call `self._layer_flags(variable)` and
    `self._record_stats(...)` from it.

    Weight decay here is part of the layer-wise update (it enters the trust
    ratio), so the base class's decoupled weight decay is switched off.
    """

    def __init__(
        self,
        learning_rate,
        weight_decay,
        exclude_from_weight_decay,
        exclude_from_layer_adaptation,
        track_trust_ratios,
        name,
        **kwargs,
    ):
        learning_rate = _check_learning_rate(learning_rate)
        weight_decay = check_number(
            "weight_decay", 0.0 if weight_decay is None else weight_decay,
            low=0,
        )
        decay_rule = ExclusionRule(
            exclude_from_weight_decay, "exclude_from_weight_decay"
        )
        adaptation_rule = ExclusionRule(
            exclude_from_layer_adaptation, "exclude_from_layer_adaptation"
        )
        if not isinstance(track_trust_ratios, bool):
            raise ValueError(
                "Argument `track_trust_ratios` must be a bool. Received: "
                f"track_trust_ratios={track_trust_ratios!r}"
            )
        # weight_decay=None keeps the base class's decoupled decay off.
        super().__init__(
            learning_rate=learning_rate, weight_decay=None, name=name, **kwargs
        )
        self.weight_decay = weight_decay
        self._decay_rule = decay_rule
        self._adaptation_rule = adaptation_rule
        self.track_trust_ratios = track_trust_ratios

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Exclusions are resolved here, from the Keras variables: on the TF
        # backend `update_step` receives the raw tf.Variable, which has no path.
        self._apply_decay = [
            self.weight_decay > 0 and not self._decay_rule.excludes(v)
            for v in var_list
        ]
        self._apply_adaptation = [
            not self._adaptation_rule.excludes(v) for v in var_list
        ]
        self._stats = None
        if self.track_trust_ratios:
            self._stats = {
                stat: [
                    self.add_variable(
                        shape=(),
                        dtype="float32",
                        initializer="zeros",
                        name=f"{stat}_{v.name}",
                    )
                    for v in var_list
                ]
                for stat in STAT_NAMES
            }

    def _apply_weight_decay(self, variables):
        # Weight decay is applied inside `update_step`, inside the trust ratio.
        return

    def _layer_flags(self, variable):
        """`(index, use_weight_decay, use_layer_adaptation)` of a variable."""
        index = self._get_variable_index(variable)
        return index, self._apply_decay[index], self._apply_adaptation[index]

    def _record_stats(self, index, **values):
        """Stores this step's norms and ratio when tracking is on."""
        if self._stats is None:
            return
        for stat in STAT_NAMES:
            self.assign(
                self._stats[stat][index],
                ops.cast(ops.convert_to_tensor(values[stat]), "float32"),
            )

    def trust_ratio_stats(self):
        """The last step's per-variable statistics, as Python floats.

        Returns:
            A dict `{variable.path: {"weight_norm", "update_norm",
            "trust_ratio", "learning_rate"}}`, where `update_norm` is the norm
            the trust ratio divides by (the gradient for LARS, the Adam update
            plus weight decay for LAMB) and `learning_rate` is the effective
            rate the variable moved with (global rate times trust ratio).
            Requires `track_trust_ratios=True` and a built optimizer.
        """
        if not self.track_trust_ratios:
            raise ValueError(
                f"{self.__class__.__name__} was created with "
                "`track_trust_ratios=False`; pass `track_trust_ratios=True` "
                "to record per-variable trust ratios."
            )
        if not self.built:
            raise ValueError(
                "The optimizer is not built yet: no step has been taken."
            )
        return {
            v.path: {
                stat: float(ops.convert_to_numpy(self._stats[stat][i]))
                for stat in STAT_NAMES
            }
            for i, v in enumerate(self._trainable_variables)
        }

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Adds regular expressions to the weight-decay exclusions.

        Kept for compatibility with `keras.optimizers.AdamW`-style code.
        Prefer the constructor argument, which is also serialized.
        """
        if self.built:
            raise ValueError(
                "`exclude_from_weight_decay()` can only be called before the "
                "optimizer is built."
            )
        if var_list:
            raise ValueError(
                "`var_list` is not supported by "
                f"{self.__class__.__name__}: pass `var_names` (regular "
                "expressions searched in `variable.path`) or a callable as "
                "`exclude_from_weight_decay=` in the constructor."
            )
        if var_names:
            self._decay_rule = self._decay_rule.extended(var_names)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "exclude_from_weight_decay": self._decay_rule.get_config(),
                "exclude_from_layer_adaptation": (
                    self._adaptation_rule.get_config()
                ),
                "track_trust_ratios": self.track_trust_ratios,
            }
        )
        return config
