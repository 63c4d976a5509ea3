"""What makes a run in a `--model_dir` safe to restart, rerun and preempt.

- Atomic writes (`write_text`, `write_json`): a temporary file in the same
  directory, then a rename, through `tf.io.gfile` (local paths, `gs://`,
  `ram://`), so a reader never sees half a `results.json`, table or manifest.
- A run's identity (`RunRecord`): the flags that shape the run are written to
  `run_identity.json` at the first start. A restart with other values is
  refused with the list of differences (`--allow_changed_flags` overrides
  it); a restart of a finished run leaves its `results.json` as it is.
- Segments: each start of the run is a segment; its steps and training time
  are recorded in `run_progress.json` at every checkpoint, and the final
  `results.json` sums them over all segments.
- Preemption: `Preempted`, the exit of a run stopped by SIGTERM after it saved
  its checkpoint (see `Trainer.train`).
"""

import json
import os
import time
import uuid

import tensorflow as tf

IDENTITY_FILENAME = "run_identity.json"
PROGRESS_FILENAME = "run_progress.json"
# A preempted run exits as a process killed by SIGTERM does (128 + 15):
# schedulers restart it, and the restart resumes from its checkpoint.
PREEMPTED_EXIT_CODE = 143


class Preempted(SystemExit):
    """Raised when a run saved a checkpoint on SIGTERM and stopped.

    A `SystemExit` with code `PREEMPTED_EXIT_CODE`: under `absl.app.run` the
    process exits with that code; callers in Python can catch it.
    """

    def __init__(self, step):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class FlagError(ValueError):
    """A flag value the run cannot start with (the scripts print the
    message and exit with status 1, without a traceback)."""


class ChangedFlagsError(FlagError):
    """A restart whose flags differ from the run's identity."""


class DataError(FlagError):
    """Input data the run cannot use: a missing, truncated or corrupt file,
    or a record count that differs from the one declared. The message names
    the file (and the record where it is known); the scripts print it as one
    `Error:` line and exit with status 1."""


class Diverged(RuntimeError):
    """The training loss or the weights became non-finite.

    Attributes:
        step: the global step at which it was detected.
        detail: what was non-finite (e.g. `loss nan`).
    """

    def __init__(self, step, detail):
        super().__init__(
            f"training diverged at step {step}: {detail}. The run stopped; "
            "its checkpoints up to the last finite one are kept. Lower the "
            "learning rate (or check the data) and start a new --model_dir."
        )
        self.step = step
        self.detail = detail


def run_script(run, argv):
    """The body of a script's absl `main`: no stray arguments, quiet absl
    logging, then `run(FLAGS)` with a `FlagError` exiting cleanly."""
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    return exit_on_flag_error(run, flags.FLAGS)


def exit_on_flag_error(fn, *args, **kwargs):
    """Calls `fn`; a `FlagError` (bad flag or data) or `Diverged` exits with
    one `Error: ...` line (status 1) and no traceback."""
    try:
        return fn(*args, **kwargs)
    except (FlagError, Diverged) as e:
        raise SystemExit(f"Error: {e}") from None


# ----------------------------------------------------------------------------
# Atomic writes


def write_text(path, text, mode="w"):
    """Writes `text` (or bytes with `mode="wb"`) to `path` atomically."""
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    temp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with tf.io.gfile.GFile(temp, mode) as f:
            f.write(text)
        tf.io.gfile.rename(temp, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(temp):
            tf.io.gfile.remove(temp)
        raise


def write_json(path, value):
    write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def read_json(path):
    """The JSON value in `path`, or `None` if there is no such file."""
    if not path or not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------
# Checkpoints and paths


def checkpoint_step(model_dir):
    """The global step of the latest checkpoint in `model_dir` (`None`:
    no checkpoint)."""
    latest = model_dir and tf.train.latest_checkpoint(model_dir)
    if not latest:
        return None
    # (tf.train.load_checkpoint takes a prefix on ram:// for a directory.)
    reader = tf.compat.v1.train.NewCheckpointReader(latest)
    return int(reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE"))


def same_directory(a, b):
    """Whether paths `a` and `b` name the same directory (local paths are
    made absolute; `gs://` paths are compared as written)."""
    def norm(path):
        path = path.rstrip("/")
        return path if "://" in path else os.path.abspath(path)

    return norm(a) == norm(b)


def check_init_checkpoint(init_checkpoint, model_dir):
    """Raises unless `--init_checkpoint` lies outside `--model_dir`.

    A run initialised from its own directory would resume from (and then
    overwrite) the run it was meant to start from.
    """
    if not init_checkpoint or not model_dir:
        return
    if same_directory(init_checkpoint, model_dir) or same_directory(
            os.path.dirname(init_checkpoint.rstrip("/")), model_dir):
        raise FlagError(
            f"--init_checkpoint={init_checkpoint} is in --model_dir="
            f"{model_dir}: a new run needs its own --model_dir (phase 1's "
            "checkpoints, results.json and logs would be overwritten)."
        )


# ----------------------------------------------------------------------------
# Identity and segments


def flag_differences(saved, current):
    """`--name: was X, now Y` lines for every flag whose value differs."""
    lines = []
    for name in sorted(set(saved) | set(current)):
        if name not in current or name not in saved:
            continue  # a flag added or removed by a new version
        if _normalise(saved[name]) != _normalise(current[name]):
            lines.append(f"--{name}: was {saved[name]!r}, now "
                         f"{current[name]!r}")
    return lines


def _normalise(value):
    return json.loads(json.dumps(value, default=str))


class RunRecord:
    """The identity, segments and results of one run in `model_dir`.

    Args:
        model_dir: the run's directory (`None`: no identity, no segments;
            results are still written to `results_path`).
        identity: `{flag: value}` of every flag that shapes the run.
        results_path: where `results.json` goes (`None`: nowhere).
        allow_changed_flags: restart even if `identity` differs from the
            saved one (the saved identity is then replaced and the change
            recorded).
        is_chief: only the chief writes files.
        log: a `print`-like function.
    """

    def __init__(self, model_dir, identity, results_path,
                 allow_changed_flags=False, is_chief=True, log=print):
        self.model_dir = model_dir
        self.identity = _normalise(identity)
        self.results_path = results_path
        self.allow_changed_flags = allow_changed_flags
        self.is_chief = is_chief
        self.log = log
        self.segments = []
        self._segment = None
        self._started = time.time()

    def _path(self, name):
        return os.path.join(self.model_dir, name)

    def start(self):
        """Checks the identity; returns the saved results of a finished run
        (then nothing should be trained or written) or `None`."""
        if not self.model_dir:
            return None
        step = checkpoint_step(self.model_dir)
        saved = read_json(self._path(IDENTITY_FILENAME))
        changes = []
        if saved is not None and step is not None:
            changes = flag_differences(saved["flags"], self.identity)
        if changes and not self.allow_changed_flags:
            raise ChangedFlagsError(
                f"--model_dir={self.model_dir} holds a run (checkpoint at "
                f"step {step}) started with other flags:\n  "
                + "\n  ".join(changes)
                + "\nRestart it with its own flags, use a new --model_dir, "
                "or pass --allow_changed_flags to continue it with the new "
                "values."
            )
        results = read_json(self.results_path)
        if (not changes and results is not None and results.get("complete")
                and step is not None and results.get("final_step") == step):
            self.log(
                f"The run in {self.model_dir} is complete (step {step}); "
                f"its results in {self.results_path} are left as they are. "
                "Use a new --model_dir to train again."
            )
            return results
        progress = read_json(self._path(PROGRESS_FILENAME)) or {}
        # Segments past the checkpoint resumed from (deleted checkpoints)
        # did not happen as far as the weights are concerned.
        self.segments = [s for s in progress.get("segments", [])
                         if step is not None and s["start_step"] <= step]
        if self.is_chief:
            history = (saved or {}).get("changes", [])
            if changes:
                self.log("Continuing with changed flags "
                         "(--allow_changed_flags):\n  " + "\n  ".join(changes))
                history = history + [dict(at_step=step, changes=changes)]
            if saved is None or changes or step is None:
                write_json(self._path(IDENTITY_FILENAME),
                           dict(flags=self.identity, changes=history))
        self.begin_segment(step or 0)  # the trainer resumes from `step`
        return None

    def begin_segment(self, start_step):
        self._segment = dict(start_step=start_step, end_step=start_step,
                             train_seconds=0.0,
                             started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.segments.append(self._segment)

    def checkpointed(self, step, train_seconds):
        """Records the segment's progress at a checkpoint (the trainer's
        `on_checkpoint`)."""
        if self._segment is None:  # no model_dir: start() began none
            self.begin_segment(0)
        self._segment.update(end_step=step, train_seconds=train_seconds)
        if self.model_dir and self.is_chief:
            write_json(self._path(PROGRESS_FILENAME),
                       dict(segments=self.segments))

    def totals(self, examples_per_step):
        """Steps run, training seconds and examples/s over all segments."""
        steps = sum(s["end_step"] - s["start_step"] for s in self.segments)
        seconds = sum(s["train_seconds"] for s in self.segments)
        return dict(
            segments=len(self.segments),
            train_seconds=seconds,
            examples_per_second=(steps * examples_per_step / seconds
                                 if seconds > 0 else 0.0),
        )

    def finish(self, results, final_step):
        """Writes `results` (with `complete`, `final_step` and the segments)
        atomically to `results_path`; returns them."""
        results = dict(results, complete=True, final_step=final_step,
                       segments=self.segments)
        if self.is_chief and self.results_path:
            write_json(self.results_path, results)
            self.log(f"Wrote {self.results_path}.")
        return results
