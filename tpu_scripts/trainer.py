"""The TensorFlow engine: one training loop for every `tf.distribute`
strategy, in the spirit of Model Garden's Orbit trainers.

The loop itself (loops of steps, evaluations, checkpoints, preemption,
divergence, progress lines) is `tpu_scripts.engine.Engine`, which the JAX
engine (`tpu_scripts.jax_trainer.JaxTrainer`) shares; this module is how a
step runs under `tf.distribute`.

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

What is model-specific lives in a `Task` (`tpu_scripts.tasks`: build the
model and metrics, compute per-example losses, update metrics), so the BERT
scripts reuse the trainer with their own task.
"""

import os
import time

import keras
import tensorflow as tf

from tpu_scripts import distribute, records, run_state
from tpu_scripts.engine import Engine, _PreemptionWatcher
from tpu_scripts.engine import first_line as _first_line
# The tasks live in `tpu_scripts.tasks` (shared with the JAX engine).
from tpu_scripts.tasks import ClassificationTask, Task  # noqa: F401


class Trainer(Engine):
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
        self.strategy = strategy
        self._init_common(
            task, global_batch_size, strategy.num_replicas_in_sync,
            gradient_accumulation_steps, steps_per_loop, model_dir, unit,
            distribute.is_chief(strategy), log)
        self.jit_compile = jit_compile
        with strategy.scope():
            self._build(optimizer_fn)
            self.global_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer,
            global_step=self.global_step,
        )
        self.checkpoint_manager = None
        if model_dir:
            self.checkpoint_manager = tf.train.CheckpointManager(
                self.checkpoint,
                distribute.writable_model_dir(model_dir, strategy),
                max_to_keep=max_checkpoints,
            )
        self._open_writers()
        self._forward_backward = tf.function(
            self._forward_backward_fn, jit_compile=True
        ) if jit_compile else self._forward_backward_fn
        self._train_loop = tf.function(self._train_loop_fn)
        self._eval_loop = tf.function(self._eval_loop_fn)
        self._any_worker = None
        self._all_finite = None
        self._sync_statistics = None
        self._init_loop_state()

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
            restored = self.current_step()
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
        return self.current_step()

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
                f"{self.current_step()} to {self.model_dir}: "
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
                self.current_step(),
                "a weight is not finite at the checkpoint")

    def _distribute(self, input_fn, epoch=0, start_step=0):
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: input_fn(ctx, epoch=epoch, start_step=start_step)
        )

    # --------------------------------------------------------- engine hooks

    def current_step(self):
        return int(self.global_step.numpy())

    def _train_iterator(self, train_input, epoch, step_in_epoch):
        return iter(self._distribute(train_input, epoch, step_in_epoch))

    def _run_steps(self, iterator, num_steps):
        self._train_loop(iterator, tf.constant(num_steps))

    def _translate_error(self, error):
        # A damaged file met by the input pipeline's own checks
        # (`tpu_scripts.records`): one `Error:` line naming it.
        if isinstance(error, tf.errors.OpError):
            return records.data_error(error)
        return None

    def _preemption_handler(self):
        """TensorFlow's handler under `MultiWorkerMirroredStrategy` (off
        Google Cloud VMs, where it does nothing for CPUs and TPUs): it
        agrees with the other workers on the step at which all save."""
        if not isinstance(self.strategy,
                          tf.distribute.MultiWorkerMirroredStrategy):
            return None
        try:
            from tensorflow.python.distribute.failure_handling import (
                failure_handling_util as util,
            )
        except ImportError:
            return None
        if util.detect_platform() in (util.PlatformDevice.GCE_TPU,
                                      util.PlatformDevice.GCE_CPU):
            return None
        return tf.distribute.experimental.PreemptionCheckpointHandler(
            self.strategy.cluster_resolver, self.checkpoint_manager,
            termination_config=tf.distribute.experimental.TerminationConfig(
                exit_fn=_PreemptionWatcher.handler_exit),
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
