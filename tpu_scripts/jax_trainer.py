"""The JAX engine: the scripts' training loop on `KERAS_BACKEND=jax`, over
`keras.distribution` (TPU VMs, GPUs, CPUs), without TensorFlow.

The sibling of `tpu_scripts.trainer.Trainer` (TensorFlow, `tf.distribute`):
both run the same `tpu_scripts.tasks.Task`s inside the same loop
(`tpu_scripts.engine.Engine`: evaluations, checkpoints, SIGTERM, divergence,
progress lines, summaries). What differs is how a step runs:

- the state (trainable and non-trainable weights, optimizer and metric
  variables) is passed to a jitted, pure function and donated; the Task's
  code runs inside a `keras.StatelessScope` that maps each variable to its
  traced value, so tasks stay written against Keras layers;
- a loop of up to `steps_per_loop` steps is one compiled `lax.scan` over
  stacked batches (one dispatch per loop; the stack is split where it would
  exceed `max_stacked_bytes` of input on the device);
- the batch is the *global* batch, sharded over the data-parallel devices
  of `keras.distribution` (every local device, or every device of every
  host after `keras.distribution.initialize()`); XLA inserts the
  all-reduce. The loss is the sum of per-example losses divided by the
  global batch, as on TensorFlow. Batch normalization therefore normalizes
  over the global batch (as TensorFlow's `--sync_batchnorm`);
- gradient accumulation: a step's global batch is laid out `[k, B/k, ...]`
  on the host and the k micro-batches' gradients are summed in a scan, then
  applied once;
- checkpoints are orbax's (`<model_dir>/checkpoints/<step>/`): atomic,
  sharded over hosts, local or gs://, with the exact state (weights,
  optimizer slots and step count, dropout seed states, the global step), so
  a resume continues bit for bit;
- input: each process feeds its own share of the global batch (a tuple or
  dict of arrays) from the input object's `numpy_batches` (in-memory
  arrays, synthetic data: no TensorFlow), or from its `tf.data` pipeline on
  the host where it has no NumPy path (TFRecords, TFDS; TensorFlow needed).
"""

import os
import time

import jax
import keras
import numpy as np

from tpu_scripts import fileio, run_state
from tpu_scripts.engine import Engine, first_line

# Input bytes stacked on the devices for one compiled loop, at most.
MAX_STACKED_BYTES = 1 << 30


class JaxTrainer(Engine):
    """Trains `task`'s model on the JAX backend; see the module docstring.

    Args:
        task: a `tpu_scripts.tasks.Task`.
        optimizer_fn: zero-argument callable returning the optimizer (may
            return a `keras.optimizers.LossScaleOptimizer`).
        global_batch_size: examples per step (one optimizer update) over all
            devices and hosts.
        distribution: a `keras.distribution.Distribution` (`DataParallel`),
            or `None` for one device.
        model_dir: checkpoints and TensorBoard logs (`None`: neither).
        steps_per_loop: steps per compiled loop (and per progress line).
        max_checkpoints: checkpoints kept.
        log: a `print`-like function for progress lines (process 0 only).
        gradient_accumulation_steps: micro-batches per step (>= 1); it must
            divide each device's share of the batch.
        unit: what one example is (`"images"`, `"sequences"`).
        max_stacked_bytes: input bytes stacked for one compiled scan.
    """

    def __init__(self, task, optimizer_fn, global_batch_size,
                 distribution=None, model_dir=None, steps_per_loop=100,
                 max_checkpoints=3, log=print, gradient_accumulation_steps=1,
                 unit="images", max_stacked_bytes=MAX_STACKED_BYTES):
        if keras.backend.backend() != "jax":
            raise RuntimeError(
                "The JAX engine needs Keras's JAX backend; this process uses "
                f"{keras.backend.backend()!r}. Set KERAS_BACKEND=jax before "
                "importing keras.")
        self.distribution = distribution
        self.num_replicas = num_data_shards(distribution)
        self.num_processes = jax.process_count()
        self._init_common(
            task, global_batch_size, self.num_replicas,
            gradient_accumulation_steps, steps_per_loop, model_dir, unit,
            jax.process_index() == 0, log)
        self.max_stacked_bytes = max_stacked_bytes
        with _scope(distribution):
            self._build(optimizer_fn)
        self._global_step = 0
        self._all_finite = None
        self.checkpoint_manager = None
        if model_dir:
            self.checkpoint_manager = _Checkpoints(
                model_dir, max_checkpoints, self._log)
        self._open_writers()
        # The state keeps its layout (`keras.distribution`'s, e.g. kernels
        # sharded on "model") across steps: XLA would otherwise pick the
        # outputs' shardings itself.
        state_shardings = jax.tree.map(lambda a: a.sharding, self._state())
        self._train_loop = jax.jit(self._train_loop_fn, donate_argnums=0,
                                   out_shardings=state_shardings)
        self._eval_step = jax.jit(
            self._eval_step_fn, donate_argnums=2,
            out_shardings=[v.value.sharding for v in
                           _metric_variables(self.eval_metrics)])
        self._init_loop_state()

    # ------------------------------------------------------------ state

    def _variables(self):
        """The four groups of variables a step reads and writes."""
        return (self.model.trainable_variables,
                self.model.non_trainable_variables,
                self.optimizer.variables,
                _metric_variables(self.train_metrics))

    def _state(self):
        return tuple([v.value for v in group] for group in self._variables())

    def _set_state(self, state):
        for group, values in zip(self._variables(), state):
            for variable, value in zip(group, values):
                variable.assign(value)

    def current_step(self):
        return self._global_step

    # ------------------------------------------------------------ steps

    def _forward_backward(self, trainable, non_trainable, optimizer_vars,
                          batch):
        """`(grads, non_trainable, per_example_loss, outputs)` of one
        micro-batch."""
        model, optimizer, task = self.model, self.optimizer, self.task
        k = self.gradient_accumulation_steps

        def loss_fn(trainable):
            mapping = list(zip(model.trainable_variables, trainable)) + list(
                zip(model.non_trainable_variables, non_trainable)) + list(
                zip(optimizer.variables, optimizer_vars))
            with keras.StatelessScope(state_mapping=mapping,
                                      collect_losses=True) as scope:
                per_example_loss, outputs = task.compute_loss(
                    model, batch, training=True)
                # sum / the update's global batch: the sum over devices
                # and micro-batches is the gradient of the mean loss.
                loss = keras.ops.sum(per_example_loss) / self.global_batch_size
                regularization = task.regularization_loss(model)
                if regularization is not None:
                    loss = loss + regularization / k
                if model.losses:
                    loss = loss + sum(keras.ops.cast(x, "float32")
                                      for x in model.losses) / k
                if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                    loss = optimizer.scale_loss(loss)
            new_non_trainable = [
                _current(scope, v, old) for v, old in
                zip(model.non_trainable_variables, non_trainable)]
            return loss, (new_non_trainable, per_example_loss, outputs)

        grads, (non_trainable, per_example_loss, outputs) = jax.grad(
            loss_fn, has_aux=True)(trainable)
        return grads, non_trainable, per_example_loss, outputs

    def _update_metrics(self, metrics, metric_vars, batch, per_example_loss,
                        outputs):
        variables = _metric_variables(metrics)
        with keras.StatelessScope(
                state_mapping=list(zip(variables, metric_vars))) as scope:
            metrics["loss"].update_state(
                per_example_loss,
                sample_weight=self.task.example_weights(batch))
            self.task.update_metrics(metrics, batch, outputs)
        return [_current(scope, v, old)
                for v, old in zip(variables, metric_vars)]

    def _train_step(self, state, batch):
        """One update from one step's batch, laid out `[k, B/k, ...]`."""
        trainable, non_trainable, optimizer_vars, metric_vars = state

        def micro_step(carry, micro_batch):
            summed, non_trainable, metric_vars = carry
            grads, non_trainable, per_example_loss, outputs = (
                self._forward_backward(trainable, non_trainable,
                                       optimizer_vars, micro_batch))
            metric_vars = self._update_metrics(
                self.train_metrics, metric_vars, micro_batch,
                per_example_loss, outputs)
            summed = grads if summed is None else [
                s + g for s, g in zip(summed, grads)]
            return summed, non_trainable, metric_vars

        k = self.gradient_accumulation_steps
        first = jax.tree.map(lambda t: t[0], batch)
        carry = micro_step((None, non_trainable, metric_vars), first)
        if k > 1:
            rest = jax.tree.map(lambda t: t[1:], batch)
            carry, _ = jax.lax.scan(
                lambda c, b: (micro_step(c, b), None), carry, rest)
        grads, non_trainable, metric_vars = carry
        trainable, optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, grads, trainable)
        return trainable, non_trainable, optimizer_vars, metric_vars

    def _train_loop_fn(self, state, batches):
        state, _ = jax.lax.scan(
            lambda s, b: (self._train_step(s, b), None), state, batches)
        return state

    def _eval_step_fn(self, trainable, non_trainable, metric_vars, batch):
        model = self.model
        mapping = list(zip(model.trainable_variables, trainable)) + list(
            zip(model.non_trainable_variables, non_trainable))
        with keras.StatelessScope(state_mapping=mapping):
            per_example_loss, outputs = self.task.compute_loss(
                model, batch, training=False)
        return self._update_metrics(self.eval_metrics, metric_vars, batch,
                                    per_example_loss, outputs)

    # ------------------------------------------------------------ input

    def _train_iterator(self, train_input, epoch, step_in_epoch):
        return host_batches(train_input, epoch, step_in_epoch)

    def _global_array(self, local, leading_dims):
        """The global array of this process's share `local`, sharded on
        the batch axis (after `leading_dims` unsharded axes)."""
        sharding = data_sharding(self.distribution, local.ndim, leading_dims)
        shape = list(local.shape)
        shape[leading_dims] *= self.num_processes
        return jax.make_array_from_process_local_data(
            sharding, local, tuple(shape))

    def _run_steps(self, iterator, num_steps):
        k = self.gradient_accumulation_steps
        done = 0
        while done < num_steps:
            first = next(iterator)
            step_bytes = sum(np.asarray(t).nbytes
                             for t in jax.tree.leaves(first))
            chunk = min(num_steps - done,
                        max(1, self.max_stacked_bytes // max(1, step_bytes)))
            steps = [first] + [next(iterator) for _ in range(chunk - 1)]
            # [steps, k micro-batches, this process's share / k, ...]
            stacked = jax.tree.map(
                lambda *ts: np.stack([np.asarray(t) for t in ts]).reshape(
                    (chunk, k, -1) + np.shape(ts[0])[1:]), *steps)
            batches = jax.tree.map(lambda t: self._global_array(t, 2),
                                   stacked)
            state = self._train_loop(self._state(), batches)
            self._set_state(state)
            done += chunk
            self._global_step += chunk

    def evaluate(self, eval_input):
        """Metrics over `eval_input` (an input object with
        `steps_per_epoch`), every example once."""
        for m in self.eval_metrics.values():
            m.reset_state()
        variables = _metric_variables(self.eval_metrics)
        metric_vars = [v.value for v in variables]
        trainable = [v.value for v in self.model.trainable_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        iterator = host_batches(eval_input, 0, 0)
        for _ in range(eval_input.steps_per_epoch):
            batch = jax.tree.map(
                lambda t: self._global_array(np.asarray(t), 0),
                next(iterator))
            metric_vars = self._eval_step(trainable, non_trainable,
                                          metric_vars, batch)
        for variable, value in zip(variables, metric_vars):
            variable.assign(value)
        return self._results(self.eval_metrics)

    def predict(self, input_fn, outputs_fn):
        """Yields, per batch of the input object `input_fn` (every example
        once), `outputs_fn(model, batch)` (a tuple of arrays, computed
        by the devices; inference mode) as NumPy, gathered from every
        process."""
        from jax.experimental import multihost_utils

        model = self.model

        def step(trainable, non_trainable, batch):
            mapping = list(zip(model.trainable_variables, trainable)) + list(
                zip(model.non_trainable_variables, non_trainable))
            with keras.StatelessScope(state_mapping=mapping):
                return outputs_fn(model, batch)

        step = jax.jit(step)
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        iterator = host_batches(input_fn, 0, 0)
        for _ in range(input_fn.steps_per_epoch):
            batch = jax.tree.map(
                lambda t: self._global_array(np.asarray(t), 0),
                next(iterator))
            outputs = step(trainable, non_trainable, batch)
            if self.num_processes > 1:
                outputs = multihost_utils.process_allgather(outputs,
                                                            tiled=True)
            yield tuple(np.asarray(x) for x in outputs)

    def _sync_replica_statistics(self):
        """Nothing to do: one global copy of every statistic (batch norm
        normalizes over the global batch)."""

    def _all_agree(self, flag):
        if self.num_processes == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(
            np.asarray(bool(flag)))))

    # ------------------------------------------------------- checkpoints

    def _checkpoint_tree(self):
        return {
            "model": {"trainable": [v.value for v in
                                    self.model.trainable_variables],
                      "non_trainable": [v.value for v in
                                        self.model.non_trainable_variables]},
            "optimizer": [v.value for v in self.optimizer.variables],
            "global_step": np.int64(self._global_step),
        }

    def save(self):
        """Saves a checkpoint at the global step (every process takes
        part); returns its path. Raises `run_state.Diverged` instead if a
        weight is not finite, and `run_state.FlagError` naming the
        directory if the filesystem refuses the write."""
        if self.checkpoint_manager is None:
            return None
        self._check_finite_weights()
        path = self.checkpoint_manager.save(
            self._global_step, self._checkpoint_tree())
        self._checkpointed(time.time())
        return path

    def _check_finite_weights(self):
        variables = [v for v in self.model.variables
                     if "float" in str(v.dtype)]
        if self._all_finite is None:  # one compiled reduction, one sync
            self._all_finite = jax.jit(lambda values: jax.numpy.stack(
                [jax.numpy.all(jax.numpy.isfinite(x)) for x in values]))
        finite = np.asarray(self._all_finite([v.value for v in variables]))
        if not finite.all():
            path = variables[int(np.argmin(finite))].path
            raise run_state.Diverged(
                self._global_step,
                f"the weight {path} is not finite at the checkpoint")

    def restore(self):
        """Restores the newest intact checkpoint; returns the step. A
        damaged checkpoint is set aside, naming it and the one restored
        instead; one of another model is an error."""
        if self.checkpoint_manager is None:
            return 0
        restored = self.checkpoint_manager.restore(self._checkpoint_tree())
        if restored is None:
            return self._global_step
        step, tree = restored
        model = tree["model"]
        for group, values in (
                (self.model.trainable_variables, model["trainable"]),
                (self.model.non_trainable_variables, model["non_trainable"]),
                (self.optimizer.variables, tree["optimizer"])):
            for variable, value in zip(group, values):
                variable.assign(value)
        self._global_step = int(tree["global_step"])
        self._saved_step = self._global_step
        return self._global_step


# ----------------------------------------------------------------------------
# Distribution and input


def _scope(distribution):
    import contextlib

    return distribution.scope() if distribution is not None else (
        contextlib.nullcontext())


def num_data_shards(distribution):
    """How many ways the batch is split (1 without a distribution)."""
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def data_sharding(distribution, ndim, batch_axis):
    """The `jax.sharding.Sharding` of an input array of rank `ndim` whose
    axis `batch_axis` is split over the data-parallel devices."""
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    if distribution is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    spec = [None] * ndim
    spec[batch_axis] = distribution.batch_dim_name
    return NamedSharding(distribution.device_mesh.backend_mesh,
                         PartitionSpec(*spec))


def host_batches(input_fn, epoch, start_step):
    """This process's share of each global batch as tuples of NumPy arrays,
    from `epoch`'s batch `start_step` on.

    Input objects with a `numpy_batches` method feed NumPy directly; the
    others (TFRecords, TFDS) run their `tf.data` pipeline on the host, one
    pipeline per process (TensorFlow needed for those).
    """
    count, index = jax.process_count(), jax.process_index()
    numpy_batches = getattr(input_fn, "numpy_batches", None)
    if numpy_batches is not None:
        batches = numpy_batches(epoch, start_step, count, index)
        if batches is not None:
            return iter(batches)
    try:
        from tpu_scripts.distribute import tensorflow_for_input_only

        tf = tensorflow_for_input_only()
    except ImportError:
        raise run_state.FlagError(
            f"{type(input_fn).__name__} reads its data with tf.data: install "
            "TensorFlow (it runs on the host only), or use in-memory or "
            "synthetic data.") from None
    context = tf.distribute.InputContext(
        num_input_pipelines=count, input_pipeline_id=index,
        num_replicas_in_sync=count)
    dataset = input_fn(context, epoch=epoch, start_step=start_step)
    return iter(dataset.as_numpy_iterator())


def _metric_variables(metrics):
    return [v for m in metrics.values() for v in m.variables]


def _current(scope, variable, old):
    value = scope.get_current_value(variable)
    return old if value is None else value


# ----------------------------------------------------------------------------
# Checkpoints


class _Checkpoints:
    """orbax checkpoints in `<model_dir>/checkpoints/<step>/`, with the
    fallback of the TensorFlow engine: a checkpoint that cannot be read is
    renamed `<step>.damaged-<time>` and the previous one restored."""

    def __init__(self, model_dir, max_to_keep, log):
        self.directory = os.path.join(model_dir, run_state.JAX_CHECKPOINT_DIR)
        self.max_to_keep = max_to_keep
        self._log = log
        self._manager = None

    def _open(self):
        import orbax.checkpoint as ocp

        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory,
                item_handlers=ocp.StandardCheckpointHandler(),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=self.max_to_keep, create=True,
                    enable_async_checkpointing=False,
                    cleanup_tmp_directories=True))
        return self._manager

    def save(self, step, tree):
        import orbax.checkpoint as ocp

        try:
            self._open().save(step, args=ocp.args.StandardSave(tree),
                              force=True)
            self._open().wait_until_finished()
        except Exception as e:  # noqa: BLE001 orbax and tensorstore raise
            # many kinds for a full disk or a refused write.
            raise run_state.FlagError(
                f"Could not write a checkpoint at step {step} to "
                f"{self.directory}: {type(e).__name__}: {first_line(e)}. "
                "The previous "
                "checkpoint is intact; free space (or fix the permissions) "
                "and restart to resume.") from None
        return os.path.join(self.directory, str(step))

    def restore(self, target):
        """`(step, tree)` of the newest readable checkpoint, or `None`."""
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(_abstract, target)
        damaged = []
        for step, path in reversed(run_state.list_jax_checkpoints(
                os.path.dirname(self.directory))):
            self._check_matches(step, path, target)
            try:
                tree = self._open().restore(
                    step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001 truncated, corrupt, ...
                damaged.append(path)
                self._log(f"Cannot read the checkpoint {path}: "
                          f"{first_line(e)}", flush=True)
                continue
            if damaged:
                self._set_aside(damaged)
                self._log(f"Restored {path} (step {step}) instead of the "
                          f"damaged {', '.join(damaged)}.", flush=True)
            else:
                self._log(f"Restored {path} at step {step}.")
            return step, tree
        if damaged:
            raise run_state.DataError(
                f"No checkpoint in {self.directory} can be read "
                f"({', '.join(damaged)}). Restore them from a copy, or move "
                "them away to train from step 0.")
        return None

    def _check_matches(self, step, path, target):
        """Raises `run_state.FlagError` when the checkpoint's arrays are not
        the model's (other flags); a checkpoint whose metadata cannot be
        read is left to the restore (damaged)."""
        try:
            saved = [tuple(m.shape) for m in
                     jax.tree.leaves(self._open().item_metadata(step))]
        except Exception:  # noqa: BLE001 damaged: the restore says so
            return
        wanted = [tuple(np.shape(a)) for a in jax.tree.leaves(target)]
        if saved != wanted:
            raise run_state.FlagError(
                f"The checkpoint {path} does not match the model: it holds "
                f"{len(saved)} arrays, the model and optimizer "
                f"{len(wanted)}"
                + ("" if len(saved) != len(wanted) else ", of other shapes")
                + ". Use the flags it was written with, or a new "
                "--model_dir.")

    def close(self):
        """Waits for and closes orbax's manager (its threads and event
        loop), so that an exit after an error prints nothing more."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def _set_aside(self, paths):
        if jax.process_index() != 0:
            return
        for path in paths:
            fileio.rename(path, f"{path}.damaged-{int(time.time())}")
            self._log(f"Moved the damaged checkpoint {path} aside "
                      f"({os.path.basename(path)}.damaged-*).")
        self._manager = None  # it lists the checkpoints when opened


def _abstract(value):
    sharding = getattr(value, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype
                                if sharding is None else value.dtype,
                                sharding=sharding)


def load_model_weights(model, model_dir):
    """Loads the model weights (not the optimizer state, step or dropout
    seeds) of the newest checkpoint of a JAX-engine `model_dir` into
    `model`, e.g. BERT's phase 2 from phase 1; returns the checkpoint's
    path. Raises `run_state.FlagError` naming `model_dir` when it holds no
    checkpoint or one of another model."""
    import orbax.checkpoint as ocp

    checkpoints = run_state.list_jax_checkpoints(model_dir)
    if not checkpoints:
        raise run_state.FlagError(
            f"--init_checkpoint={model_dir}: no checkpoint of the JAX engine "
            f"there (expected {model_dir}/{run_state.JAX_CHECKPOINT_DIR}/"
            "<step>/).")
    _, path = checkpoints[-1]
    item = os.path.join(path, "default")
    checkpointer = ocp.StandardCheckpointer()
    saved = checkpointer.metadata(item).item_metadata.tree
    wanted = [v for v in model.trainable_variables]
    shapes = [tuple(m.shape) for m in saved["model"]["trainable"]]
    if shapes != [tuple(v.shape) for v in wanted]:
        raise run_state.FlagError(
            f"--init_checkpoint={model_dir}: its model ({len(shapes)} "
            f"trainable arrays) is not this one ({len(wanted)}). Use the "
            "same --bert_config.")
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
    target["model"]["trainable"] = [
        jax.ShapeDtypeStruct(v.shape, v.value.dtype,
                             sharding=v.value.sharding) for v in wanted]
    # Everything else is read onto this process's first device, then left.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for key in ("optimizer",):
        target[key] = [jax.ShapeDtypeStruct(t.shape, t.dtype,
                                            sharding=device)
                       for t in target[key]]
    target["model"]["non_trainable"] = [
        jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=device)
        for t in target["model"]["non_trainable"]]
    target["global_step"] = jax.ShapeDtypeStruct(
        (), target["global_step"].dtype, sharding=device)
    tree = checkpointer.restore(item, target)
    for variable, value in zip(wanted, tree["model"]["trainable"]):
        variable.assign(value)
    return path
