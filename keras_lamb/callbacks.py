"""Training callbacks: per-layer trust-ratio monitoring."""

import importlib
import math
import numbers
import re

import keras
import numpy as np
from keras import ops

from keras_lamb.layerwise import STAT_NAMES, LayerwiseAdaptiveOptimizer

__all__ = ["TrustRatioMonitor"]

SUMMARY_KEYS = ("min", "median", "max")


def unwrap_optimizer(optimizer):
    """The keras_lamb optimizer inside `optimizer`, checked for tracking.

    Unwraps `keras.optimizers.LossScaleOptimizer` (and any wrapper exposing
    `inner_optimizer`). Raises `ValueError` unless the result is a keras_lamb
    optimizer created with `track_trust_ratios=True`.
    """
    inner = optimizer
    while hasattr(inner, "inner_optimizer"):
        inner = inner.inner_optimizer
    if not isinstance(inner, LayerwiseAdaptiveOptimizer):
        raise ValueError(
            "TrustRatioMonitor needs a keras_lamb optimizer (`LAMB` or "
            "`LARS`, optionally inside a `LossScaleOptimizer`) created with "
            f"`track_trust_ratios=True`. Received: optimizer={optimizer!r}"
        )
    if not inner.track_trust_ratios:
        raise ValueError(
            f"TrustRatioMonitor needs the model's {type(inner).__name__} to be "
            "created with `track_trust_ratios=True`; it records nothing "
            "otherwise."
        )
    return inner


class TrustRatioMonitor(keras.callbacks.Callback):
    """Records each variable's norms and trust ratio during `fit`.

    Reads the statistics that `LAMB`/`LARS` keep when created with
    `track_trust_ratios=True` (`optimizer.trust_ratio_stats()`): for each
    variable the optimizer updates (not the float8 scales and amax histories
    of a quantized model), its last update's `weight_norm` ||w||,
    `update_norm` (||g|| for LARS, ||u|| = ||Adam step + weight decay|| for
    LAMB), `trust_ratio` and effective `learning_rate` (global rate times
    ratio); NaN for a variable that has had no gradient yet; and whether it
    is `adapted` (not excluded from layer adaptation). Nothing is recomputed: the optimizer stores them in the step it already
    takes, so under `MirroredStrategy` they are the values computed from the
    all-reduced gradients, the same on every replica, and they work in
    XLA-compiled steps (`jit_compile=True`).

    Every `every_n_steps` optimizer steps (and at step 1) the monitor appends
    `(step, stats)` to `records`, where `step` is `optimizer.iterations`
    after the update and `stats` is `optimizer.trust_ratio_stats()`; only
    real updates count (with `gradient_accumulation_steps`, the micro-steps
    in between are not steps). At each epoch end it adds `trust_ratio/min`,
    `trust_ratio/median` and `trust_ratio/max` over the updated variables
    that use layer adaptation to the epoch's logs (so to `History`). With
    `log_dir`, it also writes TensorBoard summaries at each record: scalars
    `{stat}/{variable.path}` for the variables chosen by `layers`, and
    histograms `across_layers/{stat}` over all updated variables
    (`across_layers/log10_trust_ratio` as well, since the ratios span orders
    of magnitude).

    Between records the monitor reads nothing from the devices: it counts
    batches on the host and reads `optimizer.iterations` only when a record
    may be due. Each record copies four scalars per variable to the host in
    one transfer (and, on JAX, re-attaches the model's state to its
    variables, which `fit` does only once per epoch), so keep `every_n_steps` in the tens or hundreds for
    large models.

    Args:
        every_n_steps: integer >= 1. Defaults to `100`.
        log_dir: `None` or a directory for TensorBoard event files. They are
            written with `tf.summary`, so TensorFlow must be installed
            (`pip install tensorflow`) on any Keras backend; without it the
            constructor raises `ImportError`.
        layers: `None` (every variable) or a regular expression, or a list of
            them, searched in `variable.path`: the variables that get
            TensorBoard scalars.

    Example:

    >>> import keras, keras_lamb, numpy as np
    >>> from keras_lamb.callbacks import TrustRatioMonitor
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(keras_lamb.LARS(track_trust_ratios=True), loss="mse")
    >>> monitor = TrustRatioMonitor(every_n_steps=2)
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 2)), batch_size=2,
    ...                     callbacks=[monitor], verbose=0)
    >>> [step for step, _ in monitor.records]
    [1, 2, 4]
    """

    def __init__(self, every_n_steps=100, log_dir=None, layers=None):
        super().__init__()
        if (
            not isinstance(every_n_steps, numbers.Integral)
            or isinstance(every_n_steps, (bool, np.bool_))
            or every_n_steps < 1
        ):
            raise ValueError(
                "Argument `every_n_steps` must be an integer >= 1. "
                f"Received: every_n_steps={every_n_steps!r}"
            )
        if layers is None:
            patterns = []
        elif isinstance(layers, str):
            patterns = [layers]
        elif isinstance(layers, (list, tuple)) and all(
            isinstance(p, str) for p in layers
        ):
            patterns = list(layers)
        else:
            raise ValueError(
                "Argument `layers` must be None, a regular expression or a "
                f"list of regular expressions. Received: layers={layers!r}"
            )
        try:
            self._layer_patterns = [re.compile(p) for p in patterns]
        except re.error as e:
            raise ValueError(
                f"Argument `layers` contains an invalid regular expression "
                f"({e}). Received: layers={layers!r}"
            ) from None
        if log_dir is not None:
            _require_tensorflow()
        self.every_n_steps = int(every_n_steps)
        self.log_dir = log_dir
        self.layers = layers
        self.records = []
        self._optimizer = None
        self._last_step = None
        self._writer = None
        # Host-side step counting: batches run in this `fit`, and the
        # (batches, optimizer step) pair last read from the optimizer.
        self._batches = 0
        self._epoch_start = 0
        self._known = (0, 0)

    @property
    def update_symbol(self):
        """What `update_norm` is the norm of (the optimizer's
        `update_norm_of`: `"g"` for LARS, `"u"` for LAMB)."""
        if self._optimizer is None:
            return None
        return self._optimizer.update_norm_of

    def on_train_begin(self, logs=None):
        self._optimizer = unwrap_optimizer(self.model.optimizer)
        if self.log_dir is not None and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)
        self._batches = self._epoch_start = 0
        self._known = (0, self._step())

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._batches

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the epoch's last step run (steps_per_execution > 1 skips
        # the calls in between).
        self._batches = self._epoch_start + batch + 1
        if not self._due(self._max_step()):
            return
        self._sync_model_state()
        step = self._step()
        self._known = (self._batches, step)
        if self._due(step):
            self._record(step)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._optimizer.built:
            return
        step = self._step()
        if self.records and self.records[-1][0] == step:
            stats = self.records[-1][1]
        else:
            stats = self._optimizer.trust_ratio_stats()
        ratios = self._adapted_ratios(stats)
        if ratios.size:
            for key, value in zip(
                SUMMARY_KEYS,
                (ratios.min(), np.median(ratios), ratios.max()),
            ):
                logs[f"trust_ratio/{key}"] = float(value)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def _due(self, step):
        """Whether optimizer step `step` is one to record."""
        if step < 1:
            return False
        # Integer division: a call may cover several steps.
        return self._last_step is None or (
            step // self.every_n_steps > self._last_step // self.every_n_steps
        )

    def _max_step(self):
        """An upper bound on `optimizer.iterations`, without reading it.

        A batch advances the optimizer by at most one step, or with
        `gradient_accumulation_steps=k` by one per k batches, counted from an
        unknown phase; a `LossScaleOptimizer` may skip steps.
        """
        known_batches, known_step = self._known
        accumulation = self._optimizer.gradient_accumulation_steps or 1
        return known_step + math.ceil(
            (self._batches - known_batches) / accumulation
        )

    def _sync_model_state(self):
        # On JAX, `fit` keeps the state off the variables until the epoch
        # ends; `Callback.model` re-attaches it (one assign per variable).
        self.model

    def _step(self):
        return int(ops.convert_to_numpy(self._optimizer.iterations))

    def _record(self, step):
        stats = self._optimizer.trust_ratio_stats()
        self.records.append((step, stats))
        self._last_step = step
        if self._writer is not None:
            self._write_summaries(step, stats)

    def _chosen(self, path):
        return not self._layer_patterns or any(
            p.search(path) for p in self._layer_patterns
        )

    def _adapted_ratios(self, stats):
        """Trust ratios of the variables that use layer adaptation.

        Excluded variables (biases, norms) have ratio 1 by construction and
        would pull the summary towards 1. Variables not updated yet (NaN, no
        gradient so far) are left out.
        """
        ratios = np.array(
            [s["trust_ratio"] for s in stats.values() if s["adapted"]],
            dtype="float64",
        )
        return ratios[~np.isnan(ratios)]

    def _write_summaries(self, step, stats):
        # Variables not updated yet (NaN statistics) are left out.
        stats = {
            path: values for path, values in stats.items()
            if not math.isnan(values["trust_ratio"])
        }
        with self._writer.as_default(step=step):
            for path, values in stats.items():
                if self._chosen(path):
                    for stat in STAT_NAMES:
                        _write_scalar(f"{stat}/{path}", values[stat])
            for stat in STAT_NAMES:
                if not stats:
                    break
                _write_histogram(
                    f"across_layers/{stat}",
                    np.array([v[stat] for v in stats.values()]),
                )
            ratios = self._adapted_ratios(stats)
            ratios = ratios[ratios > 0]
            if ratios.size:
                _write_histogram(
                    "across_layers/log10_trust_ratio", np.log10(ratios)
                )


def _require_tensorflow():
    try:
        importlib.import_module("tensorflow")
    except ImportError:
        raise ImportError(
            "TrustRatioMonitor(log_dir=...) writes TensorBoard summaries with "
            "TensorFlow, which is not installed. Install it with `pip install "
            "tensorflow` (or `pip install keras-lamb[tensorflow]`), or pass "
            "`log_dir=None` to keep the statistics in `records` and History."
        ) from None


# `tf.summary.scalar`/`histogram` need the `tensorboard` package; the core op
# `tf.summary.write` with TensorBoard's plugin metadata does not, and
# TensorBoard reads the result the same way.


def _metadata(plugin_name, data_class):
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(data_class=data_class)
    metadata.plugin_data.plugin_name = plugin_name
    return metadata


def _write_scalar(tag, value):
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    tf.summary.write(
        tag,
        tf.constant(value, tf.float32),
        metadata=_metadata("scalars", summary_pb2.DATA_CLASS_SCALAR),
    )


def _write_histogram(tag, values, bins=30):
    """A TensorBoard histogram: a [bins, 3] tensor of (left, right, count)."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    counts, edges = np.histogram(values, bins=bins)
    buckets = np.stack([edges[:-1], edges[1:], counts], axis=1)
    tf.summary.write(
        tag,
        tf.constant(buckets, tf.float64),
        metadata=_metadata("histograms", summary_pb2.DATA_CLASS_TENSOR),
    )
