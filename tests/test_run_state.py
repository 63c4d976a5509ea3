"""Run identity, atomic writes and accumulated segments
(tpu_scripts.run_state), on local paths and TF's `ram://` filesystem (the
stand-in for gs://)."""

import json
import os
import uuid

import pytest

tf = pytest.importorskip("tensorflow")

from tpu_scripts import distribute, run_state  # noqa: E402


def ram_dir():
    return f"ram://run_state_{uuid.uuid4().hex[:8]}"


def save_checkpoint_at(model_dir, step):
    """A checkpoint whose global step is `step`, as the trainer writes."""
    checkpoint = tf.train.Checkpoint(
        global_step=tf.Variable(step, dtype=tf.int64))
    tf.train.CheckpointManager(checkpoint, model_dir, 3).save(
        checkpoint_number=step)


def record(model_dir, log=None, allow=False, **identity):
    flags_ = dict(global_batch_size=64, epochs=1.0, optimizer="lars")
    flags_.update(identity)
    return run_state.RunRecord(
        model_dir, flags_, os.path.join(model_dir, "results.json"),
        allow_changed_flags=allow,
        log=(log if log is not None else []).append)


@pytest.mark.parametrize("root", ["local", "ram"])
def test_atomic_write_leaves_old_file_whole_on_failure(root, tmp_path):
    directory = str(tmp_path) if root == "local" else ram_dir()
    path = os.path.join(directory, "sub", "results.json")
    run_state.write_json(path, {"top1": 0.5})
    assert run_state.read_json(path) == {"top1": 0.5}
    with pytest.raises(TypeError):
        run_state.write_text(path, object())  # fails while writing
    assert run_state.read_json(path) == {"top1": 0.5}
    assert tf.io.gfile.listdir(os.path.dirname(path)) == ["results.json"]


def test_restart_with_changed_flags_is_refused_then_allowed():
    # Issue 12, item 3: batch 64 for 1 epoch, then a restart with batch 32
    # for 2 epochs must not silently resume at step 8 of 32.
    model_dir = ram_dir()
    assert record(model_dir).start() is None  # first start
    save_checkpoint_at(model_dir, 8)
    with pytest.raises(run_state.ChangedFlagsError,
                       match=r"(?s)checkpoint at step 8.*--epochs: was 1.0, "
                       r"now 2.0\n  --global_batch_size: was 64, now 32"):
        record(model_dir, global_batch_size=32, epochs=2.0).start()
    log = []
    assert record(model_dir, log, allow=True, global_batch_size=32,
                  epochs=2.0).start() is None
    assert "--allow_changed_flags" in log[0]
    saved = run_state.read_json(os.path.join(model_dir,
                                             run_state.IDENTITY_FILENAME))
    assert saved["flags"]["global_batch_size"] == 32
    assert saved["changes"][0]["at_step"] == 8
    # The new values are now the run's identity.
    assert record(model_dir, global_batch_size=32, epochs=2.0).start() is None


def test_finished_run_is_left_untouched_and_segments_accumulate():
    # Item 4: a relaunch of a finished run must not overwrite its results.
    model_dir = ram_dir()
    first = record(model_dir)
    first.start()
    save_checkpoint_at(model_dir, 4)
    first.checkpointed(4, 10.0)  # preempted after step 4
    second = record(model_dir)
    second.start()
    save_checkpoint_at(model_dir, 8)
    second.checkpointed(8, 30.0)
    totals = second.totals(examples_per_step=64)
    assert totals == dict(segments=2, train_seconds=40.0,
                          examples_per_second=8 * 64 / 40.0)
    results = second.finish(dict(top1=0.7, steps=8), final_step=8)
    assert [(s["start_step"], s["end_step"]) for s in results["segments"]] == [
        (0, 4), (4, 8)]
    path = os.path.join(model_dir, "results.json")
    with tf.io.gfile.GFile(path) as f:
        before = f.read()
    log = []
    again = record(model_dir, log).start()
    assert again["top1"] == 0.7 and "is complete (step 8)" in log[0]
    with tf.io.gfile.GFile(path) as f:
        assert f.read() == before
    # A checkpoint later than the results (extended run): not complete.
    save_checkpoint_at(model_dir, 12)
    assert record(model_dir).start() is None


def test_init_checkpoint_must_not_be_the_model_dir(tmp_path):
    run_dir = str(tmp_path / "phase1")
    for init in (run_dir, run_dir + "/", os.path.join(run_dir, "ckpt-10")):
        with pytest.raises(run_state.FlagError,
                           match="--init_checkpoint=.* is in --model_dir"):
            run_state.check_init_checkpoint(init, run_dir)
    run_state.check_init_checkpoint(run_dir, str(tmp_path / "phase2"))


def test_divisibility_error_names_the_flag():
    # Item 9: --eval_batch_size=50 on 4 replicas blamed --global_batch_size.
    with pytest.raises(ValueError, match=r"--eval_batch_size=50 is not "
                       "divisible by the 4 replicas"):
        distribute.per_replica_batch_size(50, 4, "eval_batch_size")


def test_json_round_trip_of_flag_lists():
    assert run_state.flag_differences(
        {"widths": ["4", "8"], "seed": 1}, {"widths": ("4", "8"), "seed": 1}
    ) == []
    assert json.loads(json.dumps(run_state.flag_differences(
        {"seed": 1}, {"seed": 2}))) == ["--seed: was 1, now 2"]
