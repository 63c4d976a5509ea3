"""Runs that are never silently lost or silently wrong: the run's lock,
checkpoints found from their files, damaged checkpoints, divergence, the
resolved plan, a SIGTERM in the last loop, replica statistics, a full disk,
finished runs and what kills leave behind.

In-process runs use the ResNet script on a tiny data set (local paths and
TensorFlow's `ram://`, the stand-in for gs://); what needs a process of its
own (exit codes, kills, signals, two replicas, a full disk) runs as
background jobs (see conftest.py) whose tests assert on files, exit codes
and messages.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import keras  # noqa: E402
from absl import flags  # noqa: E402

from conftest import background, read_until  # noqa: E402
from test_tpu_distributed import (  # noqa: E402
    SCRIPT, checkpoint_values, small_run_flags, start, write_data)
from tpu_scripts import run_state  # noqa: E402
from tpu_scripts.resnet import train as resnet_train  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("tpu_scripts need the TensorFlow backend",
                allow_module_level=True)

QUIET = dict(log=lambda *a, **k: None)


def parse(argv):
    values = flags.FlagValues()
    resnet_train.define_flags(values)
    values(["script"] + argv)
    return values


def run(data_dir, model_dir, log=None, **overrides):
    """The ResNet script's `run()` on the tiny data set: 6 steps, a
    checkpoint after each."""
    values = dict(checkpoint_every=1, steps_per_loop=1,
                  track_trust_ratios=False, model_dir=model_dir,
                  deterministic=True)
    values.update(overrides)
    lines = [] if log is None else log
    return resnet_train.run(parse(small_run_flags(data_dir, **values)),
                            log=lambda *a, **k: lines.append(str(a[0])))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp("fashion_mnist")))


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A finished 6-step run (local disk): its directory, to copy."""
    model_dir = str(tmp_path_factory.mktemp("finished") / "run")
    results = run(data_dir, model_dir)
    assert results["complete"] and results["steps"] == 6
    return model_dir, results


def copy_run(finished, tmp_path, name="copy"):
    target = str(tmp_path / name)
    shutil.copytree(finished[0], target)
    return target


def ram_dir(name):
    return f"ram://{name}_{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------
# Item 1: a missing or garbled `checkpoint` index file.


@pytest.mark.parametrize("index", ["missing", "garbage"])
def test_a_lost_index_never_trains_from_zero_over_the_checkpoints(
        finished, data_dir, tmp_path, index):
    model_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(model_dir, "results.json"))
    if index == "missing":
        os.remove(os.path.join(model_dir, "checkpoint"))
    else:
        with open(os.path.join(model_dir, "checkpoint"), "w") as f:
            f.write("model_checkpoint_path: \x00\x01 not a proto {{{\n")
    assert run_state.checkpoint_step(model_dir) == 6
    # Other flags: refused, as with an intact index (before: trained from
    # step 0 and overwrote the checkpoints).
    with pytest.raises(run_state.ChangedFlagsError,
                       match="checkpoint at step 6.*\n.*--learning_rate: "
                       "was 2.0, now 1.0"):
        run(data_dir, model_dir, learning_rate=1.0)
    # The same flags: resumed at step 6, nothing retrained, the index
    # rewritten, and the last loop's training metrics reported (item 17).
    lines = []
    results = run(data_dir, model_dir, log=lines)
    assert results["steps"] == 6 and results["complete"]
    assert not any(line.startswith("step ") for line in lines), lines
    assert "Restored" in "\n".join(lines)
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-6")
    assert results["train"] == finished[1]["train"]
    assert results["top1"] == finished[1]["top1"]


# ----------------------------------------------------------------------------
# Item 10: a damaged newest checkpoint falls back to the previous one.


@pytest.mark.parametrize("damage", ["truncated_data", "bad_index"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
        finished, data_dir, tmp_path, damage):
    model_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(model_dir, "results.json"))
    if damage == "truncated_data":
        path = os.path.join(model_dir, "ckpt-6.data-00000-of-00001")
        with open(path, "r+b") as f:
            f.truncate(100)
    else:
        with open(os.path.join(model_dir, "ckpt-6.index"), "wb") as f:
            f.write(b"not an sstable")
    lines = []
    results = run(data_dir, model_dir, log=lines)
    text = "\n".join(lines)
    assert f"Cannot read the checkpoint {model_dir}/ckpt-6" in text
    assert (f"Restored {model_dir}/ckpt-5 (step 5) instead of the damaged "
            f"{model_dir}/ckpt-6") in text
    assert any(n.startswith("ckpt-6.damaged-") for n in os.listdir(model_dir))
    # Step 6 retrained from step 5: the same weights (op determinism).
    a, b = checkpoint_values(finished[0]), checkpoint_values(model_dir)
    for key in set(a) - {"save_counter/.ATTRIBUTES/VARIABLE_VALUE"}:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert results["top1"] == finished[1]["top1"]


def test_no_readable_checkpoint_is_an_error_naming_them(finished, data_dir,
                                                        tmp_path):
    model_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(model_dir, "results.json"))
    for name in os.listdir(model_dir):
        if name.endswith(".index"):
            with open(os.path.join(model_dir, name), "wb") as f:
                f.write(b"x")
    with pytest.raises(run_state.DataError,
                       match=r"No checkpoint in --model_dir=.* can be read "
                       r"\(.*ckpt-6, .*ckpt-5, .*ckpt-4\)"):
        run(data_dir, model_dir)
    assert sorted(n for n in os.listdir(model_dir) if "ckpt-" in n) == sorted(
        n for n in os.listdir(finished[0]) if "ckpt-" in n)  # nothing moved


# ----------------------------------------------------------------------------
# Item 7: the changed-flags check compares the resolved plan.


def test_a_flag_set_to_its_default_that_changes_the_plan_is_refused(
        data_dir):
    model_dir = ram_dir("plan")
    # The recipe warms up for 5 epochs of 4 steps.
    values = small_run_flags(data_dir, recipe="mlperf", train_steps=24,
                             checkpoint_every=12, steps_per_loop=12,
                             model_dir=model_dir, track_trust_ratios=False)
    values = [v for v in values if not v.startswith(
        ("--learning_rate", "--warmup_epochs"))]
    first = resnet_train.run(parse(values), **QUIET)
    saved = run_state.read_json(f"{model_dir}/run_identity.json")["plan"]
    assert saved["end_learning_rate"] == first["optimizer_settings"][
        "end_learning_rate"] != 0.0
    tf.io.gfile.remove(f"{model_dir}/results.json")  # as if killed
    # --end_learning_rate=0 is the flag's default: the flags are equal,
    # but the recipe's end rate would change.
    with pytest.raises(run_state.ChangedFlagsError,
                       match="resolved plan differs.*\n  plan "
                       "end_learning_rate: was .*, now 0.0"):
        resnet_train.run(parse(values + ["--end_learning_rate=0"]), **QUIET)
    again = resnet_train.run(parse(values), **QUIET)  # the same plan: fine
    assert again["steps"] == 24


# ----------------------------------------------------------------------------
# Items 11, 14 and 15.


@pytest.mark.parametrize("name", ["run_identity.json", "run_progress.json",
                                  "results.json"])
def test_a_truncated_json_file_is_an_error_naming_it(finished, data_dir,
                                                     tmp_path, name):
    model_dir = copy_run(finished, tmp_path)
    if name == "run_progress.json":  # read when the run is not finished
        os.remove(os.path.join(model_dir, "results.json"))
    path = os.path.join(model_dir, name)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(run_state.DataError,
                       match=f"{path} is not valid JSON"):
        run(data_dir, model_dir)
    assert not os.path.exists(os.path.join(model_dir, run_state.LOCK_FILENAME))


def test_model_dir_that_is_a_file_is_refused(data_dir, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(run_state.FlagError,
                       match=f"--model_dir={path} is a file"):
        run(data_dir, str(path))


def test_allow_changed_flags_never_rewrites_a_finished_run(
        finished, data_dir, tmp_path):
    model_dir = copy_run(finished, tmp_path)
    before = {n: open(os.path.join(model_dir, n)).read()
              for n in ("results.json", "run_identity.json")}
    lines = []
    results = run(data_dir, model_dir, log=lines, learning_rate=1.0,
                  allow_changed_flags=True)
    assert results == json.loads(before["results.json"])
    assert "changed flags train no further" in "\n".join(lines)
    for name, text in before.items():
        assert open(os.path.join(model_dir, name)).read() == text, name
    # Flags that train further do continue it, and say so.
    extended = run(data_dir, model_dir, train_steps=8,
                   allow_changed_flags=True)
    assert extended["steps"] == 8 and extended["train"]
    identity = run_state.read_json(os.path.join(model_dir,
                                                "run_identity.json"))
    assert identity["flags"]["train_steps"] == 8
    assert identity["changes"][0]["changes"] == [
        "--train_steps: was 6, now 8"]


# ----------------------------------------------------------------------------
# Item 17: what killed runs leave behind.


def test_stale_temporaries_are_removed_and_killed_segments_count(
        finished, data_dir, tmp_path):
    model_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(model_dir, "results.json"))
    leftovers = ["results.json.tmp-4242-0123abcd", "ckpt-7_temp",
                 "checkpoint.tmp9f8e7d6c5b4a"]
    for name in leftovers:
        path = os.path.join(model_dir, name)
        if name.endswith("_temp"):
            os.makedirs(path)
            open(os.path.join(path, "part-00000-of-00001.index"), "w").close()
        else:
            open(path, "w").close()
    # A segment killed after 3.5 s whose steps were never checkpointed.
    progress = run_state.read_json(os.path.join(model_dir,
                                                "run_progress.json"))
    progress["segments"].append(dict(start_step=6, end_step=6, steps_run=2,
                                     train_seconds=3.5, started="x"))
    run_state.write_json(os.path.join(model_dir, "run_progress.json"),
                         progress)
    lines = []
    results = run(data_dir, model_dir, log=lines)
    names = os.listdir(model_dir)
    assert not set(leftovers) & set(names), names
    assert "Removed 3 temporary file(s)" in "\n".join(lines)
    assert len(results["segments"]) == 3
    assert results["train_seconds"] == pytest.approx(
        finished[1]["train_seconds"] + 3.5, abs=0.5)


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    model_dir = str(tmp_path / "run")
    os.makedirs(model_dir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = dict(host=os.uname().nodename, pid=dead.pid, token="old",
                  process_start=1, heartbeat=time.time(), started=1.0)
    with open(os.path.join(model_dir, run_state.LOCK_FILENAME), "w") as f:
        json.dump(holder, f)
    lines = []
    lock = run_state.RunLock(model_dir, heartbeat_seconds=0,
                             log=lines.append).acquire()
    assert "Taking over the lock of a stopped run (its process is gone" in (
        lines[0])
    lock.release()
    assert not os.path.exists(os.path.join(model_dir, "run.lock"))


@pytest.mark.parametrize("root", ["local", "ram"])
def test_a_live_holder_on_another_host_is_refused_until_stale(tmp_path,
                                                              root):
    model_dir = str(tmp_path) if root == "local" else ram_dir("lock")
    tf.io.gfile.makedirs(model_dir)
    holder = dict(host="tpu-vm-7", pid=12, token="other", process_start=5,
                  heartbeat=time.time() - 10, started=time.time() - 100)
    path = os.path.join(model_dir, run_state.LOCK_FILENAME)
    run_state.write_json(path, holder)
    with pytest.raises(run_state.LockedError,
                       match="in use by another run \\(host 'tpu-vm-7', PID "
                       "12, .*last heartbeat 10 s ago"):
        run_state.RunLock(model_dir, heartbeat_seconds=0).acquire()
    holder["heartbeat"] = time.time() - 400  # no heartbeat for 400 s
    run_state.write_json(path, holder)
    lines = []
    lock = run_state.RunLock(model_dir, heartbeat_seconds=0,
                             stale_seconds=300, log=lines.append).acquire()
    assert "no heartbeat for 400 s" in lines[0]
    assert run_state.read_json(path)["token"] == lock.token
    lock.release()


def test_the_heartbeat_renews_the_lock_and_notices_a_takeover(tmp_path):
    lines = []
    lock = run_state.RunLock(str(tmp_path), heartbeat_seconds=0.05,
                             log=lines.append).acquire()
    path = os.path.join(str(tmp_path), run_state.LOCK_FILENAME)
    first = run_state.read_json(path)["heartbeat"]
    time.sleep(0.3)
    assert run_state.read_json(path)["heartbeat"] > first
    run_state.write_json(path, dict(run_state.read_json(path), token="thief"))
    time.sleep(0.3)
    with pytest.raises(run_state.LockedError, match="Another run took over"):
        lock.check()
    lock.release()
    assert os.path.exists(path)  # the thief's lock is left alone


# ----------------------------------------------------------------------------
# Subprocesses: two processes in one model_dir (item 2), kill -9 and
# restart, SIGTERM in the last loop (item 8), divergence (item 6), a
# 2-replica evaluation after a resume (item 9), a full disk (item 13).


def script_flags(data_dir, model_dir, **overrides):
    values = dict(checkpoint_every=1, steps_per_loop=1,
                  track_trust_ratios=False, deterministic=True,
                  model_dir=model_dir)
    values.update(overrides)
    return [SCRIPT] + small_run_flags(data_dir, **values)


def communicate(process, timeout=240):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def process_runs():
    root = tempfile.mkdtemp(prefix="keras_lamb_reliability_")
    data_dir = write_data(os.path.join(root, "data"))
    out = {"root": root}

    # Item 2: two processes started together into one --model_dir.
    shared = os.path.join(root, "shared")
    pair = [start(script_flags(data_dir, shared, train_steps=12)),
            start(script_flags(data_dir, shared, train_steps=12,
                               learning_rate=1.0))]
    out["pair"] = [communicate(p) for p in pair]
    out["pair_dir"] = shared

    # kill -9 mid-run, then a restart on this host takes the lock over.
    killed = os.path.join(root, "killed")
    victim = start(script_flags(data_dir, killed, train_steps=12))
    read_until(victim, "step 3/12")
    victim.kill()
    victim.wait()
    out["lock_after_kill"] = os.path.exists(
        os.path.join(killed, run_state.LOCK_FILENAME))
    out["restart"] = communicate(start(script_flags(data_dir, killed,
                                                    train_steps=12)))
    out["killed_dir"] = killed

    # Item 8: a SIGTERM while the last loop runs.
    last = os.path.join(root, "last_loop")
    victim = start(script_flags(data_dir, last, train_steps=16,
                                steps_per_loop=8, checkpoint_every=100))
    read_until(victim, "step 16/16")
    victim.send_signal(signal.SIGTERM)
    out["last_loop"] = communicate(victim)
    out["last_loop_dir"] = last
    out["last_loop_rerun"] = communicate(start(script_flags(
        data_dir, last, train_steps=16, steps_per_loop=8,
        checkpoint_every=100)))

    # Item 6: a learning rate that makes the loss NaN.
    diverged = os.path.join(root, "diverged")
    out["diverged"] = communicate(start(script_flags(
        data_dir, diverged, optimizer="momentum", learning_rate=1e30,
        train_steps=12)))
    out["diverged_dir"] = diverged

    # Item 9: 2 replicas, per-replica batch norm, SIGTERM then resume vs
    # uninterrupted; both evaluate at the end.
    mirrored = dict(strategy="mirrored", num_cpu_devices=2, train_steps=12,
                    checkpoint_every=4, steps_per_loop=2)
    straight = os.path.join(root, "mirrored_straight")
    resumed = os.path.join(root, "mirrored_resumed")
    uninterrupted = start(script_flags(data_dir, straight, **mirrored))
    victim = start(script_flags(data_dir, resumed, **mirrored))
    read_until(victim, "step 6/12")
    victim.send_signal(signal.SIGTERM)
    out["mirrored_term"] = communicate(victim)
    out["mirrored_resume"] = communicate(start(
        script_flags(data_dir, resumed, **mirrored)))
    out["mirrored_straight"] = communicate(uninterrupted)
    out["mirrored_dirs"] = (straight, resumed)
    return out


PROCESSES = background("reliability_processes", process_runs, seconds=90)


def results_of(model_dir):
    return run_state.read_json(os.path.join(model_dir, "results.json"))


@pytest.mark.background("reliability_processes")
def test_two_processes_cannot_share_a_model_dir():
    out = PROCESSES.result()
    (rc_a, out_a), (rc_b, out_b) = out["pair"]
    assert sorted([rc_a, rc_b]) == [0, 1], (out_a[-2000:], out_b[-2000:])
    loser = out_a if rc_a else out_b
    assert "Error: --model_dir=" in loser and "is in use by another run" in (
        loser) and "PID" in loser and "Traceback" not in loser
    # The identity, the results and the checkpoints belong to one run.
    winner_lr = 2.0 if rc_a == 0 else 1.0
    identity = run_state.read_json(os.path.join(out["pair_dir"],
                                                "run_identity.json"))
    assert identity["flags"]["learning_rate"] == winner_lr
    assert results_of(out["pair_dir"])["flags"]["learning_rate"] == winner_lr
    assert not os.path.exists(os.path.join(out["pair_dir"], "run.lock"))


@pytest.mark.background("reliability_processes")
def test_a_restart_after_kill_9_takes_the_lock_over():
    out = PROCESSES.result()
    assert out["lock_after_kill"]  # kill -9 leaves the lock file
    rc, text = out["restart"]
    assert rc == 0, text[-3000:]
    assert "Taking over the lock of a stopped run (its process is gone" in text
    assert results_of(out["killed_dir"])["steps"] == 12


@pytest.mark.background("reliability_processes")
def test_sigterm_in_the_last_loop_saves_it_and_exits_143():
    out = PROCESSES.result()
    rc, text = out["last_loop"]
    assert rc == run_state.PREEMPTED_EXIT_CODE, text[-3000:]
    assert "Preempted: saved a checkpoint at step 16" in text
    assert run_state.checkpoint_step(out["last_loop_dir"]) == 16
    rc, text = out["last_loop_rerun"]
    assert rc == 0 and "Restored" in text and "step 16/16" not in text
    results = results_of(out["last_loop_dir"])
    assert results["complete"] and results["steps"] == 16
    assert results["train"]  # the last loop's metrics, from the progress


@pytest.mark.background("reliability_processes")
def test_a_diverged_run_stops_with_an_error_and_records_it():
    out = PROCESSES.result()
    rc, text = out["diverged"]
    assert rc == 1, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "training diverged at step" in errors[0]
    assert "Traceback" not in text
    results = results_of(out["diverged_dir"])
    assert results["complete"] is False
    step = results["diverged"]["step"]
    assert "nan" in results["diverged"]["detail"]
    # Only finite checkpoints, all before the divergence.
    assert run_state.checkpoint_step(out["diverged_dir"]) < step
    values = checkpoint_values(out["diverged_dir"])
    assert all(np.all(np.isfinite(v)) for v in values.values()
               if np.issubdtype(np.asarray(v).dtype, np.floating))


@pytest.mark.background("reliability_processes")
def test_a_resumed_two_replica_run_evaluates_as_an_uninterrupted_one():
    out = PROCESSES.result()
    rc, text = out["mirrored_term"]
    assert rc == run_state.PREEMPTED_EXIT_CODE, text[-3000:]
    for key in ("mirrored_resume", "mirrored_straight"):
        assert out[key][0] == 0, out[key][1][-3000:]
    straight, resumed = (results_of(d) for d in out["mirrored_dirs"])
    assert len(resumed["segments"]) == 2
    assert resumed["eval_loss"] == straight["eval_loss"]
    assert resumed["top1"] == straight["top1"]
    a, b = (checkpoint_values(d) for d in out["mirrored_dirs"])
    for key in set(a) - {"save_counter/.ATTRIBUTES/VARIABLE_VALUE"}:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------
# Item 13: a full disk (a small tmpfs; needs root, as in CI).


def full_disk_run():
    root = tempfile.mkdtemp(prefix="keras_lamb_full_disk_")
    data_dir = write_data(os.path.join(root, "data"))
    mount = os.path.join(root, "disk")
    os.makedirs(mount)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                        mount], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return dict(skipped=f"cannot mount a tmpfs here: {e}")
    try:
        model_dir = os.path.join(mount, "run")
        argv = script_flags(data_dir, model_dir, train_steps=120,
                            checkpoint_every=20, steps_per_loop=10)
        victim = start(argv)
        read_until(victim, "step 24/120")
        # Fill the disk: the next checkpoint (and TensorBoard) fail.
        filler = os.path.join(mount, "filler")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        full = communicate(victim)
        saved = run_state.checkpoint_step(model_dir)
        os.remove(filler)
        resumed = communicate(start(argv))
        return dict(full=full, saved=saved, resumed=resumed,
                    results=results_of(model_dir))
    finally:
        subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


FULL_DISK = background("reliability_full_disk", full_disk_run, seconds=40)


@pytest.mark.background("reliability_full_disk")
def test_a_full_disk_is_one_error_line_and_the_run_resumes():
    out = FULL_DISK.result()
    if "skipped" in out:
        pytest.skip(out["skipped"])
    rc, text = out["full"]
    assert rc == 1, text[-3000:]
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text[-3000:]
    assert ("No space left on device" in errors[0]
            or "disk is full" in errors[0]), errors[0]
    assert out["saved"] is not None and out["saved"] >= 20
    rc, text = out["resumed"]
    assert rc == 0, text[-3000:]
    assert f"at step {out['saved']}" in text
    assert out["results"]["complete"] and out["results"]["steps"] == 120


def test_a_failing_tensorboard_write_turns_summaries_off_not_the_run():
    # A full disk while TensorBoard flushes used to crash the run.
    from tpu_scripts.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only the summary switch is used
    lines, calls = [], []
    trainer._summaries_off, trainer.model_dir = False, "gs://bucket/run"
    trainer._log = lambda *a, **k: lines.append(a[0])

    def full_disk():
        calls.append(1)
        raise tf.errors.ResourceExhaustedError(
            None, None, "gs://bucket/run/train/events: No space left on device")

    trainer._summaries(full_disk)
    trainer._summaries(full_disk)  # off: not tried again
    assert calls == [1] and len(lines) == 1
    assert "TensorBoard summaries stopped" in lines[0]
    assert "No space left on device" in lines[0] and "Training goes on" in (
        lines[0])
