"""One training loop for every `tf.distribute` strategy, in the spirit of
Model Garden's Orbit trainers.

Keras 3's `Model.fit` does not run under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585), so the scripts use this loop for every strategy
instead of `fit` for some and a loop for others:

- an inner loop of `steps_per_loop` steps compiled in one `tf.function` (what
  TPUs need: one host round trip per loop), each step run on every replica by
  `strategy.run`;
- per-replica loss scaled by the global batch (`tf.nn.compute_average_loss`),
  so the optimizer's all-reduce *sum* of gradients is the gradient of the
  global mean loss; Keras 3 optimizers all-reduce inside `apply` under
  `tf.distribute`, so layer-wise trust ratios see global gradients, and
  keras_lamb's LAMB and LARS clip after that all-reduce;
- gradient accumulation in the step itself (as Model Garden and NVIDIA's
  BERT scripts do): with `gradient_accumulation_steps=k` a step takes the
  whole update's batch, each replica runs its share as k micro-batches and
  sums their gradients locally, and the optimizer applies the sum once, so
  one all-reduce per update, for any optimizer, and one step is one update
  (checkpoints, schedules and `--train_steps` count updates);
- metrics, `tf.train.CheckpointManager` checkpoints (model, optimizer, step)
  with resume at the exact batch, TensorBoard summaries (loss, metrics,
  learning rate, and the keras_lamb per-variable trust-ratio statistics),
  progress lines with examples/s in the task's unit (images, sequences).

What is model-specific lives in a `Task` (build the model and metrics,
compute per-example losses, update metrics), so the BERT scripts reuse the
trainer with their own task.
"""

import math
import os
import re
import signal
import threading
import time

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from keras_lamb.layerwise import STAT_NAMES
from tpu_scripts import distribute, records, run_state

# TensorBoard's scalar format, written with TensorFlow's own summary op so
# that training does not need the `tensorboard` package (only viewing does).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
)


def write_scalar(name, value, step):
    """Writes one TensorBoard scalar to the default summary writer."""
    tf.summary.write(
        name, tf.constant(value, tf.float32), step=step,
        metadata=_SCALAR_METADATA,
    )


class Task:
    """The model-specific half of training. Subclass and override.

    A batch is whatever the input function yields (a tuple or dict of
    per-replica tensors).
    """

    def build_model(self):
        """The `keras.Model` (called inside `strategy.scope()`)."""
        raise NotImplementedError

    def build_metrics(self):
        """A dict `{name: keras.metrics.Metric}` (inside the scope)."""
        return {}

    def compute_loss(self, model, batch, training):
        """`(per_example_loss [per-replica batch], outputs)`.

        Padding examples (evaluation) must already carry zero loss.
        """
        raise NotImplementedError

    def example_weights(self, batch):
        """Per-example weights for the loss metric (`None`: all ones)."""
        return None

    def regularization_loss(self, model):
        """A scalar added to the loss once per global batch, or `None`."""
        return None

    def update_metrics(self, metrics, batch, outputs):
        """Updates the task's metrics with one per-replica batch."""


class ClassificationTask(Task):
    """Softmax classification on `(images, labels[, weights])` batches.

    Args:
        model_fn: builds the model, which returns logits.
        num_classes: number of classes.
        label_smoothing: float in [0, 1).
        l2_weight_decay: coefficient of `0.5 * l2 * sum(w**2)` added to the
            loss (coupled weight decay, as in Goyal et al.; use it with SGD
            optimizers, not with LARS/LAMB/AdamW, which decay internally).
        l2_exclude: regular expression of variable paths the L2 term skips.
    """

    def __init__(self, model_fn, num_classes, label_smoothing=0.0,
                 l2_weight_decay=0.0, l2_exclude=None):
        self.model_fn = model_fn
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.l2_weight_decay = l2_weight_decay
        self.l2_exclude = re.compile(l2_exclude) if l2_exclude else None

    def build_model(self):
        return self.model_fn()

    def build_metrics(self):
        return {"accuracy": keras.metrics.SparseCategoricalAccuracy("accuracy")}

    def compute_loss(self, model, batch, training):
        images, labels = batch[0], batch[1]
        logits = tf.cast(model(images, training=training), tf.float32)
        one_hot = tf.one_hot(labels, self.num_classes)
        targets = (one_hot * (1 - self.label_smoothing)
                   + self.label_smoothing / self.num_classes)
        loss = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
        weights = self.example_weights(batch)
        if weights is not None:
            loss = loss * weights
        return loss, logits

    def example_weights(self, batch):
        return batch[2] if len(batch) > 2 else None

    def regularization_loss(self, model):
        if not self.l2_weight_decay:
            return None
        penalties = [
            tf.nn.l2_loss(tf.cast(v.value, tf.float32))
            for v in model.trainable_variables
            if not (self.l2_exclude and self.l2_exclude.search(v.path))
        ]
        return self.l2_weight_decay * tf.add_n(penalties)

    def update_metrics(self, metrics, batch, outputs):
        metrics["accuracy"].update_state(
            batch[1], outputs, sample_weight=self.example_weights(batch)
        )


def _inner_optimizer(optimizer):
    return getattr(optimizer, "inner_optimizer", optimizer)


class Trainer:
    """Trains `task`'s model under `strategy`; see the module docstring.

    Args:
        strategy: a `tf.distribute.Strategy`.
        task: a `Task`.
        optimizer_fn: zero-argument callable returning the optimizer (called
            inside the scope; may return a `keras.optimizers.LossScaleOptimizer`).
        global_batch_size: examples per step (one optimizer update) over all
            replicas.
        model_dir: checkpoints and TensorBoard logs (`None`: neither).
        steps_per_loop: steps per compiled inner loop (and per progress line).
        jit_compile: XLA-compile the forward and backward pass of each replica
            (the optimizer update stays outside: it all-reduces).
        max_checkpoints: checkpoints kept.
        log: a `print`-like function for progress lines (chief only).
        gradient_accumulation_steps: micro-batches per step on each replica
            (>= 1); the per-replica batch must be a multiple of it. Leave the
            optimizer's own `gradient_accumulation_steps` unset.
        unit: what one example is, for progress lines and TensorBoard
            (`"images"`: `images/s` and `images_per_second`; BERT passes
            `"sequences"`).
    """

    def __init__(self, strategy, task, optimizer_fn, global_batch_size,
                 model_dir=None, steps_per_loop=100, jit_compile=False,
                 max_checkpoints=3, log=print, gradient_accumulation_steps=1,
                 unit="images"):
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "The trainer drives tf.distribute and needs Keras's "
                "TensorFlow backend; this process uses "
                f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow "
                "before importing keras."
            )
        if steps_per_loop < 1:
            raise ValueError(
                f"steps_per_loop must be >= 1. Received: {steps_per_loop}."
            )
        self.strategy = strategy
        self.task = task
        self.global_batch_size = global_batch_size
        self.per_replica_batch_size = distribute.per_replica_batch_size(
            global_batch_size, strategy.num_replicas_in_sync
        )
        k = gradient_accumulation_steps
        if not isinstance(k, int) or k < 1 or self.per_replica_batch_size % k:
            raise ValueError(
                "gradient_accumulation_steps must be an integer >= 1 that "
                f"divides the per-replica batch ({global_batch_size} / "
                f"{strategy.num_replicas_in_sync} replicas = "
                f"{self.per_replica_batch_size}). Received: "
                f"gradient_accumulation_steps={k!r}."
            )
        self.gradient_accumulation_steps = k
        self.unit = unit
        self.model_dir = model_dir
        self.steps_per_loop = steps_per_loop
        self.jit_compile = jit_compile
        self.is_chief = distribute.is_chief(strategy)
        self._log = log if self.is_chief else (lambda *a, **k: None)
        with strategy.scope():
            self.model = task.build_model()
            self.optimizer = optimizer_fn()
            if _inner_optimizer(self.optimizer).gradient_accumulation_steps:
                raise ValueError(
                    "The optimizer accumulates gradients itself "
                    "(`gradient_accumulation_steps="
                    f"{_inner_optimizer(self.optimizer).gradient_accumulation_steps}`"
                    "); pass `gradient_accumulation_steps` to the Trainer "
                    "instead, which accumulates on each replica and "
                    "all-reduces once per update."
                )
            # Slots exist before any restore, so nothing is restored lazily.
            self.optimizer.build(self.model.trainable_variables)
            self.train_metrics = {
                "loss": keras.metrics.Mean("loss"), **task.build_metrics()
            }
            self.eval_metrics = {
                "loss": keras.metrics.Mean("loss"), **task.build_metrics()
            }
            self.global_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer,
            global_step=self.global_step,
        )
        self.checkpoint_manager = None
        self._train_writer = self._eval_writer = tf.summary.create_noop_writer()
        if model_dir:
            self.checkpoint_manager = tf.train.CheckpointManager(
                self.checkpoint,
                distribute.writable_model_dir(model_dir, strategy),
                max_to_keep=max_checkpoints,
            )
            if self.is_chief:
                self._train_writer = tf.summary.create_file_writer(
                    os.path.join(model_dir, "train")
                )
                self._eval_writer = tf.summary.create_file_writer(
                    os.path.join(model_dir, "eval")
                )
        self._forward_backward = tf.function(
            self._forward_backward_fn, jit_compile=True
        ) if jit_compile else self._forward_backward_fn
        self._train_loop = tf.function(self._train_loop_fn)
        self._eval_loop = tf.function(self._eval_loop_fn)
        self._any_worker = None
        self._last_save = self._segment_start = time.time()
        self._on_checkpoint = lambda *a: None
        self._saved_step = None
        self._all_finite = None
        self._sync_statistics = None
        self._last_train_results = {}
        self._record = None
        self._summaries_off = False

    # ------------------------------------------------------------------ steps

    def _forward_backward_fn(self, batch):
        model, optimizer = self.model, self.optimizer
        with tf.GradientTape() as tape:
            per_example_loss, outputs = self.task.compute_loss(
                model, batch, training=True
            )
            # sum / global batch: the all-reduce sum of the replicas'
            # gradients (and of the k micro-batches' when accumulating) is
            # then the gradient of the global mean loss.
            loss = tf.nn.compute_average_loss(
                per_example_loss, global_batch_size=self.global_batch_size
            )
            # Per-model terms: once per update, over replicas and micro-batches.
            k = self.gradient_accumulation_steps
            regularization = self.task.regularization_loss(model)
            if regularization is not None:
                loss += tf.nn.scale_regularization_loss(regularization) / k
            if model.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.add_n([tf.cast(x, tf.float32) for x in model.losses])
                ) / k
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        return per_example_loss, outputs, grads

    def _train_step(self, batch):
        if self.gradient_accumulation_steps == 1:
            grads = self._forward_backward_and_metrics(batch)
        else:
            grads = self._accumulated_gradients(batch)
        if (
            isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
            and self.strategy.num_replicas_in_sync > 1
        ):
            grads = self._poison_if_any_replica_overflowed(grads)
        self.optimizer.apply(grads, self.model.trainable_variables)

    def _forward_backward_and_metrics(self, batch):
        per_example_loss, outputs, grads = self._forward_backward(batch)
        self.train_metrics["loss"].update_state(
            per_example_loss, sample_weight=self.task.example_weights(batch)
        )
        self.task.update_metrics(self.train_metrics, batch, outputs)
        return grads

    def _accumulated_gradients(self, batch):
        """The sum of the gradients of this replica's k micro-batches.

        Each micro-batch loss is divided by the global batch of the whole
        update, so the sum over micro-batches and replicas is the gradient
        of the update's mean loss. Sparse gradients are summed densely.
        """
        k = self.gradient_accumulation_steps
        micro_batches = tf.nest.map_structure(
            lambda t: tf.reshape(t, [k, -1, *t.shape[1:]]), batch
        )

        def micro_batch(i):
            return tf.nest.map_structure(lambda t: t[i], micro_batches)

        first = self._forward_backward_and_metrics(micro_batch(0))
        present = [i for i, g in enumerate(first) if g is not None]
        total = [tf.convert_to_tensor(first[i]) for i in present]
        for i in tf.range(1, k):
            grads = self._forward_backward_and_metrics(micro_batch(i))
            total = [
                t + tf.convert_to_tensor(grads[j])
                for t, j in zip(total, present)
            ]
        summed = [None] * len(first)
        for t, j in zip(total, present):
            summed[j] = t
        return summed

    def _poison_if_any_replica_overflowed(self, grads):
        # LossScaleOptimizer decides to skip a step from the gradients it is
        # given, before they are all-reduced; if only one replica overflows,
        # the replicas would disagree (and take different branches around a
        # collective). Make every replica see the overflow.
        finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
        )
        overflowed = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32)
        )  # number of replicas with a non-finite gradient
        poison = tf.where(overflowed > 0, float("nan"), 1.0)
        return [None if g is None else g * tf.cast(poison, g.dtype)
                for g in grads]

    def _train_loop_fn(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            self.strategy.run(self._train_step, args=(next(iterator),))
            self.global_step.assign_add(1)

    def _eval_step(self, batch):
        per_example_loss, outputs = self.task.compute_loss(
            self.model, batch, training=False
        )
        self.eval_metrics["loss"].update_state(
            per_example_loss, sample_weight=self.task.example_weights(batch)
        )
        self.task.update_metrics(self.eval_metrics, batch, outputs)

    def _eval_loop_fn(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            self.strategy.run(self._eval_step, args=(next(iterator),))

    # --------------------------------------------------------------- helpers

    def restore(self):
        """Restores the newest intact checkpoint of `model_dir`; returns the
        step.

        Checkpoints are found from their files (`run_state.list_checkpoints`),
        so a lost or garbled `checkpoint` index hides none of them. A
        checkpoint that cannot be read (truncated, corrupt) is moved aside
        with a message naming it and the one restored instead; the index is
        then rewritten to list the intact ones.
        """
        if not self.model_dir:
            return 0
        checkpoints = run_state.list_checkpoints(self.model_dir)
        index = self._checkpoint_index()
        damaged = []
        for number, prefix in reversed(checkpoints):
            try:
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
            except (AssertionError, ValueError) as e:
                raise run_state.FlagError(
                    f"The checkpoint {prefix} does not match the model "
                    f"({_first_line(e)}). Use the flags it was written "
                    "with, or a new --model_dir."
                ) from None
            except Exception as e:  # noqa: BLE001 truncated, corrupt, missing
                # (TensorFlow raises OpErrors, but also IndexError "Read
                # less bytes than requested" for a cut data file.)
                damaged.append(prefix)
                self._log(f"Cannot read the checkpoint {prefix}: "
                          f"{_first_line(e)}", flush=True)
                continue
            restored = int(self.global_step.numpy())
            if damaged:
                self._log(f"Restored {prefix} (step {restored}) instead of "
                          f"the damaged {', '.join(damaged)}.", flush=True)
            else:
                self._log(f"Restored {prefix} at step {restored}.")
            self._saved_step = restored
            if damaged or index is None or (
                    index.model_checkpoint_path.rstrip("/").split("/")[-1]
                    != os.path.basename(prefix)):
                self._repair_index(damaged, [p for n, p in checkpoints
                                             if p not in damaged])
            return restored
        if damaged:
            raise run_state.DataError(
                f"No checkpoint in --model_dir={self.model_dir} can be read "
                f"({', '.join(damaged)}). Restore them from a copy, or move "
                "them away to train from step 0."
            )
        return int(self.global_step.numpy())

    def _checkpoint_index(self):
        """The `checkpoint` index file's state; `None` when it is missing
        or cannot be parsed (the checkpoints are found from their files)."""
        try:
            return tf.train.get_checkpoint_state(self.model_dir)
        except Exception:  # noqa: BLE001 a garbled text proto
            return None

    def _repair_index(self, damaged, intact):
        """Sets the damaged checkpoints aside and rewrites the `checkpoint`
        index with the intact ones (chief only; a new CheckpointManager
        then knows which to delete)."""
        if not self.is_chief:
            return
        for prefix in damaged:
            run_state.set_aside(prefix, self._log)
        from tensorflow.python.checkpoint import checkpoint_management

        checkpoint_management.update_checkpoint_state_internal(
            save_dir=self.model_dir, model_checkpoint_path=intact[-1],
            all_model_checkpoint_paths=intact, save_relative_paths=True)
        self.checkpoint_manager = tf.train.CheckpointManager(
            self.checkpoint,
            distribute.writable_model_dir(self.model_dir, self.strategy),
            max_to_keep=self.checkpoint_manager._max_to_keep,
        )
        self._log(f"Rewrote the checkpoint index of {self.model_dir}: "
                  f"latest {os.path.basename(intact[-1])}.")

    def save(self):
        """Saves a checkpoint at the global step (every worker takes part;
        only the chief's copy is kept); returns its path.

        Raises `run_state.Diverged` instead if a weight is not finite (the
        previous checkpoints stay the newest), and `run_state.FlagError`
        naming the directory if the filesystem refuses the write (a full
        disk): the previous checkpoint is intact.
        """
        if self.checkpoint_manager is None:
            return None
        self._check_finite_weights()
        try:
            path = self.checkpoint_manager.save(
                checkpoint_number=self.global_step)
        except (tf.errors.OpError, OSError) as e:
            raise run_state.FlagError(
                f"Could not write a checkpoint at step "
                f"{int(self.global_step.numpy())} to {self.model_dir}: "
                f"{_first_line(e)}. The previous checkpoint is intact; free "
                "space (or fix the permissions) and restart to resume."
            ) from None
        self._checkpointed(time.time())
        return path

    def _sync_replica_statistics(self):
        """Sets every replica's copy of the model's non-trainable float
        variables (batch-norm moving statistics) to their mean over the
        replicas.

        Under `tf.distribute` each replica updates its own copy of them,
        and a checkpoint keeps only the first replica's; without this an
        evaluation after a restart (every replica holding the first one's
        statistics) differs from the same evaluation in an uninterrupted
        run (each replica using its own). Done at the end of every loop of
        steps: every checkpoint and evaluation happens there (a SIGTERM's
        too) or right after a restore, which gives every replica the same
        values, so both runs evaluate and save the same values, bit for
        bit.
        """
        if self.strategy.num_replicas_in_sync == 1:
            return
        if self._sync_statistics is None:
            variables = [v for v in self.model.non_trainable_variables
                         if "float" in str(v.dtype)]
            if not variables:
                self._sync_statistics = lambda: None
                return

            def sync():
                context = tf.distribute.get_replica_context()
                means = context.all_reduce(
                    tf.distribute.ReduceOp.MEAN,
                    [tf.identity(v.value) for v in variables])
                for v, mean in zip(variables, means):
                    v.assign(mean)

            self._sync_statistics = tf.function(
                lambda: self.strategy.run(sync))
        self._sync_statistics()

    def _check_finite_weights(self):
        if self._all_finite is None:
            variables = list(self.model.variables)
            self._all_finite = tf.function(lambda: tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(v.value))
                 for v in variables if "float" in str(v.dtype)]))
        if not bool(self._all_finite()):
            raise run_state.Diverged(
                int(self.global_step.numpy()),
                "a weight is not finite at the checkpoint")

    def _checkpointed(self, now):
        self._last_save = now
        self._saved_step = int(self.global_step.numpy())
        self._on_checkpoint(self._saved_step, now - self._segment_start,
                            self._last_train_results)

    def learning_rate(self):
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    def _results(self, metrics):
        # Every worker reads (sync-on-read variables all-reduce on read).
        return {
            name: float(keras.ops.convert_to_numpy(m.result()))
            for name, m in metrics.items()
        }

    def _write_trust_ratios(self, step):
        inner = _inner_optimizer(self.optimizer)
        if not getattr(inner, "track_trust_ratios", False):
            return
        for path, values in inner.trust_ratio_stats().items():
            for stat in STAT_NAMES:  # not `adapted`, a flag
                if math.isfinite(values[stat]):  # NaN: not updated yet
                    write_scalar(f"{stat}/{path}", values[stat], step)

    def _distribute(self, input_fn, epoch=0, start_step=0):
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: input_fn(ctx, epoch=epoch, start_step=start_step)
        )

    # ------------------------------------------------------------ public API

    def evaluate(self, eval_input):
        """Metrics over `eval_input` (an input function with
        `steps_per_epoch`), every example once."""
        for m in self.eval_metrics.values():
            m.reset_state()
        iterator = iter(self._distribute(eval_input))
        self._eval_loop(iterator, tf.constant(eval_input.steps_per_epoch))
        return self._results(self.eval_metrics)

    def train(self, train_input, train_steps, eval_input=None,
              eval_every_steps=0, checkpoint_every_steps=0,
              checkpoint_every_seconds=0, on_checkpoint=None, stop_fn=None,
              record=None):
        """Trains to `train_steps` global steps, resuming from `model_dir`.

        Args:
            train_input: input function `(ctx, epoch, start_step)` with a
                `steps_per_epoch` attribute (see `tpu_scripts.resnet.data`).
            train_steps: the total number of steps of the run.
            eval_input: optional evaluation input function.
            eval_every_steps: evaluate every this many steps (0: at the end).
            checkpoint_every_steps: save every this many steps (0: at each
                evaluation and at the end).
            checkpoint_every_seconds: also save at the first loop boundary
                this long after the last save (0: never by time). Under
                `MultiWorkerMirroredStrategy` the workers agree on it.
            on_checkpoint: called as `on_checkpoint(step, train_seconds,
                train_metrics)` after every save.
            stop_fn: optional callable, given the metrics of every
                evaluation (the final one too); training stops (after a
                checkpoint) when it returns True.
            record: optional `run_state.RunRecord`: told of every loop
                (`loop_finished`), checkpoint (`checkpointed`, unless
                `on_checkpoint` is given) and divergence (`diverged`).

        On SIGTERM (with a `model_dir`) the run saves a checkpoint at the
        next loop boundary, the last one included, and raises
        `run_state.Preempted`; see `_PreemptionWatcher`. A non-finite
        training loss (or a non-finite weight at a checkpoint) raises
        `run_state.Diverged` before anything non-finite is saved.

        Returns:
            A dict: `step`, `train` (last loop's metrics), `eval` (last
            evaluation's metrics, if any), `stopped_early` (by `stop_fn`),
            `train_seconds`, `images_per_second` (over the steps run by this
            process) and `steady_images_per_second` (the same without the
            first loop, which traces and compiles; `None` after one loop).
        """
        for name, value in (("eval_every_steps", eval_every_steps),
                            ("checkpoint_every_steps", checkpoint_every_steps),
                            ("checkpoint_every_seconds",
                             checkpoint_every_seconds),
                            ("train_steps", train_steps)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0. Received: {value}.")
        self._record = record
        if on_checkpoint is None and record is not None:
            on_checkpoint = record.checkpointed
        try:
            return self._train(train_input, train_steps, eval_input,
                               eval_every_steps, checkpoint_every_steps,
                               checkpoint_every_seconds, on_checkpoint,
                               stop_fn)
        except run_state.Diverged as e:
            self._log(f"Diverged at step {e.step}: {e.detail}.", flush=True)
            if record is not None:
                record.diverged(e.step, e.detail)
            raise
        except tf.errors.OpError as e:
            # A damaged file met by the input pipeline's own checks
            # (`tpu_scripts.records`): one `Error:` line naming it.
            error = records.data_error(e)
            if error is None:
                raise
            raise error from None

    def _train(self, train_input, train_steps, eval_input, eval_every_steps,
               checkpoint_every_steps, checkpoint_every_seconds,
               on_checkpoint, stop_fn):
        steps_per_epoch = train_input.steps_per_epoch
        step = self.restore()
        start_step, start_time = step, time.time()
        self._last_save = start_time
        self._on_checkpoint = on_checkpoint or (lambda *a: None)
        self._segment_start = start_time
        train_results, eval_results = {}, {}
        boundaries = [b for b in (eval_every_steps, checkpoint_every_steps) if b]
        stopped, evaluated_at = False, None
        steady_steps, steady_seconds, loops = 0, 0.0, 0
        with _PreemptionWatcher(self) as watcher:
            while step < train_steps and not stopped:
                epoch, step_in_epoch = divmod(step, steps_per_epoch)
                iterator = iter(
                    self._distribute(train_input, epoch, step_in_epoch)
                )
                epoch_end = min((epoch + 1) * steps_per_epoch, train_steps)
                while step < epoch_end and not stopped:
                    stop = min(epoch_end, step + self.steps_per_loop)
                    for every in boundaries:  # stop at the next eval / save
                        stop = min(stop, (step // every + 1) * every)
                    train_results, seconds = self._run_loop(
                        iterator, step, stop, train_steps, steps_per_epoch
                    )
                    self._last_train_results = train_results
                    loops += 1
                    if loops > 1:  # the first loop traces and compiles
                        steady_steps += stop - step
                        steady_seconds += seconds
                    step = stop
                    if self._record is not None:
                        self._record.loop_finished(
                            step, time.time() - self._segment_start)
                    evaluate = eval_input is not None and eval_every_steps and (
                        step % eval_every_steps == 0 and step < train_steps
                    )
                    if evaluate:
                        eval_results = self._evaluate_and_log(eval_input, step)
                        evaluated_at = step
                        stopped = bool(stop_fn and stop_fn(eval_results))
                    if (checkpoint_every_steps and step % checkpoint_every_steps
                            == 0) or (evaluate and not checkpoint_every_steps):
                        self.save()
                    elif checkpoint_every_seconds and self._all_agree(
                            time.time() - self._last_save
                            >= checkpoint_every_seconds):
                        self.save()
                    if step < train_steps and not stopped:
                        watcher.stop_if_preempted(step)
            train_seconds = time.time() - start_time
            if self._saved_step != step:  # (rewriting a checkpoint can tear it)
                self.save()
            # A SIGTERM during the last loop or the final save: the
            # checkpoint is there; stop before the final evaluation.
            watcher.stop_if_preempted(step)
            if eval_input is not None and evaluated_at != step:
                eval_results = self._evaluate_and_log(eval_input, step)
                if stop_fn:
                    stop_fn(eval_results)
        self._flush_summaries()
        steps_run = step - start_step
        return {
            "step": step,
            "train": train_results,
            "eval": eval_results,
            "stopped_early": stopped,
            "train_seconds": train_seconds,
            "images_per_second": (
                steps_run * self.global_batch_size / train_seconds
                if steps_run else 0.0
            ),
            "steady_images_per_second": (
                steady_steps * self.global_batch_size / steady_seconds
                if steady_steps else None
            ),
        }

    def _flush_summaries(self):
        for writer in (self._train_writer, self._eval_writer):
            self._summaries(writer.flush)

    def _summaries(self, write, *args):
        """Runs a TensorBoard write; a failure (a full disk) is reported
        once and turns summaries off instead of stopping the run."""
        if self._summaries_off:
            return
        try:
            write(*args)
        except (tf.errors.OpError, OSError) as e:
            self._summaries_off = True
            self._log(f"TensorBoard summaries stopped: writing to "
                      f"{self.model_dir} failed ({_first_line(e)}). "
                      "Training goes on.", flush=True)

    def _run_loop(self, iterator, step, stop, train_steps, steps_per_epoch):
        """Runs steps `step..stop`, logs and writes summaries; returns the
        loop's metrics and its seconds."""
        for m in self.train_metrics.values():
            m.reset_state()
        loop_start = time.time()
        self._train_loop(iterator, tf.constant(stop - step))
        # At every loop boundary, where a preemption may save: a resumed
        # run then holds exactly what an uninterrupted one does.
        self._sync_replica_statistics()
        train_results = self._results(self.train_metrics)  # syncs
        seconds = time.time() - loop_start
        images_per_second = (stop - step) * self.global_batch_size / seconds
        learning_rate = self.learning_rate()
        self._log(
            f"step {stop}/{train_steps} epoch {stop / steps_per_epoch:.2f} "
            + " ".join(f"{k} {v:.4f}" for k, v in train_results.items())
            + f" lr {learning_rate:.4g} {images_per_second:.0f} {self.unit}/s",
            flush=True,
        )
        loss = train_results.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise run_state.Diverged(
                stop, f"the training loss of steps {step + 1}-{stop} is "
                f"{loss} (learning rate {learning_rate:.4g})")
        self._summaries(self._write_loop_summaries, train_results,
                        learning_rate, images_per_second, stop)
        return train_results, seconds

    def _write_loop_summaries(self, train_results, learning_rate,
                              images_per_second, stop):
        with self._train_writer.as_default():
            for name, value in train_results.items():
                write_scalar(name, value, stop)
            write_scalar("learning_rate", learning_rate, stop)
            write_scalar(f"{self.unit}_per_second", images_per_second, stop)
            self._write_trust_ratios(stop)

    def _all_agree(self, flag):
        """`flag` on every worker if it is true on any (a time-based save is
        a collective under `MultiWorkerMirroredStrategy`: all workers must
        take it at the same step)."""
        if not isinstance(self.strategy,
                          tf.distribute.MultiWorkerMirroredStrategy):
            return flag
        if self._any_worker is None:
            self._any_worker = tf.function(lambda x: self.strategy.reduce(
                tf.distribute.ReduceOp.SUM,
                self.strategy.run(lambda: tf.identity(x)), axis=None,
            ))
        return bool(self._any_worker(tf.constant(float(flag))) > 0)

    def _evaluate_and_log(self, eval_input, step):
        results = self.evaluate(eval_input)
        self._log(
            f"eval at step {step}: "
            + " ".join(f"{k} {v:.4f}" for k, v in results.items()),
            flush=True,
        )
        self._summaries(self._write_eval_summaries, results, step)
        return results

    def _write_eval_summaries(self, results, step):
        with self._eval_writer.as_default():
            for name, value in results.items():
                write_scalar(name, value, step)


def _first_line(error):
    """The first line of an error's message (TensorFlow's carry a
    traceback of graph ops after it)."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text).strip()
    return text.splitlines()[0] if text else repr(error)


class _HandlerExit(Exception):
    """Raised by PreemptionCheckpointHandler's exit function."""


class _PreemptionWatcher:
    """Saves a checkpoint and stops the run on SIGTERM (a context manager
    around the training loop).

    Under `MultiWorkerMirroredStrategy` (off Google Cloud VMs, where
    TensorFlow's handler does nothing for CPUs and TPUs) TensorFlow's
    `tf.distribute.experimental.PreemptionCheckpointHandler` watches: it
    agrees with the other workers on the step at which all of them save.
    Every other strategy runs in one process per host loop: a SIGTERM handler
    sets a flag, and at the next loop boundary the trainer saves. Either way
    `stop_if_preempted` then raises `run_state.Preempted`. Nothing is watched
    without a `model_dir` or outside the main thread.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.handler = None
        self.signalled = False
        self._previous = None

    def __enter__(self):
        trainer = self.trainer
        main_thread = threading.current_thread() is threading.main_thread()
        if trainer.checkpoint_manager is None or not main_thread:
            return self
        if self._tensorflow_handler_applies():
            self.handler = (
                tf.distribute.experimental.PreemptionCheckpointHandler(
                    trainer.strategy.cluster_resolver,
                    trainer.checkpoint_manager,
                    termination_config=tf.distribute.experimental
                    .TerminationConfig(exit_fn=self._handler_exit),
                )
            )
        else:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _tensorflow_handler_applies(self):
        if not isinstance(self.trainer.strategy,
                          tf.distribute.MultiWorkerMirroredStrategy):
            return False
        try:
            from tensorflow.python.distribute.failure_handling import (
                failure_handling_util as util,
            )
        except ImportError:
            return False
        return util.detect_platform() not in (util.PlatformDevice.GCE_TPU,
                                              util.PlatformDevice.GCE_CPU)

    @staticmethod
    def _handler_exit():
        raise _HandlerExit()

    def _on_sigterm(self, signum, frame):
        self.signalled = True
        self.trainer._log("SIGTERM: saving a checkpoint at the end of this "
                          "loop, then stopping.", flush=True)

    def stop_if_preempted(self, step):
        """Saves and raises `run_state.Preempted` if a SIGTERM came."""
        trainer = self.trainer
        if self.handler is not None:
            try:
                self.handler.save_checkpoint_if_preempted(
                    checkpoint_number=trainer.global_step
                )
            except _HandlerExit:
                trainer._checkpointed(time.time())
                self._stop(step)
            return
        if self.signalled:
            if trainer._saved_step != step:
                trainer.save()
            self._stop(step)

    def _stop(self, step):
        self.trainer._log(f"Preempted: saved a checkpoint at step {step}; "
                          "a restart continues from it.", flush=True)
        raise run_state.Preempted(step)
