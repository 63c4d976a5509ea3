"""ImageNet TFRecords (TPU / Model Garden layout), synthetic data, gs://-style
outputs and --target_accuracy of the ResNet script.

The shards are made here: small random JPEGs, labels 1-based as the
conversion tools write them, each label used once so that labels identify
examples.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
flags = pytest.importorskip("absl.flags")

from tpu_scripts.resnet import imagenet_tfrecords  # noqa: E402
from conftest import background  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 400  # seconds for the subprocess; ~40 s on an idle machine
NUM_CLASSES = 32
TRAIN, EVAL = 24, 11  # 4 training shards of 6, 2 evaluation shards (6 + 5)


class FakeContext:
    """The fields of `tf.distribute.InputContext` the pipelines use."""

    def __init__(self, pipelines, pipeline_id, replicas):
        self.num_input_pipelines = pipelines
        self.input_pipeline_id = pipeline_id
        self.num_replicas_in_sync = replicas

    def get_per_replica_batch_size(self, global_batch_size):
        return global_batch_size // self.num_replicas_in_sync


def random_images(count, seed):
    rng = np.random.default_rng(seed)
    shapes = [(40, 56), (64, 48), (36, 36)]
    return [rng.integers(0, 256, shapes[i % 3] + (3,), dtype=np.uint8)
            for i in range(count)]


def write_shards(path):
    imagenet_tfrecords.write_shards(path, "train", random_images(TRAIN, 0),
                               np.arange(1, TRAIN + 1), 4)
    imagenet_tfrecords.write_shards(path, "validation", random_images(EVAL, 1),
                               np.arange(1, EVAL + 1), 2)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("imagenet")))


def train_input(files, **kwargs):
    kwargs = dict(dict(image_size=32, num_classes=NUM_CLASSES, seed=3),
                  **kwargs)
    return imagenet_tfrecords.TFRecordInput(files, 8, True, **kwargs)


def eval_input(files, batch=4, **kwargs):
    return imagenet_tfrecords.TFRecordInput(
        files, batch, False, image_size=32, num_classes=NUM_CLASSES,
        files_flag="--eval_files", count_flag="--num_eval_examples", **kwargs)


def labels_of(ds):
    return np.concatenate([batch[1].numpy() for batch in ds])


# ----------------------------------------------------------------------------
# The pipelines


def test_evaluation_counts_every_example_once_with_0_based_labels(shards):
    evaluation = eval_input(f"{shards}/validation-*")
    assert evaluation.num_examples == EVAL  # counted
    assert evaluation.steps_per_epoch == 3  # 11 examples padded to 12
    for pipelines, replicas in ((1, 1), (2, 4)):
        seen, total = [], 0.0
        for pipeline in range(pipelines):
            ds = evaluation(FakeContext(pipelines, pipeline, replicas))
            batches = list(ds)
            assert len(batches) == 3 * replicas // pipelines
            for images, labels, weights in batches:
                assert images.shape == (4 // replicas, 32, 32, 3)
                assert np.all(np.isfinite(images))
                seen.extend(labels.numpy()[weights.numpy() == 1])
                total += float(weights.numpy().sum())
                assert set(weights.numpy()) <= {0.0, 1.0}
        # Written 1..11, read 0..10, each once.
        assert sorted(seen) == list(range(EVAL)) and total == EVAL


def test_training_epochs_are_permutations_and_resume_exactly(shards):
    train = train_input(f"{shards}/train-*")
    assert (train.num_examples, train.steps_per_epoch) == (TRAIN, 3)
    epoch = [(x.numpy(), y.numpy()) for x, y in train(None, epoch=1)]
    assert epoch[0][0].shape == (8, 32, 32, 3)
    assert sorted(np.concatenate([y for _, y in epoch])) == list(range(TRAIN))
    resumed = [(x.numpy(), y.numpy())
               for x, y in train(None, epoch=1, start_step=2)]
    assert len(resumed) == 1
    np.testing.assert_array_equal(resumed[0][0], epoch[2][0])
    np.testing.assert_array_equal(resumed[0][1], epoch[2][1])
    other = labels_of(train(None, epoch=2))
    assert not np.array_equal(other, np.concatenate([y for _, y in epoch]))
    # Two input pipelines of 2 replicas each: 2 shards each, disjoint.
    seen = []
    for pipeline in range(2):
        batches = list(train(FakeContext(2, pipeline, 4), epoch=1))
        assert len(batches) == 3 * 2
        assert batches[0][0].shape == (2, 32, 32, 3)
        seen.extend(labels_of(batches))
    assert sorted(seen) == list(range(TRAIN))


def test_synthetic_input_shapes_and_padding():
    train = imagenet_tfrecords.SyntheticInput(64, 16, True, image_size=8,
                                         num_classes=5)
    batches = list(train(FakeContext(1, 0, 2), epoch=1, start_step=1))
    assert len(batches) == (4 - 1) * 2
    indices, labels = batches[0]
    assert indices.shape == (8,) and int(indices[0]) == 64 + 16
    assert set(labels_of(batches)) <= set(range(5))
    images = imagenet_tfrecords.synthetic_images(indices, 8)
    assert images.shape == (8, 8, 8, 3)
    evaluation = imagenet_tfrecords.SyntheticInput(20, 8, False, num_classes=5)
    weights = np.concatenate([b[2].numpy() for b in evaluation(None)])
    assert len(weights) == 24 and weights.sum() == 20


# ----------------------------------------------------------------------------
# Bad input: one test per case


def write_records(path, records):
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return path


def shard_with(tmp_path, bad, position=2, count=8):
    """A shard of `count` good records with `bad` (a tf.train.Example) at
    `position`."""
    records = []
    for i, image in enumerate(random_images(count, 7)):
        jpeg = tf.io.encode_jpeg(image).numpy()
        records.append(imagenet_tfrecords.make_example(
            jpeg, i % NUM_CLASSES + 1, *image.shape[:2]))
    records[position] = bad
    return write_records(str(tmp_path / "bad-00000-of-00001"), records)


def good_jpeg():
    return tf.io.encode_jpeg(random_images(1, 9)[0]).numpy()


def without(key, example):
    del example.features.feature[key]
    return example


def read_all(files, training):
    if training:
        ds = train_input(files, num_examples=8)(None)
    else:
        ds = eval_input(files, num_examples=8)(None)
    for _ in ds:
        pass


def test_glob_that_matches_nothing(tmp_path, shards):
    with pytest.raises(ValueError, match=r"--train_files: '.*/nothing-\*' "
                       "matches no file"):
        train_input(f"{shards}/train-*,{tmp_path}/nothing-*")
    with pytest.raises(ValueError, match="--eval_files: .* matches no file"):
        eval_input(f"{tmp_path}/validation-*")
    with pytest.raises(ValueError, match="--train_files is empty"):
        train_input(" , ")


@pytest.mark.parametrize("training", [True, False])
def test_record_without_image_encoded(tmp_path, training):
    bad = without("image/encoded",
                  imagenet_tfrecords.make_example(good_jpeg(), 1, 8, 8))
    path = shard_with(tmp_path, bad, position=5)
    flag = "--train_files" if training else "--eval_files"
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"{flag}: {path}, record 5: no image/encoded"):
        read_all(path, training)


def test_record_without_label(tmp_path):
    bad = without("image/class/label",
                  imagenet_tfrecords.make_example(good_jpeg(), 1, 8, 8))
    path = shard_with(tmp_path, bad, position=3)
    # (Training and evaluation parse records with the same function.)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"{path}, record 3: no image/class/label"):
        read_all(path, training=True)


@pytest.mark.parametrize("label", [0, NUM_CLASSES + 1])
def test_label_outside_1_to_num_classes(tmp_path, label):
    bad = imagenet_tfrecords.make_example(good_jpeg(), label, 8, 8)
    path = shard_with(tmp_path, bad, position=0)
    with pytest.raises(
            tf.errors.InvalidArgumentError,
            match=(f"{path}, record 0: image/class/label {label} is outside "
                   rf"\[1, {NUM_CLASSES}\] \(labels in the files are "
                   "1-based")):
        read_all(path, training=label != 0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("payload", ["truncated", "png"])
def test_jpeg_that_does_not_decode(tmp_path, training, payload):
    jpeg = good_jpeg()
    encoded = {
        "truncated": jpeg[: len(jpeg) // 2],  # a valid header
        "png": tf.io.encode_png(random_images(1, 2)[0]).numpy(),
    }[payload]
    bad = imagenet_tfrecords.make_example(encoded, 1, 8, 8)
    path = shard_with(tmp_path, bad, position=7)
    flag = "--train_files" if training else "--eval_files"
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"{flag}: {path}, record 7: image/encoded does "
                       "not decode as a JPEG"):
        read_all(path, training)


@pytest.mark.parametrize("count, message", [
    (10, "--eval_files hold more records than --num_eval_examples=10"),
    (12, r"expected 12 records \(--num_eval_examples=12\) and found only 11"),
])
def test_wrong_evaluation_count(shards, count, message):
    evaluation = eval_input(f"{shards}/validation-*", num_examples=count)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        list(evaluation(None))


@pytest.mark.parametrize("argv, message", [
    (["--synthetic_data", "--train_files=x"], "--synthetic_data makes its "
     "own data; drop --train_files and --eval_files"),
    (["--eval_files=x"], "--eval_files needs --train_files"),
    (["--num_eval_examples=-1"], "--num_eval_examples must be >= 0"),
    (["--num_classes=0"], "--num_classes must be >= 1"),
])
def test_data_flags_that_disagree(argv, message):
    resnet_train = pytest.importorskip("tpu_scripts.resnet.train")
    values = flags.FlagValues()
    resnet_train.define_flags(values)
    values(["script"] + argv)
    with pytest.raises(ValueError, match=message):
        resnet_train.check_data_flags(values)


@pytest.mark.parametrize("argv, has_eval, message", [
    (["--target_accuracy=1.5"], True,
     r"--target_accuracy must be in \[0, 1\]"),
    (["--target_accuracy=0.7"], False, "--target_accuracy needs an "
     "evaluation set: --eval_files"),
    (["--epochs_between_evals=-4"], True, "--epochs_between_evals must be"),
])
def test_target_flags(argv, has_eval, message):
    resnet_train = pytest.importorskip("tpu_scripts.resnet.train")
    values = flags.FlagValues()
    resnet_train.define_flags(values)
    values(["script"] + argv)
    with pytest.raises(ValueError, match=message):
        resnet_train.check_target_flags(values, object() if has_eval
                                           else None)
    values(["script", "--eval_every=2"])  # the old name, an alias
    assert values.epochs_between_evals == 2.0


# ----------------------------------------------------------------------------
# The script, in subprocesses (each creates its own strategies)

# Runs resnet_train.run() for each argv list (JSON in argv[1]); then
# reports what the ram:// filesystem (in-process, a stand-in for gs://)
# holds, and the error of a run expected to fail.
RUNNER = """
import json, sys
import tensorflow as tf
from absl import flags
from tpu_scripts.resnet import train as resnet_train
report = {"results": [], "error": None, "ram": []}
for argv in json.loads(sys.argv[1]):
    values = flags.FlagValues()
    resnet_train.define_flags(values)
    values(["resnet_train"] + argv)
    try:
        report["results"].append(resnet_train.run(values))
    except (tf.errors.InvalidArgumentError, ValueError) as e:  # DataError
        report["error"] = getattr(e, "message", str(e))
    if not report["ram"] and tf.io.gfile.exists("ram://bucket/run"):
        report["ram"] = sorted(tf.io.gfile.glob("ram://bucket/run/*"))
        with tf.io.gfile.GFile("ram://bucket/run/results.json") as f:
            report["ram_results"] = json.load(f)
print("REPORT " + json.dumps(report, default=str))
"""


def start(runs, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(runs)], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def report_of(process):
    try:
        out, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the script took longer than {TIMEOUT} s (a hang?)")
    assert process.returncode == 0, out[-3000:]
    line = [x for x in out.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):]), out


def small_run(**overrides):
    values = dict(model="small_resnet", small_resnet_widths="4,8",
                  small_resnet_blocks=1, image_size=16, optimizer="lars",
                  learning_rate=1.0, warmup_epochs=0.0, global_batch_size=8,
                  steps_per_loop=3, seed=1, track_trust_ratios=False)
    values.update(overrides)
    return [f"--{k}" if v is True else f"--{k}={v}"
            for k, v in values.items()]


def script_runs():
    """One process (each start costs ~5 s of imports): TFRecords on 2
    replicas into ram:// (gs://-style) with a target never reached; a bad
    training shard on 2 replicas (an error, no hang); synthetic data with a
    target reached at the first evaluation. Run as a background job, on its
    own copy of the shards."""
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="keras_lamb_imagenet_"))
    (tmp_path / "shards").mkdir()
    shards = write_shards(str(tmp_path / "shards"))
    bad = shard_with(tmp_path, imagenet_tfrecords.make_example(
        b"\xff\xd8\xff not a jpeg", 1, 8, 8))
    tfrecords = small_run(
        train_files=f"{shards}/train-00000-of-00004,{shards}/train-0000[1-3]*",
        eval_files=f"{shards}/validation-*", num_classes=NUM_CLASSES,
        num_cpu_devices=2, strategy="mirrored", train_steps=6,
        epochs_between_evals=1, model_dir="ram://bucket/run",
        target_accuracy=1.0,  # 11 random labels of 32 classes: never
    )
    broken = small_run(
        train_files=bad, num_classes=NUM_CLASSES, num_cpu_devices=2,
        strategy="mirrored", train_steps=3, model_dir=tmp_path / "broken",
    )
    reached = small_run(
        synthetic_data=True, num_classes=2, num_train_examples=32,
        num_eval_examples=40, train_steps=12, epochs_between_evals=1,
        target_accuracy=0.01, model_dir=tmp_path / "reached",
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    report, out = report_of(start([tfrecords, broken, reached], cwd))
    return tmp_path, bad, cwd, report, out


SCRIPT_RUNS = background("imagenet_script", script_runs, seconds=38)


@pytest.mark.background("imagenet_script")
def test_script_on_tfrecords_synthetic_data_and_target_accuracy():
    tmp_path, bad, cwd, report, out = SCRIPT_RUNS.result()

    # TFRecords, 2 replicas: 3 steps per epoch, evaluations at steps 3, 6;
    # the target is not reached, so the run goes to the end.
    results = report["results"][0]
    assert "2 replicas; global batch 8, 4 per replica" in out
    assert "24 training examples in 4 files, 11 evaluation examples" in out
    assert results["steps"] == 6 and results["steps_per_epoch"] == 3
    assert results["eval_examples"] == EVAL
    assert [e["step"] for e in results["evaluations"]] == [3, 6]
    assert 0.0 <= results["top1"] < 1.0
    assert not results["stopped_early"] and results["train_steps"] == 6
    assert results["target_reached"] is False
    assert results["target_reached_at"] is None
    assert np.isfinite(results["train"]["loss"])
    # Everything went to ram://, nothing into a local folder.
    ram = {p.rsplit("/", 1)[-1] for p in report["ram"]}
    assert {"results.json", "checkpoint", "train", "eval"} <= ram, ram
    assert report["ram_results"]["top1"] == results["top1"]
    assert os.listdir(cwd) == []
    # The bad training shard: a clear error, raised (no hang).
    assert report["error"] is not None and (
        f"--train_files: {bad}, record 2: image/encoded does not decode as "
        "a JPEG" in report["error"])
    assert not (tmp_path / "broken" / "results.json").exists()

    # Synthetic: 4 steps per epoch; 2 classes, so top-1 > 0.01 at the first
    # evaluation, which stops the run after 4 of its 12 steps.
    early = report["results"][1]
    assert early["data"] == "synthetic" and early["steps_per_epoch"] == 4
    assert early["stopped_early"] and early["steps"] == 4
    assert early["train_steps"] == 12 and early["target_reached"] is True
    at = early["target_reached_at"]
    assert (at["step"], at["epoch"]) == (4, 1.0) and at["wall_seconds"] > 0
    assert at["accuracy"] >= 0.01 and early["eval_examples"] == 40
    assert [e["step"] for e in early["evaluations"]] == [4]
    assert early["images_per_second"] > 0
    assert early["steady_images_per_second"] > 0  # loop 2 of 2
    with open(tmp_path / "reached" / "results.json") as f:
        assert json.load(f)["target_reached_at"]["step"] == 4
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert "target 0.01 reached at epoch 1.00 (step 4)" in out
    assert "target 1.0 not reached" in out
