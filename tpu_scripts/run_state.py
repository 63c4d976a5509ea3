"""What makes a run in a `--model_dir` safe to restart, rerun and preempt.

- Atomic writes (`write_text`, `write_json`): a temporary file in the same
  directory, then a rename, through `tpu_scripts.fileio` (local paths, `gs://`,
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

import atexit
import errno
import json
import os
import re
import socket
import sys
import threading
import time
import uuid

from tpu_scripts import fileio

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
    except Exception as e:  # noqa: BLE001 (a full disk anywhere)
        if not _is_disk_full(e):
            raise
        raise SystemExit(f"Error: the disk is full ({_message(e)}). Files "
                         "written before are intact; free space and restart "
                         "to resume.") from None


def _message(error):
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else repr(error)


def _is_disk_full(error):
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(error, tf.errors.OpError) and (
        "No space left on device" in str(error))


# ----------------------------------------------------------------------------
# Atomic writes


def write_text(path, text, mode="w"):
    """Writes `text` (or bytes with `mode="wb"`) to `path` atomically."""
    directory = os.path.dirname(path)
    if directory:
        fileio.makedirs(directory)
    temp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fileio.GFile(temp, mode) as f:
            f.write(text)
        fileio.rename(temp, path, overwrite=True)
    except BaseException:
        if fileio.exists(temp):
            fileio.remove(temp)
        raise


def write_json(path, value):
    write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def read_json(path):
    """The JSON value in `path`, or `None` if there is no such file.

    Raises `DataError` naming the file if it is not valid JSON (a file cut
    short by a full disk or edited by hand).
    """
    if not path or not fileio.exists(path):
        return None
    with fileio.GFile(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError as e:
        raise DataError(
            f"{path} is not valid JSON ({e}; {len(text)} bytes). Restore or "
            "delete the file."
        ) from None


def check_model_dir(model_dir):
    """Raises `FlagError` if `--model_dir` names something that is not a
    directory."""
    if model_dir and fileio.exists(model_dir) and not (
            fileio.isdir(model_dir)):
        raise FlagError(f"--model_dir={model_dir} is a file, not a "
                        "directory.")


# ----------------------------------------------------------------------------
# Checkpoints: found from their files, not only from the `checkpoint` index.

CHECKPOINT_PREFIX = "ckpt"
_CHECKPOINT_INDEX = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)\.index$")


def list_checkpoints(model_dir):
    """`[(number, prefix)]` of the checkpoints in `model_dir`, oldest first,
    found from their `ckpt-N.index` files (a missing or damaged `checkpoint`
    index file hides none of them). `N` is the global step."""
    if not model_dir or not fileio.isdir(model_dir):
        return []
    found = []
    for name in fileio.listdir(model_dir):
        match = _CHECKPOINT_INDEX.match(name.rstrip("/"))
        if match:
            found.append((int(match.group(1)),
                          os.path.join(model_dir, name[:-len(".index")])))
    return sorted(found)


# The JAX engine's (orbax) checkpoints: `<model_dir>/checkpoints/<step>/`.
JAX_CHECKPOINT_DIR = "checkpoints"


def list_jax_checkpoints(model_dir):
    """`[(step, path)]` of the JAX engine's committed checkpoints in
    `model_dir`, oldest first (orbax's temporaries and checkpoints set
    aside as damaged are not listed)."""
    directory = os.path.join(model_dir, JAX_CHECKPOINT_DIR) if model_dir \
        else None
    if not directory or not fileio.isdir(directory):
        return []
    found = [(int(name), os.path.join(directory, name))
             for name in fileio.listdir(directory) if name.isdigit()]
    if "://" in directory:  # no atomic rename: orbax marks a finished save
        found = [(step, path) for step, path in found if fileio.exists(
            os.path.join(path, "commit_success.txt"))]
    return sorted(found)


def checkpoint_step(model_dir):
    """The global step of the newest checkpoint in `model_dir` (`None`: no
    checkpoint), of either engine. Read from the files' names, so that a
    run whose index is lost or whose newest checkpoint is damaged is still
    seen as a run."""
    checkpoints = list_checkpoints(model_dir) + list_jax_checkpoints(model_dir)
    return max(number for number, _ in checkpoints) if checkpoints else None


def set_aside(prefix, log=print):
    """Renames the files of a damaged checkpoint `prefix` to
    `prefix.damaged-*`, so that no later start tries it again and nothing
    is deleted."""
    directory, base = os.path.split(prefix)
    for name in fileio.listdir(directory):
        if name == base + ".index" or name.startswith(base + ".data-"):
            old = os.path.join(directory, name)
            fileio.rename(old, old.replace(
                base, f"{base}.damaged-{int(time.time())}", 1),
                overwrite=True)
    log(f"Moved the damaged checkpoint {prefix} aside "
        f"({base}.damaged-*).")


def remove_stale_temporaries(model_dir, log=print):
    """Deletes what killed runs left in `model_dir`: this module's
    `*.tmp-PID-*` files, TensorFlow's `ckpt-N_temp/` folders and
    `checkpoint.tmp*` index files. Call it only while holding the run's lock
    (no other process writes there)."""
    if not model_dir or not fileio.isdir(model_dir):
        return []
    removed = []
    for name in fileio.listdir(model_dir):
        name = name.rstrip("/")
        path = os.path.join(model_dir, name)
        if _TEMPORARY.search(name):
            if fileio.isdir(path):
                fileio.rmtree(path)
            else:
                fileio.remove(path)
            removed.append(name)
    if removed:
        log(f"Removed {len(removed)} temporary file(s) left by an "
            f"interrupted run: {', '.join(sorted(removed)[:5])}"
            + (" ..." if len(removed) > 5 else ""))
    return removed


_TEMPORARY = re.compile(
    r"(\.tmp-\d+-[0-9a-f]{8}$)"                   # write_text
    rf"|(^{CHECKPOINT_PREFIX}-\d+_temp$)"          # TF checkpoint staging
    r"|(^checkpoint\.tmp[0-9a-f]+$)"               # TF's index, atomic
)


# ----------------------------------------------------------------------------
# The run's lock: one process owns a --model_dir.

LOCK_FILENAME = "run.lock"


class LockedError(FlagError):
    """Another process holds the `--model_dir`."""


def _process_start_time(pid):
    """The start time of process `pid` in clock ticks since boot (Linux),
    or `None` where it cannot be read; with the PID it names one process
    even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_alive(pid, start_time):
    if start_time is not None and os.path.exists("/proc/self/stat"):
        return _process_start_time(pid) == start_time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """A lease on `model_dir`: the file `run.lock` holds the owner's host,
    PID, process start time, a random token and a heartbeat time, rewritten
    every `heartbeat_seconds` by a daemon thread.

    Taking it is atomic: an exclusive create on local disks (`O_EXCL`), a
    generation precondition (`if_generation_match=0`) on gs:// when the
    google-cloud-storage client is installed, and elsewhere (gs:// without
    it, other filesystems) a rename that refuses to overwrite followed by
    a read-back of the token.

    A lock is stale, and is taken over with a message naming the old
    holder, when
      - its holder ran on this host and that process is gone (a `kill -9`,
        a crash, a reboot: a restart on the same machine resumes at once);
      - its holder ran on another host and its heartbeat is older than
        `stale_seconds` (default 5 minutes: a restart on a new machine
        after a crash waits at most that long);
      - its holder is this very process (a second `run()` in one Python
        process, as tests do).
    Otherwise `acquire` raises `LockedError` naming the holder.
    """

    def __init__(self, model_dir, heartbeat_seconds=60.0, stale_seconds=300.0,
                 log=print, filename=LOCK_FILENAME, flag="--model_dir"):
        self.path = os.path.join(model_dir, filename)
        self.flag = flag
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        self.log = log
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread = None
        self._held = False

    def _content(self):
        return json.dumps(dict(
            host=socket.gethostname(), pid=os.getpid(),
            process_start=_process_start_time(os.getpid()),
            token=self.token, heartbeat=time.time(),
            started=getattr(self, "_started", None) or time.time(),
        )) + "\n"

    def _describe(self, holder):
        age = time.time() - float(holder.get("heartbeat", 0))
        return (f"host {holder.get('host')!r}, PID {holder.get('pid')}, "
                f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('started') or 0)))}, "
                f"last heartbeat {age:.0f} s ago")

    def _read(self):
        try:
            with fileio.GFile(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {}  # half-written by a crash during takeover: stale

    def _stale_reason(self, holder):
        if not holder:
            return "unreadable lock file"
        if holder.get("host") == socket.gethostname():
            if holder.get("pid") == os.getpid() and holder.get(
                    "process_start") == _process_start_time(os.getpid()):
                return "held by this process"
            if not _process_alive(holder.get("pid", -1),
                                  holder.get("process_start")):
                return "its process is gone"
            return None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_seconds:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self):
        """Takes the lock (or a stale one); raises `LockedError`."""
        fileio.makedirs(os.path.dirname(self.path))
        self._started = time.time()
        for _ in range(3):
            if _exclusive_create(self.path, self._content(), self.token):
                self._held = True
                self._start_heartbeat()
                return self
            holder = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            reason = self._stale_reason(holder)
            if reason is None:
                raise LockedError(
                    f"{self.flag}={os.path.dirname(self.path)} is in use by "
                    f"another run ({self._describe(holder)}; lock file "
                    f"{self.path}). Wait for it to end, or use another "
                    f"{self.flag}. A lock whose holder is gone is taken over "
                    f"by itself (on another host after {self.stale_seconds:.0f} "
                    "s without heartbeat); delete the file only if you are "
                    "sure no run uses the directory."
                )
            if reason != "held by this process":
                self.log(f"Taking over the lock of a stopped run ({reason}: "
                         f"{self._describe(holder) if holder else self.path}).")
            _remove_if_unchanged(self.path, holder)
        raise LockedError(f"Could not take the lock {self.path}: other "
                          "processes keep taking it.")

    def _start_heartbeat(self):
        if self.heartbeat_seconds <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name="run-lock-heartbeat")
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                holder = self._read()
                if not holder or holder.get("token") != self.token:
                    self.lost = True
                    self.log(f"Lost the lock {self.path} to another run "
                             f"({self._describe(holder) if holder else 'deleted'}).")
                    return
                write_text(self.path, self._content())
            except Exception as e:  # a flaky filesystem: try again later
                self.log(f"Could not renew the lock {self.path}: {e}")

    def check(self):
        """Raises `LockedError` if the heartbeat found another owner."""
        if self.lost:
            raise LockedError(
                f"Another run took over {self.path}; this run stops so that "
                f"the two do not write the same {self.flag}.")

    def release(self):
        """Stops the heartbeat and deletes the lock file if still ours."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder and holder.get("token") == self.token:
            try:
                fileio.remove(self.path)
            except FileNotFoundError:
                pass


def _exclusive_create(path, text, token):
    """Creates `path` with `text` unless it exists; True if this call did."""
    if "://" not in path:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True
    if path.startswith("gs://"):
        created = _gcs_create_if_absent(path, text)
        if created is not None:
            return created
    # No atomic primitive: a rename that refuses to overwrite, then a read
    # back of the token (a racing writer that renamed last wins, and the
    # loser sees another token).
    # (Not `path` + suffix: TF's ram:// filesystem takes a file whose name
    # starts with `path` for `path` itself.)
    temp = os.path.join(os.path.dirname(path), f"lock-candidate.tmp-"
                        f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with fileio.GFile(temp, "w") as f:
        f.write(text)
    try:
        fileio.rename(temp, path, overwrite=False)
    except OSError:
        if fileio.exists(temp):
            fileio.remove(temp)
        return False
    with fileio.GFile(path) as f:
        return token in f.read()


def _gcs_create_if_absent(path, text):
    """gs:// with a generation precondition: True/False, or `None` when
    the google-cloud-storage client is not installed."""
    try:
        from google.api_core import exceptions
        from google.cloud import storage
    except ImportError:
        return None
    bucket, _, name = path[len("gs://"):].partition("/")
    blob = storage.Client().bucket(bucket).blob(name)
    try:
        blob.upload_from_string(text, if_generation_match=0)
    except exceptions.PreconditionFailed:
        return False
    return True


def _remove_if_unchanged(path, holder):
    """Removes a stale lock file, unless another process replaced it since
    it was read (then the next attempt reads the new holder)."""
    current = None
    try:
        with fileio.GFile(path) as f:
            current = f.read()
    except FileNotFoundError:
        return
    try:
        still = json.loads(current) == holder
    except ValueError:
        still = holder == {}
    if still:
        try:
            fileio.remove(path)
        except FileNotFoundError:
            pass


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
    """The lock, identity, plan, segments and results of one run in
    `model_dir`.

    Args:
        model_dir: the run's directory (`None`: no lock, identity or
            segments; results are still written to `results_path`).
        identity: `{flag: value}` of every flag that shapes the run.
        results_path: where `results.json` goes (`None`: nowhere).
        allow_changed_flags: restart even if `identity` (or the plan) differs
            from the saved one (the saved identity is then replaced and the
            change recorded). A finished run is never reopened by it unless
            the new flags train past its last step.
        is_chief: only the chief locks the directory and writes files.
        log: a `print`-like function.
        lock_heartbeat_seconds, lock_stale_seconds: see `RunLock`.
    """

    # Progress is written at every checkpoint and at most this often at
    # loop boundaries, so that a killed segment keeps most of its time.
    PROGRESS_EVERY_SECONDS = 30.0

    def __init__(self, model_dir, identity, results_path,
                 allow_changed_flags=False, is_chief=True, log=print,
                 lock_heartbeat_seconds=60.0, lock_stale_seconds=300.0):
        self.model_dir = model_dir
        self.identity = _normalise(identity)
        self.results_path = results_path
        self.allow_changed_flags = allow_changed_flags
        self.is_chief = is_chief
        self.log = log
        self.segments = []
        self.lock = None
        self._lock_args = (lock_heartbeat_seconds, lock_stale_seconds)
        self._segment = None
        self._saved = None
        self._history = []
        self._step = None
        self._complete = None
        self._identity_pending = False
        self._pending_plan = None
        self._last_progress = 0.0
        self._last_train = None

    def _path(self, name):
        return os.path.join(self.model_dir, name)

    def start(self):
        """Locks the directory, removes what killed runs left, checks the
        identity; returns the saved results of a finished run (then nothing
        should be trained or written) or `None`."""
        if not self.model_dir:
            return None
        check_model_dir(self.model_dir)
        if self.is_chief:
            self.lock = RunLock(self.model_dir, *self._lock_args,
                                log=self.log).acquire()
            atexit.register(self.lock.release)
            remove_stale_temporaries(self.model_dir, self.log)
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self):
        step = self._step = checkpoint_step(self.model_dir)
        saved = self._saved = read_json(self._path(IDENTITY_FILENAME))
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
        if (results is not None and results.get("complete")
                and step is not None and results.get("final_step") == step):
            if not changes:
                self.log(
                    f"The run in {self.model_dir} is complete (step {step}); "
                    f"its results in {self.results_path} are left as they "
                    "are. Use a new --model_dir to train again."
                )
                self.close()
                return results
            # --allow_changed_flags: continue only if the new flags train
            # past the last step (see `finish`).
            self._complete = results
        progress = read_json(self._path(PROGRESS_FILENAME)) or {}
        # Every segment is kept, those past the checkpoint resumed from
        # too: their time was spent (the totals count it).
        self.segments = list(progress.get("segments", []))
        last = progress.get("last_train")
        if last and step is not None and last.get("step") == step:
            self._last_train = last
        self._history = (saved or {}).get("changes", [])
        if changes:
            self.log("Continuing with changed flags "
                     "(--allow_changed_flags):\n  " + "\n  ".join(changes))
            self._history = self._history + [
                dict(at_step=step, changes=changes)]
        if saved is None or changes or step is None:
            self._identity_pending = True
            if self._complete is None:
                self._write_identity()
        self.begin_segment(step or 0)  # the trainer resumes from `step`
        return None

    def _write_identity(self, plan=None):
        if self.is_chief and self.model_dir:
            saved_plan = plan if plan is not None else (
                (self._saved or {}).get("plan") if self._step is not None
                else None)
            value = dict(flags=self.identity, changes=self._history)
            if saved_plan is not None:
                value["plan"] = saved_plan
            write_json(self._path(IDENTITY_FILENAME), value)
            self._saved = value
        self._identity_pending = False

    def check_plan(self, plan):
        """Compares the resolved plan (the numbers the run trains with:
        schedule, optimizer, batch, data) with the one saved at the first
        start; raises `ChangedFlagsError` for a difference, even where every
        flag kept its value (a flag set to its default that the recipe
        had set otherwise). Saves the plan at the first start."""
        if not self.model_dir:
            return
        plan = _normalise(plan)
        saved = (self._saved or {}).get("plan")
        if saved is not None and self._step is not None:
            changes = [line.replace("--", "plan ", 1)
                       for line in flag_differences(saved, plan)]
            if changes and not self.allow_changed_flags:
                raise ChangedFlagsError(
                    f"--model_dir={self.model_dir} holds a run (checkpoint "
                    f"at step {self._step}) whose resolved plan differs "
                    "from the one these flags give:\n  "
                    + "\n  ".join(changes)
                    + "\nRestart it with its own flags, use a new "
                    "--model_dir, or pass --allow_changed_flags to continue "
                    "it with the new plan."
                )
            if changes:
                self.log("Continuing with a changed plan "
                         "(--allow_changed_flags):\n  "
                         + "\n  ".join(changes))
                self._history = self._history + [
                    dict(at_step=self._step, changes=changes)]
                self._identity_pending = True
        if saved is None or self._identity_pending or saved != plan:
            if self._complete is None:
                self._write_identity(plan)
            else:
                self._pending_plan = plan

    def begin_segment(self, start_step):
        self._segment = dict(start_step=start_step, end_step=start_step,
                             steps_run=0, train_seconds=0.0,
                             started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.segments.append(self._segment)

    def _check_lock(self):
        if self.lock is not None:
            self.lock.check()

    def loop_finished(self, step, train_seconds):
        """Records the segment's steps and time at a loop boundary (at most
        every `PROGRESS_EVERY_SECONDS`), so that a killed segment still
        counts the time it spent; stops the run if its lock was lost."""
        self._check_lock()
        if self._segment is None:
            self.begin_segment(0)
        self._segment.update(
            steps_run=step - self._segment["start_step"],
            train_seconds=train_seconds)
        now = time.time()
        if now - self._last_progress >= self.PROGRESS_EVERY_SECONDS:
            self._write_progress()

    def checkpointed(self, step, train_seconds, train_metrics=None):
        """Records the segment's progress at a checkpoint (the trainer's
        `on_checkpoint`), with the last loop's training metrics."""
        self._check_lock()
        if self._segment is None:  # no model_dir: start() began none
            self.begin_segment(0)
        if self._identity_pending and self._complete is not None:
            # A finished run continued with changed flags: it now trains.
            self._complete = None
            self._write_identity(self._pending_plan)
        self._segment.update(
            end_step=step, train_seconds=train_seconds,
            steps_run=max(self._segment.get("steps_run", 0),
                          step - self._segment["start_step"]))
        if train_metrics:
            self._last_train = dict(step=step, metrics=train_metrics)
        self._write_progress()

    def _write_progress(self):
        self._last_progress = time.time()
        if self.model_dir and self.is_chief:
            write_json(self._path(PROGRESS_FILENAME),
                       dict(segments=self.segments,
                            last_train=self._last_train))

    def totals(self, examples_per_step):
        """Segments, training seconds and examples/s over all segments,
        killed ones included (their seconds and the steps they ran)."""
        steps = sum(s.get("steps_run", s["end_step"] - s["start_step"])
                    for s in self.segments)
        seconds = sum(s["train_seconds"] for s in self.segments)
        return dict(
            segments=len(self.segments),
            train_seconds=seconds,
            examples_per_second=(steps * examples_per_step / seconds
                                 if seconds > 0 else 0.0),
        )

    def last_train_metrics(self, step):
        """The training metrics of the last loop before the checkpoint at
        `step` (`{}` if unknown): a restart that has nothing left to train
        reports them instead of an empty dict."""
        if self._last_train and self._last_train.get("step") == step:
            return dict(self._last_train["metrics"])
        return {}

    def diverged(self, step, detail, results=None):
        """Records a diverged run: `results.json` gets `diverged` and
        `complete: false` (never a success)."""
        results = dict(results or {}, complete=False, final_step=None,
                       diverged=dict(step=step, detail=detail),
                       segments=self.segments, flags=self.identity)
        if self.is_chief and self.results_path:
            write_json(self.results_path, results)
            self.log(f"Wrote {self.results_path} (diverged at step {step}).")
        self.close()
        return results

    def finish(self, results, final_step):
        """Writes `results` (with `complete`, `final_step` and the segments)
        atomically to `results_path`; returns them and releases the lock.

        A finished run restarted with `--allow_changed_flags` whose new
        flags trained nothing keeps its results as they are."""
        try:
            if self._complete is not None:
                self.log(
                    f"The run in {self.model_dir} is complete (step "
                    f"{final_step}) and the changed flags train no further; "
                    f"its results in {self.results_path} are left as they "
                    "are. Use a new --model_dir to train again."
                )
                return self._complete
            if not results.get("train") and "train" in results:
                results = dict(results,
                               train=self.last_train_metrics(final_step))
            results = dict(results, complete=True, final_step=final_step,
                           segments=self.segments)
            if self.is_chief and self.results_path:
                write_json(self.results_path, results)
                self.log(f"Wrote {self.results_path}.")
            return results
        finally:
            self.close()

    def close(self):
        """Releases the lock (also done at exit)."""
        if self.lock is not None:
            self.lock.release()
