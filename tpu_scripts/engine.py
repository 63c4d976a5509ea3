"""The training loop both engines share: loops of steps, evaluations,
checkpoints, preemption, divergence, progress lines and summaries.

`Engine` is the part of a trainer that does not depend on how a step runs.
Its two subclasses are siblings:

- `tpu_scripts.trainer.Trainer`: TensorFlow, every `tf.distribute` strategy
  (TPUStrategy, MirroredStrategy, MultiWorkerMirroredStrategy);
- `tpu_scripts.jax_trainer.JaxTrainer`: JAX, `keras.distribution`
  (data parallel over all devices of every host).

A subclass builds the model, optimizer and metrics and provides the hooks
below; the loop, the order of saves and evaluations, the SIGTERM handling
and the results dict are the same for both.

Hooks: `restore()`, `save()`, `evaluate(eval_input)`, `current_step()`,
`_train_iterator(train_input, epoch, step_in_epoch)`,
`_run_steps(iterator, num_steps)`, `_sync_replica_statistics()`,
`_all_agree(flag)`, `_translate_error(error)` and, optionally,
`_preemption_handler()`.
"""

import math
import os
import re
import signal
import sys
import threading
import time

import keras

from keras_lamb.layerwise import STAT_NAMES
from tpu_scripts import run_state
from tpu_scripts.summaries import NullWriter, create_writer


def inner_optimizer(optimizer):
    """The optimizer inside a `LossScaleOptimizer` (or itself)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def first_line(error):
    """The first line of an error's message (TensorFlow's carry a
    traceback of graph ops after it)."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text).strip()
    return text.splitlines()[0] if text else repr(error)


def _write_errors():
    """The exception types of a failed write (a full disk)."""
    tf = sys.modules.get("tensorflow")
    return (OSError,) + ((tf.errors.OpError,) if tf is not None else ())


class Engine:
    """The shared loop; see the module docstring. A subclass's `__init__`
    calls `_init_common(...)`, `_build(optimizer_fn)` inside its scope and
    `_open_writers()`, sets `checkpoint_manager` (anything not `None` when
    checkpoints are written), then calls `_init_loop_state()`."""

    def _init_common(self, task, global_batch_size, num_replicas,
                     gradient_accumulation_steps, steps_per_loop, model_dir,
                     unit, is_chief, log):
        """Checks and stores what both engines take alike."""
        from tpu_scripts import distribute

        if steps_per_loop < 1:
            raise ValueError(
                f"steps_per_loop must be >= 1. Received: {steps_per_loop}.")
        per_replica = distribute.per_replica_batch_size(
            global_batch_size, num_replicas)
        k = gradient_accumulation_steps
        if not isinstance(k, int) or k < 1 or per_replica % k:
            raise ValueError(
                "gradient_accumulation_steps must be an integer >= 1 that "
                f"divides the per-replica batch ({global_batch_size} / "
                f"{num_replicas} replicas = {per_replica}). Received: "
                f"gradient_accumulation_steps={k!r}.")
        self.task = task
        self.global_batch_size = global_batch_size
        self.per_replica_batch_size = per_replica
        self.gradient_accumulation_steps = k
        self.steps_per_loop = steps_per_loop
        self.model_dir = model_dir
        self.unit = unit
        self.is_chief = is_chief
        self._log = log if is_chief else (lambda *a, **k: None)

    def _build(self, optimizer_fn):
        """Builds the task's model, the optimizer (with its slots, so that
        nothing is restored lazily) and the metrics; call it inside the
        engine's strategy or distribution scope."""
        self.model = self.task.build_model()
        self.optimizer = optimizer_fn()
        own = inner_optimizer(self.optimizer).gradient_accumulation_steps
        if own:
            raise ValueError(
                f"The optimizer accumulates gradients itself "
                f"(`gradient_accumulation_steps={own}`); pass "
                "`gradient_accumulation_steps` to the trainer instead, which "
                "sums the micro-batches' gradients and applies them once "
                "per update.")
        self.optimizer.build(self.model.trainable_variables)
        self.train_metrics = {
            "loss": keras.metrics.Mean("loss"), **self.task.build_metrics()}
        self.eval_metrics = {
            "loss": keras.metrics.Mean("loss"), **self.task.build_metrics()}

    def _open_writers(self):
        """TensorBoard writers for `model_dir`/train and /eval (chief only;
        nothing without a `model_dir`)."""
        self._train_writer = self._eval_writer = NullWriter()
        if self.model_dir and self.is_chief:
            self._train_writer = create_writer(
                os.path.join(self.model_dir, "train"), self._log)
            self._eval_writer = create_writer(
                os.path.join(self.model_dir, "eval"), self._log)

    def _init_loop_state(self):
        self._last_save = self._segment_start = time.time()
        self._on_checkpoint = lambda *a: None
        self._saved_step = None
        self._last_train_results = {}
        self._record = None
        self._summaries_off = False

    # ----------------------------------------------------- shared helpers

    def _checkpointed(self, now):
        self._last_save = now
        self._saved_step = self.current_step()
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

    def _trust_ratio_scalars(self):
        inner = inner_optimizer(self.optimizer)
        if not getattr(inner, "track_trust_ratios", False):
            return {}
        scalars = {}
        for path, values in inner.trust_ratio_stats().items():
            for stat in STAT_NAMES:  # not `adapted`, a flag
                if math.isfinite(values[stat]):  # NaN: not updated yet
                    scalars[f"{stat}/{path}"] = values[stat]
        return scalars

    def _preemption_handler(self):
        """A TensorFlow `PreemptionCheckpointHandler`, or `None` (SIGTERM
        is watched by the loop itself)."""
        return None

    def _translate_error(self, error):
        """An exception to raise instead of `error`, or `None`."""
        return None

    # ------------------------------------------------------------ the loop

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
                this long after the last save (0: never by time). With
                several workers they agree on it.
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
            return self._train_and_report(
                train_input, train_steps, eval_input, eval_every_steps,
                checkpoint_every_steps, checkpoint_every_seconds,
                on_checkpoint, stop_fn, record)
        except BaseException:
            # The process may be about to exit with one error line: close
            # the event files (on a full disk, quietly) and the checkpoint
            # writer now.
            for writer in (self._train_writer, self._eval_writer,
                           self.checkpoint_manager):
                try:
                    getattr(writer, "close", lambda: None)()
                except _write_errors():
                    pass
            raise

    def _train_and_report(self, train_input, train_steps, eval_input,
                          eval_every_steps, checkpoint_every_steps,
                          checkpoint_every_seconds, on_checkpoint, stop_fn,
                          record):
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
        except Exception as e:  # noqa: BLE001 translated or re-raised
            error = self._translate_error(e)
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
                iterator = self._train_iterator(train_input, epoch,
                                                step_in_epoch)
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

    def _run_loop(self, iterator, step, stop, train_steps, steps_per_epoch):
        """Runs steps `step..stop`, logs and writes summaries; returns the
        loop's metrics and its seconds."""
        for m in self.train_metrics.values():
            m.reset_state()
        loop_start = time.time()
        self._run_steps(iterator, stop - step)
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
        self._train_writer.write({
            **train_results, "learning_rate": learning_rate,
            f"{self.unit}_per_second": images_per_second,
            **self._trust_ratio_scalars(),
        }, stop)

    def _evaluate_and_log(self, eval_input, step):
        results = self.evaluate(eval_input)
        self._log(
            f"eval at step {step}: "
            + " ".join(f"{k} {v:.4f}" for k, v in results.items()),
            flush=True,
        )
        self._summaries(self._eval_writer.write, results, step)
        return results

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
        except _write_errors() as e:
            self._summaries_off = True
            self._log(f"TensorBoard summaries stopped: writing to "
                      f"{self.model_dir} failed ({first_line(e)}). "
                      "Training goes on.", flush=True)



class _HandlerExit(Exception):
    """Raised by PreemptionCheckpointHandler's exit function."""


class _PreemptionWatcher:
    """Saves a checkpoint and stops the run on SIGTERM (a context manager
    around the training loop).

    Where the engine gives a handler (`_preemption_handler`: TensorFlow's
    `PreemptionCheckpointHandler` under `MultiWorkerMirroredStrategy`), the
    handler watches and agrees with the other workers on the step at which
    all of them save. Otherwise a SIGTERM handler sets a flag, and at the
    next loop boundary the trainer saves. Either way `stop_if_preempted`
    then raises `run_state.Preempted`. Nothing is watched without a
    `model_dir` or outside the main thread.
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
        self.handler = trainer._preemption_handler()
        if self.handler is None:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    @staticmethod
    def handler_exit():
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
        # With several processes (JAX on a pod's hosts) a save is a
        # collective: all stop at the same step if any was signalled.
        if trainer._all_agree(self.signalled):
            if trainer._saved_step != step:
                trainer.save()
            self._stop(step)

    def _stop(self, step):
        self.trainer._log(f"Preempted: saved a checkpoint at step {step}; "
                          "a restart continues from it.", flush=True)
        raise run_state.Preempted(step)
