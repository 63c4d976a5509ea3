"""Base class of the layer-wise adaptive optimizers (LAMB, LARS)."""

import functools
import re
import warnings

import keras
import numpy as np
from keras import ops

from keras_lamb.trust_ratio import (
    ExclusionRule,
    check_bool,
    check_integer,
    check_number,
    compute_dtype,
    is_real_number,
    sum_of_squares,
    sums_of_squares,
    variable_path,
)

STAT_NAMES = ("weight_norm", "update_norm", "trust_ratio", "learning_rate")
# A statistic's value before the variable's first update (read as NaN).
NOT_UPDATED = -1.0

def _check_learning_rate(learning_rate):
    if is_real_number(learning_rate):
        return check_number("learning_rate", learning_rate, low=0)
    if isinstance(
        learning_rate, keras.optimizers.schedules.LearningRateSchedule
    ) or callable(learning_rate):
        return learning_rate
    raise ValueError(
        "Argument `learning_rate` must be a finite number >= 0, a "
        "`keras.optimizers.schedules.LearningRateSchedule` or a callable. "
        f"Received: learning_rate={learning_rate!r}"
    )


def _check_base_arguments(kwargs):
    """The base optimizer's keywords in `kwargs`, validated.

    Keras's own optimizers accept `clipnorm=nan` or
    `gradient_accumulation_steps=2.5`; here each bad value is a `ValueError`
    naming the argument, and NumPy scalars become Python numbers (so
    `get_config()` stays JSON-serializable).
    """
    kwargs = dict(kwargs)
    for name in ("clipnorm", "global_clipnorm", "clipvalue",
                 "loss_scale_factor"):
        if name in kwargs:
            kwargs[name] = check_number(
                name, kwargs[name], low=0, low_open=True, allow_none=True
            )
    if "gradient_accumulation_steps" in kwargs:
        # Keras treats k = 1 as an error too: it is no accumulation.
        kwargs["gradient_accumulation_steps"] = check_integer(
            "gradient_accumulation_steps",
            kwargs["gradient_accumulation_steps"], low=2, allow_none=True,
        )
    if "ema_overwrite_frequency" in kwargs:
        kwargs["ema_overwrite_frequency"] = check_integer(
            "ema_overwrite_frequency", kwargs["ema_overwrite_frequency"],
            low=1, allow_none=True,
        )
    if "ema_momentum" in kwargs:
        kwargs["ema_momentum"] = check_number(
            "ema_momentum", kwargs["ema_momentum"], 0, 1
        )
    if "use_ema" in kwargs:
        kwargs["use_ema"] = check_bool("use_ema", kwargs["use_ema"])
    return kwargs


def dense_cast(gradient, dtype):
    """The gradient as a dense tensor of `dtype`.

    Sparse `IndexedSlices` gradients (TF backend, `keras.layers.Embedding`) are
    densified: the trust ratio needs the norm of the whole update anyway, and
    Adam-style moments touch every row. `ops.add` densifies them with the
    duplicate indices summed, exactly as the dense gradient would have them.
    """
    if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
        gradient = ops.add(gradient, 0.0)
    return ops.cast(gradient, dtype)


def _in_tf_replica_context():
    """Whether this TensorFlow step runs inside a strategy's replica
    context (`strategy.run`, or `fit` under `strategy.scope()`)."""
    if keras.backend.backend() != "tensorflow":
        return False
    from keras_lamb import tf_distribute

    return tf_distribute.in_replica_context()


def _dense_like_keras(gradient):
    """A sparse `IndexedSlices` gradient densified, repeated indices
    summed; other gradients unchanged (and uncast)."""
    if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
        return ops.add(gradient, ops.zeros((), gradient.dtype))
    return gradient


@functools.lru_cache(maxsize=None)
def on_accelerator():
    """Whether the current Keras backend computes on a GPU or TPU.

    Asked when a step is traced, per variable inside `tf.distribute`; the
    answer holds for the process (its backend and devices are fixed).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "tensorflow":
        import tensorflow as tf  # already imported by the Keras backend

        return bool(
            tf.config.list_logical_devices("GPU")
            or tf.config.list_logical_devices("TPU")
        )
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def default_norm_method():
    """The `sum_of_squares` method measured fastest where the step runs.

    `"matvec"` for TensorFlow on CPU (XLA:CPU reductions are serial loops;
    without XLA both methods cost the same), `"multi_output"` for JAX on CPU
    (LAMB's two sums in one multi-output reduction, `keras_lamb.jax_cpu`;
    one tensor's sum is `"reduce"`), `"reduce"` elsewhere (on an H100
    `"reduce"` and `"rows"` were within noise). See docs/performance.md.
    """
    if on_accelerator():
        return "reduce"
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return "matvec"
    if backend == "jax":
        return "multi_output"
    return "reduce"


def default_joint_norms():
    """Whether LAMB reduces the two norms of a variable in one pass.

    On for GPUs and TPUs: measured on an H100 (JAX, BERT-large shapes), the
    LAMB step fell from 9.6 to 8.2 ms, because XLA:GPU otherwise fuses the
    norms with the moment updates into a reduction whose outputs cannot
    share the slots' buffers and copies every m and v once more. On for JAX
    on CPU, with `default_norm_method()`'s multi-output reduction (a stacked
    one was measured slower there: BERT-base shapes 440 -> 728 ms). Off for
    TensorFlow on CPU (without XLA 524 -> 613 ms, with XLA within noise).
    """
    return on_accelerator() or keras.backend.backend() == "jax"


def default_recompute_for_norm(tensor=None):
    """Whether LAMB recomputes its update for the norm instead of storing it.

    Asked when a step is traced, with one of its tensors. On for XLA on a
    CPU: TensorFlow compiled with XLA (`jit_compile=True`, Keras's default
    for `fit` where it can) and JAX inside `jax.jit` (`tensor` a tracer, as
    in `fit` and `stateless_apply` under `jit`). Stored, the update of every
    variable lives until its norm is known, and XLA:CPU allocates a scratch
    buffer the size of the model (4 bytes per parameter) on each step, which
    the system pages in afresh every time. Measured on an AMD EPYC (BERT-base
    shapes): 107,000 page faults per step under both backends; TensorFlow
    2.8x Keras Adam's time stored, 1.5x recomputed. Off elsewhere:
    without a compiler (TensorFlow without XLA, JAX op by op) each operation
    is materialized, so recomputing adds work (TensorFlow: 991 -> 1127 ms);
    GPUs and TPUs pool device memory and keep the path measured there. See
    docs/performance.md.
    """
    if on_accelerator():
        return False
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return isinstance(tensor, jax.core.Tracer)
    if backend != "tensorflow":
        return False
    import tensorflow as tf  # already imported by the Keras backend

    enclosing_xla_context = getattr(
        tf.__internal__, "get_enclosing_xla_context", None
    )
    return bool(enclosing_xla_context) and enclosing_xla_context() is not None


def _norms(*tensors, norm_method, joint_norms=False):
    """The Euclidean norm of each tensor in `tensors`.

    `norm_method` is a `sum_of_squares` method; `joint_norms` reduces the
    tensors in one stacked pass (`sums_of_squares`).
    """
    if joint_norms and len(tensors) > 1:
        return tuple(ops.sqrt(s) for s in sums_of_squares(tensors, norm_method))
    return tuple(ops.sqrt(sum_of_squares(x, norm_method)) for x in tensors)


class LayerwiseAdaptiveOptimizer(keras.optimizers.Optimizer):
    """Shared machinery of optimizers that scale each variable's step.

    Handles validation of the shared arguments, the two independent exclusion
    rules (weight decay, layer adaptation) resolved once at `build` time, the
    opt-in trust-ratio statistics, and serialization.

    Subclasses write their algorithm once, in `_layerwise_update`, on one
    variable's tensors; its `norms(*tensors)` argument returns their Euclidean
    norms in the form measured fastest where the step runs (`_norms`). The
    step is computed in float32 for float16, bfloat16 and float32 variables,
    and in float64 for float64 variables (`trust_ratio.compute_dtype`). This
    class feeds it:

    - `_backend_update_step` (the whole step, outside `tf.distribute`)
      computes the per-step scalars once and updates each variable;
    - `update_step` (one variable; Keras calls it per variable inside
      `tf.distribute` strategies, and subclasses may override it) updates one
      variable.

    The private flag `_use_reference_path = True` makes every step go through
    `_reference_update_step`, the papers' equations written out per variable,
    against which the tests check the fast path.

    Weight decay here is part of the layer-wise update (it enters the trust
    ratio), so the base class's decoupled weight decay is switched off.
    """

    # What `update_norm` in `trust_ratio_stats()` is the norm of, as the
    # symbol of the subclass's docstring: "g" (the gradient) or "u" (the
    # update before the trust ratio).
    update_norm_of = None
    _use_reference_path = False
    # `sum_of_squares` method; `None` picks `default_norm_method()`.
    _norm_method = None
    # Reduce both norms of a variable in one stacked reduction; `None` picks
    # `default_joint_norms()`.
    _joint_norms = None
    # LAMB: recompute the update for its norm rather than store it; `None`
    # picks `default_recompute_for_norm()`.
    _recompute_update = None
    # JAX: step each variable after the previous one (each waits for the
    # previous variable's new weights, `keras_lamb.jax_cpu.after`; ignored
    # on other backends). Measured on a CPU: the optimizer step alone gets
    # faster (LAMB on BERT-base shapes 1.69x -> 1.56x Keras Adam's time: its
    # norm and weight passes find the variable in the cache), but `fit`,
    # where the step shares a program with the backward pass, gets slower
    # (all gradients then stay alive together; results/jax_cpu). Off.
    _step_in_order = False

    def __init__(
        self,
        learning_rate,
        weight_decay,
        exclude_from_weight_decay,
        exclude_from_layer_adaptation,
        track_trust_ratios,
        name,
        warn_unmatched_exclusions=True,
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
        track_trust_ratios = check_bool(
            "track_trust_ratios", track_trust_ratios
        )
        warn_unmatched_exclusions = check_bool(
            "warn_unmatched_exclusions", warn_unmatched_exclusions
        )
        kwargs = _check_base_arguments(kwargs)
        # weight_decay=None keeps the base class's decoupled decay off.
        super().__init__(
            learning_rate=learning_rate, weight_decay=None, name=name, **kwargs
        )
        self.weight_decay = weight_decay
        self._decay_rule = decay_rule
        self._adaptation_rule = adaptation_rule
        self.track_trust_ratios = track_trust_ratios
        self.warn_unmatched_exclusions = warn_unmatched_exclusions

    def build(self, var_list):
        if self.built:
            return
        for variable in var_list:
            self._check_trainable_dtype(variable)
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
        if self.warn_unmatched_exclusions:
            self._warn_unmatched_exclusions(var_list)
        self._stats = None
        if self.track_trust_ratios:
            self._stats = {
                stat: [self._add_stat(stat, v) for v in var_list]
                for stat in STAT_NAMES
            }

    def exclusions(self, var_list=None):
        """Which variables each exclusion pattern matches.

        Args:
            var_list: the variables to match (default: those the optimizer
                was built with).

        Returns:
            `{"exclude_from_weight_decay": {pattern: [variable paths]},
            "exclude_from_layer_adaptation": {pattern: [variable paths]}}`;
            a callable rule is listed as `"<callable>"`. A pattern with an
            empty list excludes nothing.
        """
        if var_list is None:
            if not self.built:
                raise ValueError(
                    "The optimizer is not built yet: pass `var_list` (e.g. "
                    "`model.trainable_variables`) or build it first."
                )
            var_list = self._trainable_variables
        variables = [v for v in var_list
                     if not _overwritten_with_gradient(v)]
        return {
            "exclude_from_weight_decay": self._decay_rule.matches(variables),
            "exclude_from_layer_adaptation": self._adaptation_rule.matches(
                variables),
        }

    def _warn_unmatched_exclusions(self, var_list):
        """A warning for each exclusion pattern that matches no variable:
        a typo there silently decays and adapts the LayerNorm and bias
        variables it was meant to spare."""
        variables = [v for v in var_list if not _overwritten_with_gradient(v)]
        if not variables:
            return
        for argument, matched in self.exclusions(variables).items():
            if argument == "exclude_from_weight_decay" and (
                    not self.weight_decay):
                continue  # no decay: its exclusions change nothing
            for pattern, paths in matched.items():
                if paths or pattern == "<callable>":
                    continue
                examples = ", ".join(repr(variable_path(v))
                                     for v in variables[:4])
                more = (f" and {len(variables) - 4} more"
                        if len(variables) > 4 else "")
                warnings.warn(
                    f"{self.__class__.__name__}: the pattern {pattern!r} of "
                    f"`{argument}` matches none of the {len(variables)} "
                    f"variables (it is searched in `variable.path`, e.g. "
                    f"{examples}{more}). Fix the pattern, or pass "
                    "`warn_unmatched_exclusions=False` if the model has no "
                    "such variable. `optimizer.exclusions()` lists what each "
                    "pattern matches.",
                    UserWarning,
                    stacklevel=3,
                )

    def _check_trainable_dtype(self, variable):
        """A `ValueError` unless the optimizer can step `variable`: its
        fractional updates would be rounded on an integer variable (LAMB at
        a tiny rate took 1 off every positive entry per step)."""
        if _overwritten_with_gradient(variable):
            return
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if not dtype.startswith(("float", "bfloat")):
            raise ValueError(
                f"{self.__class__.__name__} can only train floating-point "
                f"variables, but variable `{variable_path(variable)}` has "
                f"dtype {dtype}. Make it non-trainable (`trainable=False`) "
                "or give it a float dtype."
            )

    def _add_stat(self, stat, variable):
        """The float32 scalar of `stat` for `variable`, `None` for the
        variables the optimizer does not train (float8 scales and amax
        histories, which Keras overwrites with their "gradients").

        `NOT_UPDATED` (-1, a value no statistic takes) until the variable's
        first update; `trust_ratio_stats()` reports it as NaN, so that a
        variable that never got a gradient is not summarized as a zero
        ratio. (Not NaN itself: JAX places an initial value on several hosts
        only after checking it is equal on every one, and NaN never equals
        itself.)
        """
        if _overwritten_with_gradient(variable):
            return None
        name = variable.name
        if not hasattr(variable, "path"):  # a raw tf.Variable, "a/b:0"
            name = re.sub(r"[^\w.-]", "_", variable_path(variable))
        return self.add_variable(
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(NOT_UPDATED),
            name=f"{stat}_{name}",
        )

    def _apply_weight_decay(self, variables):
        # Weight decay is applied inside `update_step`, inside the trust ratio.
        return

    def update_step(self, gradient, variable, learning_rate):
        if self._use_reference_path:
            return self._reference_update_step(
                gradient, variable, learning_rate
            )
        self._update_variables([gradient], [variable], learning_rate)

    def _backend_apply_gradients(self, grads, trainable_variables):
        if _in_tf_replica_context():
            # Under tf.distribute: all-reduce, then clip, accumulate and
            # average exactly as one device does (see `tf_distribute`).
            from keras_lamb import tf_distribute

            return tf_distribute.apply_gradients(
                self, grads, trainable_variables
            )
        return super()._backend_apply_gradients(grads, trainable_variables)

    def _clip_gradients(self, grads):
        if self.clipnorm or self.global_clipnorm or self.clipvalue:
            # Clip the summed sparse gradient, not its unsummed rows.
            grads = [
                g if g is None else _dense_like_keras(g) for g in grads
            ]
        return super()._clip_gradients(grads)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self._whole_step_allowed():
            return super()._backend_update_step(
                grads, trainable_variables, learning_rate
            )
        if keras.backend.backend() == "torch" and self._torch_update is not None:
            from keras_lamb import torch_step

            if torch_step.applies(trainable_variables):
                return self._torch_update(
                    grads, trainable_variables, learning_rate)
        self._update_variables(grads, trainable_variables, learning_rate)

    # The torch fast path (`keras_lamb.torch_step`): a function
    # `(optimizer, grads, variables, learning_rate)`, set by subclasses.
    _torch_update = None

    def _whole_step_allowed(self):
        """Whether `_backend_update_step` may update all variables at once.

        Not with the reference path, not when a subclass overrides
        `update_step` (it expects to be called per variable), and not inside
        a `tf.distribute` strategy, where Keras all-reduces the gradients and
        updates each variable on each replica through the strategy.
        """
        if self._use_reference_path:
            return False
        own_step = LayerwiseAdaptiveOptimizer.update_step
        if type(self).update_step is not own_step:
            return False
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf  # already imported by the Keras backend

            if tf.distribute.has_strategy():
                return False
        return True

    def _update_variables(self, grads, variables, learning_rate):
        """Steps each variable with its gradient."""
        norms = functools.partial(
            _norms, norm_method=self._norm_method or default_norm_method(),
            joint_norms=(default_joint_norms() if self._joint_norms is None
                         else self._joint_norms),
        )
        scalars = {}  # per compute dtype, formed once per step
        after = None  # `jax_cpu.after` when stepping in order
        if self._step_in_order and keras.backend.backend() == "jax":
            from keras_lamb.jax_cpu import after
        previous = None  # the previous variable's new value, when in order
        for grad, variable in zip(grads, variables):
            index, use_decay, use_adaptation = self._layer_flags(variable)
            dtype = compute_dtype(variable.dtype)
            if dtype not in scalars:
                scalars[dtype] = self._step_scalars(learning_rate, dtype)
            slots = self._slots(index)
            w = ops.cast(variable, dtype)
            # The static shape is lost when an IndexedSlices gradient is
            # all-reduced and densified.
            g = ops.reshape(dense_cast(grad, dtype), tuple(w.shape))
            if previous is not None:
                g = after(g, previous)
            state = [ops.cast(slot, dtype) for slot in slots]
            new_w, new_state, stats = self._layerwise_update(
                w, g, state, use_decay, use_adaptation, scalars[dtype], norms
            )
            if after is not None:
                previous = new_w
            # Statistics first: on eager TF `w` still aliases the variable.
            if stats is not None:
                self._record_stats(index, **stats)
            # Slots before the variable, as in the reference path.
            for destination, value in zip(slots + [variable],
                                          new_state + [new_w]):
                self.assign(destination, ops.cast(value, destination.dtype))

    def _recompute_for_norm(self, tensor=None):
        """`_recompute_update`, or its default where the step runs (asked
        with one of the step's tensors)."""
        if self._recompute_update is None:
            return default_recompute_for_norm(tensor)
        return self._recompute_update

    def _layer_flags(self, variable):
        """`(index, use_weight_decay, use_layer_adaptation)` of a variable."""
        index = self._get_variable_index(variable)
        return index, self._apply_decay[index], self._apply_adaptation[index]

    def _record_stats(self, index, **values):
        """Stores this step's norms and ratio when tracking is on."""
        if self._stats is None or self._stats[STAT_NAMES[0]][index] is None:
            return
        for stat in STAT_NAMES:
            self.assign(
                self._stats[stat][index],
                ops.cast(ops.convert_to_tensor(values[stat]), "float32"),
            )

    def _stats_values(self, w_norm, update_norm, ratio, lr):
        """The statistics of `_record_stats`, or `None` when not tracking."""
        if self._stats is None:
            return None
        return {
            "weight_norm": w_norm,
            "update_norm": update_norm,
            "trust_ratio": ratio,
            "learning_rate": lr * ratio,
        }

    def trust_ratio_stats(self):
        """The last update's per-variable statistics, as Python values.

        Returns:
            A dict `{variable.path: {"weight_norm", "update_norm",
            "trust_ratio", "learning_rate", "adapted"}}`. `update_norm` is
            the norm the trust ratio divides by, that of `update_norm_of`
            (the gradient `g` for LARS, the Adam update plus weight decay `u`
            for LAMB); `learning_rate` is the effective rate the variable
            moved with (global rate times trust ratio); `adapted` is `False`
            for the variables excluded from layer adaptation, whose ratio is
            1 by construction. The floats are those of each variable's last
            update, NaN before its first, read from the device in one
            transfer. Only the variables the optimizer updates are listed:
            not the float8 scales and amax histories of a quantized model,
            which Keras overwrites with their gradients. A raw `tf.Variable`
            is keyed by its name without `:0` (`trust_ratio.variable_path`).
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
        tracked = self._tracked_variables()
        if not tracked:
            return {}
        # One (variables, statistics) array, one device-to-host transfer.
        values = ops.convert_to_numpy(ops.stack([
            ops.stack([self._stats[stat][i].value for stat in STAT_NAMES])
            for i, _ in tracked
        ]))
        values = np.where(values == NOT_UPDATED, np.nan, values)
        return {
            variable_path(v): dict(
                zip(STAT_NAMES, (float(x) for x in row)),
                adapted=bool(self._apply_adaptation[i]),
            )
            for (i, v), row in zip(tracked, values)
        }

    def _tracked_variables(self):
        """`(index, variable)` of the variables whose statistics are kept."""
        first = self._stats[STAT_NAMES[0]]
        return [
            (i, v) for i, v in enumerate(self._trainable_variables)
            if first[i] is not None
        ]

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
                "warn_unmatched_exclusions": self.warn_unmatched_exclusions,
            }
        )
        return config


def _overwritten_with_gradient(variable):
    """Whether Keras assigns `variable` its gradient instead of stepping it
    (float8 scales and amax histories); raw tf.Variables have no flag."""
    return bool(getattr(variable, "overwrite_with_gradient", False))
