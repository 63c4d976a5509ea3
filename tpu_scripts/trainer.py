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
  `tf.distribute`, so layer-wise trust ratios see global gradients;
- metrics, `tf.train.CheckpointManager` checkpoints (model, optimizer, step)
  with resume at the exact batch, TensorBoard summaries (loss, metrics,
  learning rate, and the keras_lamb per-variable trust-ratio statistics),
  progress lines with images/s.

What is model-specific lives in a `Task` (build the model and metrics,
compute per-example losses, update metrics), so the BERT scripts reuse the
trainer with their own task.
"""

import os
import re
import time

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from tpu_scripts import distribute

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
        global_batch_size: examples per step over all replicas.
        model_dir: checkpoints and TensorBoard logs (`None`: neither).
        steps_per_loop: steps per compiled inner loop (and per progress line).
        jit_compile: XLA-compile the forward and backward pass of each replica
            (the optimizer update stays outside: it all-reduces).
        max_checkpoints: checkpoints kept.
        log: a `print`-like function for progress lines (chief only).
    """

    def __init__(self, strategy, task, optimizer_fn, global_batch_size,
                 model_dir=None, steps_per_loop=100, jit_compile=False,
                 max_checkpoints=3, log=print):
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
        self.model_dir = model_dir
        self.steps_per_loop = steps_per_loop
        self.jit_compile = jit_compile
        self.is_chief = distribute.is_chief(strategy)
        self._log = log if self.is_chief else (lambda *a, **k: None)
        with strategy.scope():
            self.model = task.build_model()
            self.optimizer = optimizer_fn()
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

    # ------------------------------------------------------------------ steps

    def _forward_backward_fn(self, batch):
        model, optimizer = self.model, self.optimizer
        with tf.GradientTape() as tape:
            per_example_loss, outputs = self.task.compute_loss(
                model, batch, training=True
            )
            # sum / global batch: the all-reduce sum of the replicas'
            # gradients is then the gradient of the global mean loss.
            loss = tf.nn.compute_average_loss(
                per_example_loss, global_batch_size=self.global_batch_size
            )
            regularization = self.task.regularization_loss(model)
            if regularization is not None:
                loss += tf.nn.scale_regularization_loss(regularization)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.add_n([tf.cast(x, tf.float32) for x in model.losses])
                )
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        return per_example_loss, outputs, grads

    def _train_step(self, batch):
        per_example_loss, outputs, grads = self._forward_backward(batch)
        if (
            isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
            and self.strategy.num_replicas_in_sync > 1
        ):
            grads = self._poison_if_any_replica_overflowed(grads)
        self.optimizer.apply(grads, self.model.trainable_variables)
        self.train_metrics["loss"].update_state(
            per_example_loss, sample_weight=self.task.example_weights(batch)
        )
        self.task.update_metrics(self.train_metrics, batch, outputs)

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
        """Restores the latest checkpoint of `model_dir`; returns the step."""
        if not self.model_dir:
            return 0
        latest = tf.train.latest_checkpoint(self.model_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            self._log(
                f"Restored {latest} at step {int(self.global_step.numpy())}."
            )
        return int(self.global_step.numpy())

    def save(self):
        if self.checkpoint_manager is not None:
            return self.checkpoint_manager.save(
                checkpoint_number=self.global_step
            )

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
            for stat, value in values.items():
                write_scalar(f"{stat}/{path}", value, step)

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
              eval_every_steps=0, checkpoint_every_steps=0, stop_fn=None):
        """Trains to `train_steps` global steps, resuming from `model_dir`.

        Args:
            train_input: input function `(ctx, epoch, start_step)` with a
                `steps_per_epoch` attribute (see `tpu_scripts.data`).
            train_steps: the total number of steps of the run.
            eval_input: optional evaluation input function.
            eval_every_steps: evaluate every this many steps (0: at the end).
            checkpoint_every_steps: save every this many steps (0: at each
                evaluation and at the end).
            stop_fn: optional callable, given the metrics of every
                evaluation (the final one too); training stops (after a
                checkpoint) when it returns True.

        Returns:
            A dict: `step`, `train` (last loop's metrics), `eval` (last
            evaluation's metrics, if any), `stopped_early` (by `stop_fn`),
            `train_seconds`, `images_per_second` (over the steps run by this
            process) and `steady_images_per_second` (the same without the
            first loop, which traces and compiles; `None` after one loop).
        """
        steps_per_epoch = train_input.steps_per_epoch
        step = self.restore()
        start_step, start_time = step, time.time()
        train_results, eval_results = {}, {}
        boundaries = [b for b in (eval_every_steps, checkpoint_every_steps) if b]
        stopped, evaluated_at = False, None
        steady_steps, steady_seconds, loops = 0, 0.0, 0
        while step < train_steps and not stopped:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            iterator = iter(self._distribute(train_input, epoch, step_in_epoch))
            epoch_end = min((epoch + 1) * steps_per_epoch, train_steps)
            while step < epoch_end and not stopped:
                stop = min(epoch_end, step + self.steps_per_loop)
                for every in boundaries:  # stop at the next eval / checkpoint
                    stop = min(stop, (step // every + 1) * every)
                for m in self.train_metrics.values():
                    m.reset_state()
                loop_start = time.time()
                self._train_loop(iterator, tf.constant(stop - step))
                train_results = self._results(self.train_metrics)  # syncs
                seconds = time.time() - loop_start
                images_per_second = (
                    (stop - step) * self.global_batch_size / seconds
                )
                loops += 1
                if loops > 1:
                    steady_steps += stop - step
                    steady_seconds += seconds
                step = stop
                learning_rate = self.learning_rate()
                self._log(
                    f"step {step}/{train_steps} epoch "
                    f"{step / steps_per_epoch:.2f} "
                    + " ".join(f"{k} {v:.4f}" for k, v in train_results.items())
                    + f" lr {learning_rate:.4g} "
                    f"{images_per_second:.0f} images/s", flush=True,
                )
                with self._train_writer.as_default():
                    for name, value in train_results.items():
                        write_scalar(name, value, step)
                    write_scalar("learning_rate", learning_rate, step)
                    write_scalar("images_per_second", images_per_second, step)
                    self._write_trust_ratios(step)
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
        train_seconds = time.time() - start_time
        self.save()
        if eval_input is not None and evaluated_at != step:
            eval_results = self._evaluate_and_log(eval_input, step)
            if stop_fn:
                stop_fn(eval_results)
        self._train_writer.flush()
        self._eval_writer.flush()
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

    def _evaluate_and_log(self, eval_input, step):
        results = self.evaluate(eval_input)
        self._log(
            f"eval at step {step}: "
            + " ".join(f"{k} {v:.4f}" for k, v in results.items()),
            flush=True,
        )
        with self._eval_writer.as_default():
            for name, value in results.items():
                write_scalar(name, value, step)
        return results
