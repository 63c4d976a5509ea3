"""Reliability of the ResNet script's data, flags and sweeps: damaged
TFRecords, counts that do not match, user errors as one `Error:` line,
warmup as long as the run, and sweeps that never overwrite the committed
results. One test (or more) per numbered item of the issue; every file is
made in the test."""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from absl import flags  # noqa: E402

from test_tpu_distributed import environment, small_run_flags  # noqa: E402
from tpu_scripts import records, run_state  # noqa: E402
from tpu_scripts.bert import sweep_batch_size as bert_sweep  # noqa: E402
from tpu_scripts.resnet import data  # noqa: E402
from tpu_scripts.resnet import imagenet_tfrecords  # noqa: E402
from tpu_scripts.resnet import sweep_batch_size as resnet_sweep  # noqa: E402
from tpu_scripts.resnet import train as resnet_train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_TIMEOUT = 120  # seconds; each run stops before training (~6 s)
TRAIN = 48  # 4 shards of 12 records
DAMAGED = "train-00001-of-00004"


def parse(module, argv):
    values = flags.FlagValues()
    module.define_flags(values)
    values(["script"] + argv)
    return values


def write_fashion_mnist(path, train=320, test=64):
    """The issue's reference data: a few hundred 8x8 examples."""
    rng = np.random.default_rng(0)
    data.write_fashion_mnist(
        path,
        (rng.integers(0, 256, (train, 8, 8)), rng.integers(0, 10, train)),
        (rng.integers(0, 256, (test, 8, 8)), rng.integers(0, 10, test)),
    )
    return path


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def reference_argv(data_dir, **overrides):
    """The issue's command `R` (small ResNet, LARS, batch 16, 40 steps)."""
    values = dict(train_steps=40, steps_per_loop=1, checkpoint_every=1)
    values.update(overrides)
    return small_run_flags(data_dir, **values)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shards"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
              for _ in range(TRAIN)]
    imagenet_tfrecords.write_shards(path, "train", images,
                                    np.arange(TRAIN) % 10 + 1, 4)
    return path


def record_offsets(content):
    """The byte offset of each record of a TFRecord file's `content`."""
    offsets, offset = [], 0
    while offset < len(content):
        offsets.append(offset)
        length = int.from_bytes(content[offset: offset + 8], "little")
        offset += 16 + length
    return offsets


def damaged_copy(shards, tmp_path, damage):
    """A copy of the shards with `DAMAGED` cut 5 bytes into the header of
    its record 8 ("truncated": TensorFlow's reader stops there silently),
    cut in the middle of record 8's data ("cut_in_record") or with 8 bytes
    flipped in its middle ("flipped"); returns `(folder, damaged file)`."""
    folder = tmp_path / damage
    shutil.copytree(shards, folder)
    path = folder / DAMAGED
    content = bytearray(path.read_bytes())
    eighth = record_offsets(content)[8]
    if damage == "truncated":
        content = content[: eighth + 5]
    elif damage == "cut_in_record":
        content = content[: eighth + 100]
    else:
        middle = len(content) // 2
        content[middle: middle + 8] = bytes(b ^ 0xFF for b in
                                            content[middle: middle + 8])
    path.write_bytes(bytes(content))
    return str(folder), str(path)


def train_input(files, **kwargs):
    return imagenet_tfrecords.TFRecordInput(
        files, 16, True, image_size=8, num_classes=10, **kwargs)


def read_epoch(train):
    for _ in train(None, epoch=0):
        pass


def run_script(argv):
    """The ResNet script in a subprocess: `(exit code, output)`."""
    done = subprocess.run(
        [sys.executable, "-m", "tpu_scripts.resnet.train"] + argv, cwd=ROOT,
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=SUBPROCESS_TIMEOUT)
    return done.returncode, done.stdout


def assert_one_error_line(code, output, message):
    """Exit 1, no traceback, the last line `Error: ...` matching
    `message`."""
    assert code == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last, output[-3000:]


def tfrecord_argv(files, **overrides):
    values = dict(train_files=files, image_size=8, num_classes=10,
                  model="small_resnet", small_resnet_widths="4,8",
                  small_resnet_blocks=1, global_batch_size=16,
                  optimizer="lars", learning_rate=2.0, warmup_epochs=0,
                  seed=1, train_steps=4, steps_per_loop=1)
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


# ----------------------------------------------------------------------------
# Item 5: a truncated shard no longer loses records silently.


def test_truncated_shard_is_refused_when_counting(shards, tmp_path):
    whole = sorted(tf.io.gfile.glob(f"{shards}/train-*"))
    assert records.count_records(whole) == TRAIN
    folder, path = damaged_copy(shards, tmp_path, "truncated")
    files = sorted(tf.io.gfile.glob(f"{folder}/train-*"))
    # Negative control, the bug: TensorFlow's reader, buffered as the input
    # pipelines read, stops silently at the cut: 44 records of 48.
    plain = tf.data.TFRecordDataset(
        files, buffer_size=imagenet_tfrecords.READ_BUFFER_BYTES)
    assert sum(1 for _ in plain) == TRAIN - 4
    size = os.path.getsize(path)
    with pytest.raises(run_state.DataError, match=(
            rf"--train_files: {path}, record 8 \(byte \d+ of {size}\): the "
            r"file ends inside the record's header \(5 of 12 bytes\): the "
            "file is truncated")):
        train_input(f"{folder}/train-*")
    # Cut inside a record's data (TensorFlow: a DataLossError naming no
    # file).
    folder, path = damaged_copy(shards, tmp_path, "cut_in_record")
    with pytest.raises(run_state.DataError, match=(
            rf"--train_files: {path}, record 8 .*the record holds \d+ bytes "
            "but the file ends 88 bytes after its header: the file is "
            "truncated")):
        train_input(f"{folder}/train-*")


def test_truncated_shard_with_a_declared_count_stops_training(shards,
                                                              tmp_path):
    folder, path = damaged_copy(shards, tmp_path, "truncated")
    train = train_input(f"{folder}/train-*", num_examples=TRAIN)  # no read
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        read_epoch(train)
    error = records.data_error(caught.value)
    assert isinstance(error, run_state.DataError)
    assert str(error).startswith(f"--train_files: {path}, record ")
    assert "truncated or corrupt" in str(error)


def test_truncated_shard_script_exits_with_one_error_line(shards, tmp_path):
    folder, path = damaged_copy(shards, tmp_path, "truncated")
    code, output = run_script(tfrecord_argv(f"{folder}/train-*"))
    assert_one_error_line(code, output, f"--train_files: {path}, record ")
    assert "truncated" in output.splitlines()[-1]


@pytest.mark.parametrize("count, message", [
    (40, "--train_files hold more records than --num_train_examples=40"),
    (60, r"expected 60 records \(--num_train_examples=60\) and found only "
         "48"),
])
def test_declared_training_count_is_checked(shards, count, message):
    train = train_input(f"{shards}/train-*", num_examples=count)
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        read_epoch(train)
    assert isinstance(records.data_error(caught.value), run_state.DataError)
    assert caught.match(message)


def test_imagenet_shard_names_give_the_known_counts(monkeypatch):
    train = [f"gs://b/imagenet/train-{i:05d}-of-01024" for i in range(1024)]
    validation = [f"gs://b/validation-{i:05d}-of-00128" for i in range(128)]
    assert imagenet_tfrecords.known_count(train) == 1_281_167
    assert imagenet_tfrecords.known_count(validation) == 50_000
    assert imagenet_tfrecords.known_count(train[:-1]) is None  # a subset
    with pytest.raises(run_state.FlagError, match=(
            "--num_train_examples=1281000, but --train_files are "
            "ImageNet's 1024 shards .* hold 1281167 records")):
        imagenet_tfrecords.resolve_count(
            train, 1281000, "--train_files", "--num_train_examples")
    # Counted (0): the count read must be ImageNet's.
    monkeypatch.setattr(imagenet_tfrecords, "count_records",
                        lambda files, flag, sizes: 1_281_000)
    with pytest.raises(run_state.DataError, match=(
            "which hold 1281167 records, but they hold 1281000")):
        imagenet_tfrecords.resolve_count(
            train, 0, "--train_files", "--num_train_examples")
    assert imagenet_tfrecords.resolve_count(
        train, 1_281_167, "--train_files", "--num_train_examples") == 1281167


def test_in_memory_examples_beyond_the_data_are_refused(idx_dir):
    for name, value in (("train_examples", 1000), ("eval_examples", 100)):
        values = parse(resnet_train, small_run_flags(idx_dir,
                                                     **{name: value}))
        with pytest.raises(run_state.DataError, match=(
                f"--{name}={value}, but the .* holds only")):
            resnet_train.build_inputs(values, 16, 16, log=lambda *a: None)


# ----------------------------------------------------------------------------
# Item 12: a corrupted record is a DataError naming the file and record.


def test_corrupt_record_is_named_when_counting_and_training(shards,
                                                            tmp_path):
    folder, path = damaged_copy(shards, tmp_path, "flipped")
    files = sorted(tf.io.gfile.glob(f"{folder}/train-*"))
    with pytest.raises(run_state.DataError, match=(
            rf"--train_files: {path}, record \d+ .*the file is corrupt")):
        train_input(f"{folder}/train-*")
    message = records.locate_damaged_record(files)
    assert message.startswith(f"{path}, record ") and "corrupt" in message
    assert records.locate_damaged_record(
        sorted(tf.io.gfile.glob(f"{shards}/train-*"))) is None
    train = train_input(f"{folder}/train-*", num_examples=TRAIN)
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        read_epoch(train)  # before: a DataLossError naming no file
    assert str(records.data_error(caught.value)).startswith(
        f"--train_files: {path}, record ")
    assert records.data_error(ValueError("something else")) is None


def test_corrupt_record_script_exits_with_one_error_line(shards, tmp_path):
    folder, path = damaged_copy(shards, tmp_path, "flipped")
    code, output = run_script(tfrecord_argv(f"{folder}/train-*",
                                            num_train_examples=TRAIN))
    assert_one_error_line(code, output, f"--train_files: {path}, record ")
    assert "DataLossError" not in output


def test_label_outside_the_classes_is_one_data_error(shards):
    train = train_input(f"{shards}/train-*", num_examples=TRAIN)
    train.num_classes = 2  # the files' labels are 1..10
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        read_epoch(train)
    error = records.data_error(caught.value)
    assert isinstance(error, run_state.DataError)
    assert str(error).startswith(f"--train_files: {shards}/train-")
    assert str(error).endswith("is outside [1, 2] (labels in the files are "
                               "1-based; --num_classes=2).")


def test_truncated_idx_file_is_a_data_error(idx_dir, tmp_path):
    name = "train-images-idx3-ubyte.gz"
    content = open(os.path.join(idx_dir, name), "rb").read()
    cut = tmp_path / name
    cut.write_bytes(content[: len(content) // 2])
    with pytest.raises(run_state.DataError, match=f"{cut} is not a whole "
                       "gzip file .*truncated or corrupt"):
        data.read_idx(str(cut))


# ----------------------------------------------------------------------------
# Items 14 and 6: user errors, found before data is read or a model built.


@pytest.mark.parametrize("argv, message", [
    (["--image_size=100000"], "--image_size must be <= 2048"),
    (["--num_classes=0"], "--num_classes must be >= 1"),
    (["--data_dir=/nonexistent/fmnist"],
     "--data_dir=/nonexistent/fmnist is not a directory"),
    (["--train_files=/nonexistent/train-*"],
     r"--train_files: '/nonexistent/train-\*' matches no file"),
    (["--recipe=mlperf", "--optimizer=lamb"],
     "--recipe=mlperf is defined for --optimizer=lars"),
    (["--synthetic_data", "--target_accuracy=0.5"],
     "--target_accuracy needs an evaluation set"),
    (["--learning_rate=inf"], "--learning_rate must be a finite number"),
    (["--momentum=nan"], "--momentum must be a finite number"),
    (["--epochs=inf"], "--epochs must be a finite number"),
    (["--checkpoint_every_minutes=-inf"], "--checkpoint_every_minutes must "
     "be a finite number"),
    (["--small_resnet_widths=100000,8"], "--small_resnet_widths must be a "
     r"list of integers in \[1, 4096\]"),
    ([f"--train_files={ROOT}/tests"], "matches the folder"),
])
def test_absurd_flags_are_refused_before_any_data(argv, message):
    with pytest.raises(run_state.FlagError, match=message):
        resnet_train.validate_flags(parse(resnet_train, argv))


@pytest.mark.parametrize("overrides, message", [
    (dict(global_batch_size=512), "--global_batch_size=512 is more than "
     "the 320 examples of the training set"),
    (dict(eval_batch_size=128), r"--eval_batch_size=128 \(the evaluation "
     r"batch\) is larger than the evaluation set, which holds 64"),
])
def test_batches_larger_than_the_data_are_refused(idx_dir, overrides,
                                                  message):
    values = parse(resnet_train, reference_argv(idx_dir, **overrides))
    resnet_train.validate_flags(values)
    with pytest.raises(run_state.FlagError, match=message):
        resnet_train.build_inputs(values, values.global_batch_size,
                                  values.eval_batch_size
                                  or values.global_batch_size,
                                  log=lambda *a: None)


def test_batch_larger_than_the_tfrecords_is_refused(shards):
    with pytest.raises(run_state.FlagError, match=(
            "--global_batch_size=64 is more than the 48 examples of "
            "--train_files")):
        imagenet_tfrecords.TFRecordInput(f"{shards}/train-*", 64, True,
                                         image_size=8, num_classes=10)


@pytest.mark.parametrize("overrides, message", [
    (dict(global_batch_size=512), "--global_batch_size=512 is more than"),
    (dict(learning_rate="inf"), "--learning_rate must be a finite number"),
    (dict(warmup_epochs=1000), "--warmup_epochs=1000 is 20000 steps (20 "
     "per epoch), not fewer than the run's 40 steps (--train_steps=40)"),
])
def test_reference_command_user_errors_are_one_line(idx_dir, overrides,
                                                    message):
    code, output = run_script(reference_argv(idx_dir, **overrides))
    assert_one_error_line(code, output, message)


# ----------------------------------------------------------------------------
# Item 18: a warmup as long as the run is refused, not clamped.


def test_warmup_as_long_as_the_run_is_refused(idx_dir):
    assert resnet_train._warmup_steps(0.5, 20, 40) == 10  # R: 10 of 40
    assert resnet_train._warmup_steps(0, 20, 40) == 0
    with pytest.raises(run_state.FlagError, match=(
            r"--warmup_epochs=1000 is 20000 steps \(20 per epoch\), not "
            r"fewer than the run's 40 steps.*Lower --warmup_epochs")):
        resnet_train._warmup_steps(1000, 20, 40)  # before: clamped to 39
    # The default warmup (5 epochs) and --epochs=2: all warmup before.
    values = parse(resnet_train, small_run_flags(
        idx_dir, train_steps=0, epochs=2, warmup_epochs=5))
    values.unparse_flags()
    values(["script", "--epochs=2"])
    assert values.warmup_epochs == 5.0  # the default
    with pytest.raises(run_state.FlagError, match=(
            r"--warmup_epochs=5 \(the default\) is 585 steps \(117 per "
            r"epoch\), not fewer than the run's 234 steps \(--epochs=2\): "
            r"the whole run would be warmup. Lower --warmup_epochs to below "
            "2")):
        resnet_train.optimizer_plan(values, 117, 234, False)


# ----------------------------------------------------------------------------
# Item 16: sweeps write to a fresh folder, never into the committed results.


def fake_train(flags_, data_, optimizer, batch_size, multiplier):
    return dict(optimizer=optimizer, batch_size=batch_size,
                lr_multiplier=multiplier, peak_lr=0.1 * multiplier,
                val_accuracy=0.5, test_accuracy=0.4, train_loss=1.0,
                steps=4, seconds=1.0)


def sweep_flags(data_dir, *extra):
    return parse(resnet_sweep, [
        f"--data_dir={data_dir}", "--batch_sizes=16", "--optimizers=lars",
        "--lr_multipliers=1", "--validation_examples=64", *extra])


def test_sweeps_default_to_a_fresh_runs_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for module, name in ((resnet_sweep, "resnet_sweep"),
                         (bert_sweep, "bert_sweep")):
        assert parse(module, []).output_dir == ""  # was results/...
    first = resnet_sweep.sweep_output_dir("", "resnet_sweep")
    assert first.startswith(os.path.join("runs", "resnet_sweep-"))
    os.makedirs(first)
    assert resnet_sweep.sweep_output_dir("", "resnet_sweep") != first
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/runs/" in f.read().split()


def test_sweeps_refuse_the_committed_results(monkeypatch, idx_dir):
    monkeypatch.chdir(ROOT)
    committed = os.path.join("results", "resnet_sweep")
    before = {name: os.path.getmtime(os.path.join(committed, name))
              for name in os.listdir(committed)}
    with pytest.raises(run_state.FlagError, match=(
            "--output_dir=results/resnet_sweep is under the repository's "
            "results/.*--allow_results_dir")):
        resnet_sweep.run_sweep(
            sweep_flags(idx_dir, f"--output_dir={committed}"), [],
            train=fake_train, log=lambda *a, **k: None)
    after = {name: os.path.getmtime(os.path.join(committed, name))
             for name in os.listdir(committed)}
    assert after == before
    assert resnet_sweep.sweep_output_dir(
        committed, "resnet_sweep", allow_results_dir=True) == committed
    with pytest.raises(run_state.FlagError, match="--allow_results_dir"):
        bert_sweep.run(parse(bert_sweep, [
            "--text_file=/nonexistent.txt",
            f"--output_dir={os.path.join(ROOT, 'results', 'bert_sweep')}"]),
            log=lambda *a, **k: None)


def test_sweep_writes_its_command_only_after_it_succeeded(idx_dir, tmp_path):
    out = str(tmp_path / "sweep")
    quiet = dict(train=fake_train, log=lambda *a, **k: None)
    with pytest.raises(run_state.FlagError, match="No Fashion-MNIST"):
        resnet_sweep.run_sweep(sweep_flags(
            str(tmp_path / "missing"), f"--output_dir={out}"), ["x"], **quiet)
    assert not os.path.exists(os.path.join(out, "command.txt"))  # before: it
    resnet_sweep.run_sweep(sweep_flags(idx_dir, f"--output_dir={out}"),
                           [f"--output_dir={out}"], **quiet)
    with open(os.path.join(out, "command.txt")) as f:
        assert f.read() == ("python -m tpu_scripts.resnet.sweep_batch_size "
                            f"--output_dir={out}\n")
    assert not [n for n in os.listdir(out) if ".tmp-" in n]  # atomic


def test_committed_sweep_commands_name_modules_that_exist():
    for name in ("command.txt", "table.md"):
        with open(os.path.join(ROOT, "results", "resnet_sweep", name)) as f:
            text = f.read()
        commands = [line for line in text.splitlines()
                    if line.startswith("python")]
        assert commands, name
        for command in commands:
            module = command.split()[2]
            assert command.split()[1] == "-m"
            assert importlib.util.find_spec(module) is not None, command


@pytest.mark.parametrize("module, argv, message", [
    (resnet_sweep, ["--epochs=inf"], "--epochs must be a finite number"),
    (resnet_sweep, ["--lr_multipliers=1,inf"],
     "--lr_multipliers must be positive finite numbers"),
    (bert_sweep, ["--text_file=t", "--epochs=inf"],
     "--epochs must be a finite number"),
    (bert_sweep, ["--text_file=t", "--lamb_grid=inf"],
     "--lamb_grid must be positive numbers"),
    (bert_sweep, ["--text_file=t", "--tuned_exponents=0,nan"],
     "--tuned_exponents must be finite numbers"),
])
def test_sweeps_refuse_non_finite_flags(module, argv, message):
    with pytest.raises(run_state.FlagError, match=message):
        module.validate_flags(parse(module, argv))
