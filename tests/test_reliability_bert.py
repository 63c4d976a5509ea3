"""The BERT half of the reliability issue: an atomic `--overwrite` of
create_pretraining_data (item 3), exact resume with dropout on (4), truncated
and corrupt records (5, 12), non-finite flags (6), broken SQuAD files (11) and
one-line errors that come before any expensive work (14).

Every user error is checked where the user meets it: the script's exit
status 1, one `Error:` line naming the flag, file or record, no traceback.
The gs://-style paths use TensorFlow's in-process `ram://` filesystem.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")
pytest.importorskip("tensorflow_text")

import keras  # noqa: E402
from absl import flags  # noqa: E402

from test_tpu_distributed import environment  # noqa: E402
from tpu_scripts import run_state, trainer  # noqa: E402
from tpu_scripts.bert import data as bert_data  # noqa: E402
from tpu_scripts.bert import pretrain as bert_pretrain  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("tpu_scripts need the TensorFlow backend",
                allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(ROOT, "tpu_scripts", "bert")
CORPUS = os.path.join(HERE, "fixtures", "tiny_corpus.txt")
SQUAD = os.path.join(HERE, "fixtures", "squad_tiny.json")
NANO = os.path.join(HERE, "fixtures", "bert_nano.json")
QUIET = dict(log=lambda *a, **k: None)
# Small records of the tiny corpus: sequence 32, 5 predictions.
RECORD_SETTINGS = dict(max_seq_length=32, max_predictions_per_seq=5,
                       dupe_factor=1, random_seed=1)


def parse(module, argv):
    values = flags.FlagValues()
    module.define_flags(values)
    values(["script"] + argv)
    return values


def run_script(name, argv, timeout=60):
    """Runs tpu_scripts/bert/`name` in a subprocess: `(status, output)`."""
    process = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *argv], cwd=ROOT,
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout)
    return process.returncode, process.stdout


def assert_one_error_line(status, output, *fragments):
    """Exit status 1, no traceback, an `Error:` line holding `fragments`."""
    assert status == 1, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines()
              if line.startswith("Error:")]
    assert len(errors) == 1, output[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Two shards of the tiny corpus with a learnt vocabulary."""
    out = str(tmp_path_factory.mktemp("bert_reliability") / "seq32")
    lines = []
    bert_data.create_pretraining_data(
        CORPUS, out, vocabulary_size=300, num_shards=2, **RECORD_SETTINGS,
        log=lines.append)
    return dict(dir=out, vocab=os.path.join(out, "vocab.txt"),
                pattern=os.path.join(out, "*.tfrecord"), log=lines)


def test_a_learnt_vocabulary_smaller_than_asked_is_said(records):
    size = len(bert_data.load_vocabulary(records["vocab"]))
    assert size < 300
    assert (f"The learnt vocabulary has {size} tokens, fewer than "
            "--vocab_size=300") in "\n".join(records["log"])


def pretrain_args(records, **overrides):
    args = dict(
        input_files=records["pattern"], vocab_file=records["vocab"],
        bert_config=NANO, max_seq_length=32, max_predictions_per_seq=5,
        global_batch_size=4, train_steps=4, warmup_steps=1,
        learning_rate=1e-2, steps_per_loop=1, in_memory=True,
        track_trust_ratios=False)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items() if v is not None]


# ----------------------------------------------------------------------------
# Item 4: exact resume with dropout on.


def checkpoint_tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.endswith("VARIABLE_VALUE")}


def test_resume_with_dropout_is_bit_identical(records, tmp_path):
    # Dropout 0.1 (bert_nano's); checkpoints at steps 3 and 6.
    argv = pretrain_args(records, train_steps=6, save_checkpoints_steps=3,
                         model_dir=str(tmp_path / "whole"))
    whole = bert_pretrain.run(parse(bert_pretrain, argv), **QUIET)
    # The run stopped after its step-3 checkpoint, then restarted.
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(tmp_path / "whole", resumed_dir)
    for path in glob.glob(os.path.join(resumed_dir, "ckpt-6.*")) + [
            os.path.join(resumed_dir, "results.json")]:
        os.remove(path)
    tf.compat.v1.train.update_checkpoint_state(
        resumed_dir, os.path.join(resumed_dir, "ckpt-3"))
    argv = pretrain_args(records, train_steps=6, save_checkpoints_steps=3,
                         model_dir=resumed_dir)
    resumed = bert_pretrain.run(parse(bert_pretrain, argv), **QUIET)
    expected = checkpoint_tensors(os.path.join(tmp_path, "whole", "ckpt-6"))
    got = checkpoint_tensors(os.path.join(resumed_dir, "ckpt-6"))
    assert any(k.startswith("dropout_state/") for k in expected)
    assert sorted(got) == sorted(expected)
    differ = [k for k in expected if not np.array_equal(got[k], expected[k])]
    assert not differ, f"{len(differ)} of {len(expected)} differ: {differ[:5]}"
    assert resumed["train"]["loss"] == whole["train"]["loss"]


def test_resume_of_a_checkpoint_without_dropout_state(records, tmp_path,
                                                      monkeypatch):
    """A run checkpointed by the previous version (no dropout state)
    still resumes, and says its masks differ."""
    model_dir = str(tmp_path / "old")
    argv = pretrain_args(records, train_steps=6, save_checkpoints_steps=3,
                         model_dir=model_dir)
    with monkeypatch.context() as patch:
        patch.setattr(bert_pretrain.bert_models, "checkpoint_dropout_state",
                      lambda *args: [])
        patch.setattr(trainer.Trainer, "train", stop_at_3)
        with pytest.raises(run_state.Preempted):
            bert_pretrain.run(parse(bert_pretrain, argv), **QUIET)
    lines = []
    resumed = bert_pretrain.run(parse(bert_pretrain, argv),
                                log=lambda *a, **k: lines.append(a[0]))
    assert resumed["optimizer_updates"] == 6
    assert any("holds no dropout state" in line for line in lines), lines


REAL_TRAIN = trainer.Trainer.train


def stop_at_3(self, train_input, train_steps, **kwargs):
    """`Trainer.train` for 3 steps, then stopped as by a preemption."""
    REAL_TRAIN(self, train_input, 3, **kwargs)
    raise run_state.Preempted(3)


# ----------------------------------------------------------------------------
# Item 3: create_pretraining_data --overwrite commits atomically.

OLD = dict(RECORD_SETTINGS, num_shards=2)
NEW = dict(RECORD_SETTINGS, num_shards=3, random_seed=2)


def dataset_seen(output_dir):
    """What a reader sees: the record bytes of each file, the vocabulary
    and the metadata, all through the dataset folder's `CURRENT`."""
    files = bert_data.expand_patterns(os.path.join(output_dir, "*.tfrecord"))
    return dict(
        records={os.path.basename(p): [r.numpy() for r in
                                       tf.data.TFRecordDataset([p])]
                 for p in files},
        vocabulary=bert_data.load_vocabulary(
            os.path.join(output_dir, "vocab.txt")),
        metadata=bert_data.read_metadata(files),
    )


@pytest.fixture(scope="module")
def old_and_new(records, tmp_path_factory):
    """The datasets an overwrite replaces (`OLD`) and writes (`NEW`), as a
    reader sees them when each is written alone."""
    root = tmp_path_factory.mktemp("atomic")
    seen = {}
    for name, settings in (("old", OLD), ("new", NEW)):
        bert_data.create_pretraining_data(
            CORPUS, str(root / name), vocab_file=records["vocab"],
            **settings, **QUIET)
        seen[name] = dataset_seen(str(root / name))
    assert seen["old"]["records"] != seen["new"]["records"]
    return seen


def assert_clean(output_dir):
    """Only `CURRENT` and the version it names: no lock, no temporary
    file, no unfinished or old version."""
    version = bert_data.current_version(output_dir)
    assert sorted(tf.io.gfile.listdir(output_dir)) == sorted(
        ["CURRENT", os.path.basename(version)])


# Overwrites `argv[2]` with NEW's settings and kills itself (SIGKILL: no
# cleanup of any kind) at stage `argv[1]`.
KILLED_WRITER = """
import os, signal, sys
from tpu_scripts.bert import data as bert_data

stage, corpus, out, vocab = sys.argv[1:5]
kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if stage == "shards":  # half-way through the records
    real, calls = bert_data.instance_to_example, []
    def example(*args):
        calls.append(1)
        if len(calls) == 30:
            kill()
        return real(*args)
    bert_data.instance_to_example = example
elif stage == "switch":  # every file written, CURRENT not yet switched
    bert_data.write_text = kill
elif stage == "cleanup":  # switched, the old version not yet removed
    real_write = bert_data.write_text
    def write_then_kill(*args, **kwargs):
        real_write(*args, **kwargs)
        kill()
    bert_data.write_text = write_then_kill
bert_data.create_pretraining_data(
    corpus, out, vocab_file=vocab, overwrite=True, log=lambda *a: None,
    **%r)
"""


@pytest.mark.parametrize("stage, seen", [
    ("shards", "old"), ("switch", "old"), ("cleanup", "new")])
def test_overwrite_killed_at_any_stage_leaves_one_whole_dataset(
        records, old_and_new, tmp_path, stage, seen):
    out = str(tmp_path / "data")
    bert_data.create_pretraining_data(CORPUS, out, vocab_file=records["vocab"],
                                      **OLD, **QUIET)
    process = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER % NEW, stage, CORPUS, out,
         records["vocab"]], cwd=ROOT, env=environment(), timeout=60,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.returncode == -signal.SIGKILL, process.stdout[-2000:]
    assert tf.io.gfile.exists(os.path.join(out, "LOCK"))  # killed holding it
    assert dataset_seen(out) == old_and_new[seen]
    # The next run removes what the killed one left, then commits.
    bert_data.create_pretraining_data(CORPUS, out, vocab_file=records["vocab"],
                                      overwrite=True, **NEW, **QUIET)
    assert dataset_seen(out) == old_and_new["new"]
    assert_clean(out)


def test_overwrite_on_a_remote_filesystem(records, old_and_new, monkeypatch):
    """gs://-style paths (ram://): an error before the switch leaves the
    old dataset and no trace of the new one; after the switch, the new
    one; stale files of killed runs are removed by the next run."""
    out = f"ram://bert_atomic_{uuid.uuid4().hex[:8]}/data"
    write = dict(vocab_file=records["vocab"], **QUIET)
    bert_data.create_pretraining_data(CORPUS, out, **OLD, **write)
    old_version = bert_data.current_version(out)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(bert_data, "write_text", fail)  # the switch
        with pytest.raises(RuntimeError, match="injected"):
            bert_data.create_pretraining_data(CORPUS, out, overwrite=True,
                                              **NEW, **write)
    assert dataset_seen(out) == old_and_new["old"]
    assert_clean(out)  # the unfinished version and the lock are gone
    with monkeypatch.context() as patch:  # removing the old version
        patch.setattr(bert_data.DatasetWriter, "_remove_old", fail)
        with pytest.raises(RuntimeError, match="injected"):
            bert_data.create_pretraining_data(CORPUS, out, overwrite=True,
                                              **NEW, **write)
    assert dataset_seen(out) == old_and_new["new"]
    assert tf.io.gfile.exists(old_version)
    # What killed runs leave: a version never switched to, a temporary
    # CURRENT, the lock of a process that has exited.
    stale = [out + "/data-20260101T000000-dead00",
             out + "/CURRENT.tmp-1-0123abcd", out + "/LOCK"]
    tf.io.gfile.makedirs(stale[0])
    run_state.write_text(stale[0] + "/pretrain-00000-of-00001.tfrecord", "x")
    run_state.write_text(stale[1], "data-20260101T000000-dead00\n")
    run_state.write_text(stale[2], json.dumps(
        dict(host=socket.gethostname(), pid=dead_pid())))
    assert dataset_seen(out) == old_and_new["new"]
    bert_data.create_pretraining_data(CORPUS, out, overwrite=True, **OLD,
                                      **write)
    assert dataset_seen(out) == old_and_new["old"]
    assert_clean(out)
    # pretrain and finetune read the folder, its files and vocab.txt.
    assert bert_data.expand_patterns(out) == bert_data.expand_patterns(
        out + "/*.tfrecord")
    assert len(bert_data.load_records(out, 32, 5)["input_ids"]) == sum(
        bert_data.read_metadata(bert_data.expand_patterns(out))[
            "file_examples"])


def dead_pid():
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_writer_and_a_file_as_output_dir_are_refused(records,
                                                            tmp_path):
    out = str(tmp_path / "data")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import time; time.sleep(60)"])
    try:
        with open(os.path.join(out, "LOCK"), "w") as f:
            json.dump(dict(host=socket.gethostname(),
                           pid=holder.pid), f)
        with pytest.raises(run_state.FlagError, match=(
                f"--output_dir={out} is in use by another run \\(host "
                f"'.*', PID {holder.pid}, ")):
            bert_data.create_pretraining_data(
                CORPUS, out, vocab_file=records["vocab"], **OLD, **QUIET)
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(out) == ["LOCK"]  # the other run's files untouched
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(run_state.FlagError, match="is a file"):
        bert_data.create_pretraining_data(
            CORPUS, str(a_file), vocab_file=records["vocab"], **OLD, **QUIET)


def test_overwrite_replaces_a_flat_dataset_and_keeps_other_files(
        records, old_and_new, tmp_path):
    """A dataset of the previous (flat) layout is replaced; files that are
    not the module's own, even with similar names, stay."""
    out = tmp_path / "data"
    shutil.copytree(bert_data.current_version(records["dir"]), out)
    (out / "data-science").mkdir()
    (out / "notes.tmp-1").write_text("mine")
    with pytest.raises(run_state.FlagError, match="is not empty"):
        bert_data.create_pretraining_data(
            CORPUS, str(out), vocab_file=records["vocab"], **NEW, **QUIET)
    bert_data.create_pretraining_data(
        CORPUS, str(out), vocab_file=records["vocab"], overwrite=True, **NEW,
        **QUIET)
    assert dataset_seen(str(out)) == old_and_new["new"]
    version = os.path.basename(bert_data.current_version(str(out)))
    assert sorted(os.listdir(out)) == sorted(
        ["CURRENT", version, "data-science", "notes.tmp-1"])


# ----------------------------------------------------------------------------
# Items 5 and 12: truncated and corrupt records.


@pytest.fixture
def copied(records, tmp_path):
    """A copy of the records' current version (free to damage); returns
    `(folder, shard 1's path)`."""
    folder = str(tmp_path / "copy")
    shutil.copytree(bert_data.current_version(records["dir"]), folder)
    return folder, os.path.join(folder, "pretrain-00001-of-00002.tfrecord")


def train_error(records, folder, **overrides):
    """The `DataError` of `pretrain.run` on the records in `folder`."""
    argv = pretrain_args(records, input_files=folder + "/*.tfrecord",
                         **overrides)
    with pytest.raises(run_state.DataError) as error:
        bert_pretrain.run(parse(bert_pretrain, argv), **QUIET)
    return str(error.value)


@pytest.mark.parametrize("cut", ["mid_record", "whole_record"])
def test_truncated_shard_is_refused_in_memory_and_streaming(
        records, copied, cut):
    folder, shard = copied
    data = open(shard, "rb").read()
    if cut == "mid_record":
        data = data[:-10]
    else:  # the file ends at a record boundary: only counts can tell
        last = bert_data.count_framed_records(shard) - 1
        offset = 0
        for _ in range(last):
            offset += 16 + int.from_bytes(data[offset:offset + 8], "little")
        data = data[:offset]
    open(shard, "wb").write(data)
    message = train_error(records, folder, in_memory=True)
    assert shard in message
    assert ("is truncated: record" if cut == "mid_record"
            else "records; metadata.json declares") in message
    message = train_error(records, folder, in_memory=False)
    assert f"{shard} has {len(data)} bytes; metadata.json declares" in message
    # Metadata of the previous version: the total count only.
    metadata_path = os.path.join(folder, "metadata.json")
    metadata = json.load(open(metadata_path))
    del metadata["file_examples"], metadata["file_bytes"]
    json.dump(metadata, open(metadata_path, "w"))
    message = train_error(records, folder, in_memory=True)
    if cut == "whole_record":
        assert (f"The files of {folder} hold {metadata['num_examples'] - 1} "
                f"records; its metadata.json declares "
                f"{metadata['num_examples']}") in message
    # Without metadata.json (google-research/bert's files), the framing.
    os.remove(os.path.join(folder, "metadata.json"))
    if cut == "mid_record":
        message = train_error(records, folder, in_memory=True)
        assert f"{shard} is truncated: record" in message


@pytest.mark.parametrize("in_memory", [True, False])
def test_corrupt_record_is_a_data_error_naming_the_file(records, copied,
                                                        in_memory):
    folder, shard = copied
    data = bytearray(open(shard, "rb").read())
    data[100] ^= 0xFF  # in record 0, whose CRC no longer matches
    open(shard, "wb").write(bytes(data))
    message = train_error(records, folder, in_memory=in_memory,
                          shuffle_buffer=4)
    assert f"{shard} is corrupt at record 0: " in message


def test_truncated_shard_exits_with_one_error_line(records, copied):
    folder, shard = copied
    open(shard, "ab").write(b"\x00" * 5)  # a partial record header
    status, output = run_script("pretrain.py", pretrain_args(
        records, input_files=folder + "/*.tfrecord",
        vocab_file=folder + "/vocab.txt"))
    assert_one_error_line(status, output, shard)


# ----------------------------------------------------------------------------
# Items 6, 11 and 14: one `Error:` line, before any expensive work.


def script_error(module, argv):
    """The message a script exits with (as `main` does: `run_state.
    exit_on_flag_error` around its `run`), run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        run_state.exit_on_flag_error(module.run, parse(module, argv))
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("Error: ")
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("overrides, expected", [
    (dict(learning_rate="inf"),
     "--learning_rate must be a finite number. Received: inf"),
    (dict(beta_2="nan"), "--beta_2 must be a finite number"),
    (dict(dropout="-inf"), "--dropout must be a finite number"),
    (dict(warmup_steps=10, train_steps=4),
     "--warmup_steps must be < --train_steps=4. Received: 10"),
    (dict(global_batch_size=6, gradient_accumulation_steps=4),
     "--gradient_accumulation_steps must be a divisor of "
     "--global_batch_size=6. Received: 4"),
    (dict(input_files="/no/such/*.tfrecord"),
     "No file matches --input_files pattern '/no/such/*.tfrecord'"),
    (dict(eval_files="/no/such/eval"),
     "No file matches --eval_files pattern '/no/such/eval'"),
    (dict(bert_config="/no/such/config.json"),
     "Cannot read --bert_config=/no/such/config.json"),
    (dict(init_checkpoint="/no/such/ckpt"),
     "--init_checkpoint=/no/such/ckpt: no checkpoint"),
])
def test_pretrain_flag_errors_come_first(records, tmp_path, overrides,
                                         expected):
    model_dir = tmp_path / "run"
    message = script_error(bert_pretrain, pretrain_args(
        records, model_dir=str(model_dir), **overrides))
    assert expected in message, message
    assert not model_dir.exists()  # nothing written (run_identity.json)


def test_a_batch_the_replicas_and_accumulation_do_not_divide(records):
    status, output = run_script("pretrain.py", pretrain_args(
        records, num_cpu_devices=2, strategy="mirrored", global_batch_size=6,
        gradient_accumulation_steps=2))
    assert_one_error_line(
        status, output, "--global_batch_size=6 must be a multiple of "
        "--gradient_accumulation_steps=2 x 2 replica(s)")


def broken_vocabularies(records, tmp_path):
    tokens = bert_data.load_vocabulary(records["vocab"])
    broken = {}
    for kind, lines in (("duplicate", tokens + [tokens[7]]),
                        ("blank", tokens[:9] + [""] + tokens[9:])):
        path = tmp_path / f"{kind}_vocab.txt"
        path.write_text("".join(t + "\n" for t in lines))
        broken[kind] = str(path)
    return broken, tokens


def test_vocabulary_with_a_repeated_token_or_blank_line(records, tmp_path):
    broken, tokens = broken_vocabularies(records, tmp_path)
    expected = {
        "duplicate": (f"repeats token {tokens[7]!r} on line "
                      f"{len(tokens) + 1} (first on line 8)"),
        "blank": "has a blank token on line 10",
    }
    for kind, path in broken.items():
        for module, argv in (
                (bert_pretrain, pretrain_args(records, vocab_file=path)),
                (create_pretraining_data(), [
                    f"--input_files={CORPUS}", f"--vocab_file={path}",
                    f"--output_dir={tmp_path / 'out'}"]),
                (finetune_squad(), [
                    f"--vocab_file={path}", f"--train_file={SQUAD}",
                    f"--predict_file={SQUAD}", f"--bert_config={NANO}"])):
            message = script_error(module, argv)
            assert f"--vocab_file={path} {expected[kind]}" in message
    assert not (tmp_path / "out").exists()  # refused before writing


def create_pretraining_data():
    sys.path.insert(0, SCRIPTS)
    try:
        import create_pretraining_data as module
    finally:
        sys.path.remove(SCRIPTS)
    return module


def finetune_squad():
    from tpu_scripts.bert import finetune_squad as module
    return module


@pytest.mark.parametrize("flag, expected", [
    ("--num_shards=0", "--num_shards must be >= 1. Received: 0"),
    ("--masked_lm_prob=1.5", "--masked_lm_prob must be in (0, 1). "
     "Received: 1.5"),
    ("--masked_lm_prob=nan", "--masked_lm_prob must be in (0, 1)"),
    ("--short_seq_prob=-0.1", "--short_seq_prob must be in [0, 1]"),
    ("--max_seq_length=2", "--max_seq_length must be >= 5. Received: 2"),
    ("--max_predictions_per_seq=0", "--max_predictions_per_seq must be >= 1"),
    ("--dupe_factor=0", "--dupe_factor must be >= 1"),
    ("--vocab_size=3", "--vocab_size must be > 5"),
    ("--output_prefix=a/b", "--output_prefix must be a file name prefix"),
    ("--input_files=/no/such/*.txt",
     "No file matches --input_files pattern '/no/such/*.txt'"),
])
def test_create_pretraining_data_checks_flags_before_reading(
        tmp_path, monkeypatch, flag, expected):
    def never(*args, **kwargs):
        raise AssertionError("read the corpus before checking the flags")

    monkeypatch.setattr(bert_data, "read_documents", never)
    monkeypatch.setattr(bert_data, "build_vocabulary", never)
    out = tmp_path / "out"
    message = script_error(create_pretraining_data(), [
        f"--input_files={CORPUS}", f"--output_dir={out}", flag])
    assert expected in message, message
    assert not out.exists()


@pytest.mark.parametrize("content, expected", [
    (b"Fine text.\nAnd more.\n\xff\xfe broken\n",
     "is not UTF-8 text: byte 21 (line 3) is b'\\xff'"),
    (b" \n\n", "holds no text"),
])
def test_create_pretraining_data_bad_input_text(tmp_path, content, expected):
    text = tmp_path / "corpus.txt"
    text.write_bytes(content)
    message = script_error(create_pretraining_data(), [
        f"--input_files={text}", f"--output_dir={tmp_path / 'out'}",
        "--vocab_size=100"])
    assert f"{text}' {expected}" in message, message


def test_create_pretraining_data_exits_with_one_error_line(tmp_path):
    status, output = run_script("create_pretraining_data.py", [
        f"--input_files={CORPUS}", f"--output_dir={tmp_path / 'out'}",
        "--masked_lm_prob=1.5"], timeout=30)
    assert_one_error_line(status, output, "--masked_lm_prob must be in (0, 1)")
    status, output = run_script("create_pretraining_data.py",
                                [f"--input_files={CORPUS}"], timeout=30)
    assert_one_error_line(status, output, "--output_dir is required")


def test_pretrain_exits_with_one_error_line(records, tmp_path):
    status, output = run_script("pretrain.py", pretrain_args(
        records, learning_rate="inf", model_dir=str(tmp_path / "run")))
    assert_one_error_line(status, output, "--learning_rate must be a finite")


def squad_argv(records, tmp_path, **overrides):
    args = dict(train_file=SQUAD, predict_file=SQUAD,
                vocab_file=records["vocab"], bert_config=NANO,
                max_seq_length=64, doc_stride=32, max_query_length=16,
                global_batch_size=4, train_steps=2, steps_per_loop=2,
                model_dir=str(tmp_path / "squad"))
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def test_squad_missing_or_truncated_file(records, tmp_path):
    missing = str(tmp_path / "train-v1.1.json")
    status, output = run_script("finetune_squad.py", squad_argv(
        records, tmp_path, train_file=missing))
    assert_one_error_line(status, output, f"--train_file={missing} does not "
                          "exist", "train-v1.1.json and dev-v1.1.json")
    assert not (tmp_path / "squad").exists()  # nothing written before
    truncated = tmp_path / "dev-v1.1.json"
    truncated.write_bytes(open(SQUAD, "rb").read()[:-40])
    message = script_error(finetune_squad(), squad_argv(
        records, tmp_path, predict_file=str(truncated)))
    assert f"{truncated} is not valid JSON" in message
    for name in ("learning_rate", "warmup_proportion", "num_train_epochs"):
        message = script_error(finetune_squad(), squad_argv(
            records, tmp_path, **{name: "inf"}))
        assert f"--{name} must be" in message
