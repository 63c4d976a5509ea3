"""BERT pre-training on the shared trainer: training, TensorBoard, resume,
phase 2, gradient accumulation, 2-replica MirroredStrategy, recipes
(tpu_scripts/bert/pretrain.py)."""

import glob
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
pytest.importorskip("keras_hub")
pytest.importorskip("tensorflow_text")

import keras  # noqa: E402
from absl import flags  # noqa: E402

from keras_lamb import recipes  # noqa: E402
from tpu_scripts.bert import data as bert_data  # noqa: E402
from tpu_scripts.bert import models as bert_models  # noqa: E402
from tpu_scripts.bert import pretrain as bert_pretrain  # noqa: E402
from conftest import background  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("tpu_scripts need the TensorFlow backend",
                allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "fixtures", "tiny_corpus.txt")
NANO = os.path.join(HERE, "fixtures", "bert_nano.json")
# Weights after float32 training runs that should agree up to summation
# order (gradient accumulation, 1 vs 2 replicas, resume): one tolerance.
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("bert"))


def make_data(root):
    """Pretraining records of the tiny corpus (seeded: the same records
    each time), sequence length 64 and 128, under `root`."""
    quiet = dict(log=lambda *a: None, dupe_factor=5, random_seed=1)
    seq64 = str(root / "seq64")
    bert_data.create_pretraining_data(
        CORPUS, seq64, vocabulary_size=400, max_seq_length=64,
        max_predictions_per_seq=10, **quiet)
    vocab = os.path.join(seq64, "vocab.txt")
    seq128 = str(root / "seq128")
    bert_data.create_pretraining_data(
        CORPUS, seq128, vocab_file=vocab, max_seq_length=128,
        max_predictions_per_seq=20, **quiet)
    return dict(root=root, seq64=seq64, seq128=seq128, vocab=vocab)


def base_args(data):
    return dict(
        input_files=os.path.join(data["seq64"], "*.tfrecord"),
        vocab_file=data["vocab"], bert_config=NANO, max_seq_length=64,
        max_predictions_per_seq=10, global_batch_size=8, train_steps=20,
        learning_rate=0.1, warmup_steps=2, in_memory=False, dropout=0.0,
        steps_per_loop=5, seed=0,
    )


def make_flags(**args):
    fv = flags.FlagValues()
    bert_pretrain.define_flags(fv)
    fv(["bert_pretrain"] + [f"--{k}={v}" for k, v in args.items()
                            if v is not None])
    return fv


def as_argv(args):
    return [f"--{k}={v}" for k, v in args.items() if v is not None]


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def initial_loss(data, args):
    """Mean loss of a freshly initialised model (same seed) on the data."""
    fv = make_flags(**args)
    plan = bert_pretrain.plan_hyperparameters(fv)
    model_fn, _ = bert_pretrain.build_model_fn(fv, plan)
    keras.utils.set_random_seed(args["seed"])
    records = bert_data.load_records(args["input_files"], 64, 10)
    task = bert_pretrain.BertPretrainingTask(model_fn)
    loss, _ = task.compute_loss(task.build_model(), records, training=False)
    return float(np.mean(loss))


def default_args(data):
    return dict(base_args(data), save_checkpoints_steps=10,
                model_dir=str(data["root"] / "default"),
                eval_files=os.path.join(data["seq64"], "*.tfrecord"))


@pytest.fixture(scope="module")
def default_run(data):
    args = default_args(data)
    results = bert_pretrain.run(make_flags(**args), log=lambda *a, **k: 0)
    return args, results


def test_trains_writes_results_and_tensorboard(data, default_run):
    args, results = default_run
    before = initial_loss(data, args)
    assert results["optimizer_updates"] == 20 and results["num_replicas"] == 1
    assert results["eval"]["loss"] < before - 0.3, (before, results["eval"])
    assert 0 < results["eval"]["mlm_accuracy"] <= 1
    assert results["trust_ratios"]["max"] > 0
    saved = json.load(open(os.path.join(args["model_dir"], "results.json")))
    assert saved["plan"]["optimizer"] == "lamb"
    assert saved["weight_norm"] == pytest.approx(results["weight_norm"])
    assert tf.train.latest_checkpoint(args["model_dir"]).endswith("-20")
    tags = set()
    for path in glob.glob(os.path.join(args["model_dir"], "train", "*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    for tag in ("loss", "mlm_accuracy", "nsp_accuracy", "learning_rate"):
        assert tag in tags, sorted(tags)[:20]
    assert any(t.startswith("trust_ratio/") for t in tags)


def test_resume_after_preemption_continues_exactly(data, default_run):
    args, results = default_run
    # Preempted right after the step-10 checkpoint: a copy of the run's
    # model_dir without the later checkpoint.
    model_dir = str(data["root"] / "preempted")
    shutil.copytree(args["model_dir"], model_dir)
    for path in glob.glob(os.path.join(model_dir, "ckpt-20.*")):
        os.remove(path)
    tf.compat.v1.train.update_checkpoint_state(
        model_dir, os.path.join(model_dir, "ckpt-10"))
    lines = []
    resumed = bert_pretrain.run(
        make_flags(**dict(args, model_dir=model_dir, eval_files=None)),
        log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any(line.startswith("Restored") and "ckpt-10" in line
               for line in lines), lines
    assert resumed["optimizer_updates"] == 20
    # Same batches, optimizer state and schedule as the uninterrupted run.
    assert resumed["weight_norm"] == pytest.approx(results["weight_norm"],
                                                   rel=1e-6)


def test_phase2_loads_phase1_and_changes_sequence_length(data, default_run):
    args, phase1 = default_run
    fv = make_flags(**base_args(data))
    model_fn, _ = bert_pretrain.build_model_fn(
        fv, bert_pretrain.plan_hyperparameters(fv))
    model = model_fn()
    prefix = bert_models.load_pretrained_weights(model, args["model_dir"])
    assert bert_pretrain.weight_norm(model) == pytest.approx(
        phase1["weight_norm"], rel=1e-6)
    phase2 = dict(
        base_args(data), recipe="lamb_64k_32k", phase=2,
        input_files=os.path.join(data["seq128"], "*.tfrecord"),
        max_seq_length=128, max_predictions_per_seq=20, train_steps=3,
        learning_rate=None, warmup_steps=None,
        init_checkpoint=args["model_dir"],
        model_dir=str(data["root"] / "phase2"))
    results = bert_pretrain.run(make_flags(**phase2),
                                   log=lambda *a, **k: 0)
    plan = results["plan"]
    assert (plan["max_seq_length"], plan["max_predictions_per_seq"]) == (
        128, 20)
    # Phase 2 of the 64k/32k recipe: re-warmed from 0 to 4e-3, power 0.5,
    # a fresh optimizer whose clock starts at 0.
    assert plan["learning_rate"] == 4e-3 and plan["decay_power"] == 0.5
    assert results["initialised_from"] == prefix
    assert results["optimizer_updates"] == 3
    assert np.isfinite(results["train"]["loss"])
    assert results["weight_norm"] != pytest.approx(phase1["weight_norm"])


def test_gradient_accumulation_equals_one_large_batch(data):
    # Dropout is off (base_args): 4 micro-batches of 2 then give exactly the
    # mean gradient of the batch of 8 (BERT has no BatchNorm), and the
    # schedule, bias correction and clipping see the same update count.
    common = dict(base_args(data), train_steps=3, warmup_steps=1,
                  steps_per_loop=3, global_batch_size=8, in_memory=True)
    runs = {}
    for k in (1, 4):
        loop, results = bert_pretrain.train(
            make_flags(**dict(common, gradient_accumulation_steps=k)),
            log=lambda *a, **kw: 0)
        assert results["optimizer_updates"] == 3
        assert results["micro_batches"] == 3 * k
        runs[k] = weights(loop.model)
    keras.utils.set_random_seed(0)
    init = weights(loop.task.build_model())
    diff = max(np.abs(a - b).max() for a, b in zip(runs[1], runs[4]))
    assert diff < WEIGHT_ATOL, diff
    # The test can fail: 3 updates move the weights 10^4 times further than
    # the tolerance (a wrong schedule clock or an update per micro-batch
    # would show up at that scale).
    moved = max(np.abs(a - b).max() for a, b in zip(runs[1], init))
    assert moved > 1e4 * WEIGHT_ATOL, moved


def mirrored_run():
    """The default run (module fixture) on 2 replicas, in a subprocess (the
    CPU must be split before TensorFlow initialises, and only one
    MirroredStrategy per process may all-reduce the embeddings' sparse
    gradients), on its own copy of the records; a background job."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="keras_lamb_bert_"))
    out = root / "mirrored"
    argv = as_argv(dict(default_args(make_data(root)), model_dir=str(out),
                        strategy="mirrored", num_cpu_devices=2))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "tpu_scripts.bert.pretrain", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return root, out, proc


MIRRORED = background("bert_mirrored", mirrored_run, seconds=38)


# In place: a move to the end of the session would run the module's
# fixtures (the default run) a second time.
@pytest.mark.background("bert_mirrored", in_place=True)
def test_mirrored_two_replicas_match_one_device(data, default_run):
    args, results = default_run
    root, out, proc = MIRRORED.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    mirrored = json.load(open(out / "results.json"))
    assert mirrored["num_replicas"] == 2
    assert mirrored["optimizer_updates"] == 20
    assert mirrored["eval"]["loss"] < initial_loss(data, args) - 0.3
    # Same global batches: the all-reduced gradient is the one-device one.
    assert mirrored["weight_norm"] == pytest.approx(results["weight_norm"],
                                                    rel=WEIGHT_ATOL)
    assert mirrored["eval"]["loss"] == pytest.approx(
        results["eval"]["loss"], abs=1e-4)
    shutil.rmtree(root, ignore_errors=True)


def test_recipe_plans_and_overrides(data):
    def plan(**args):
        unset = dict(learning_rate=None, warmup_steps=None, train_steps=None,
                     global_batch_size=None, max_seq_length=None,
                     max_predictions_per_seq=None)
        return bert_pretrain.plan_hyperparameters(
            make_flags(**{**base_args(data), **unset, **args}))

    paper = plan(recipe="lamb_paper", global_batch_size=1024,
                 max_seq_length=128)
    _, _, notes = recipes.lamb_bert(1024)
    assert paper["learning_rate"] == notes["peak_learning_rate"]
    assert paper["train_steps"] == notes["total_steps"] == 500_000
    assert paper["warmup_steps"] == notes["warmup_steps"]
    assert paper["max_predictions_per_seq"] == 20
    # Without overrides the optimizer is the recipe's own.
    ours = bert_pretrain.make_optimizer(paper)
    theirs, _, _ = recipes.lamb_bert(1024)
    assert ours.get_config() == theirs.get_config()
    nvidia1 = plan(recipe="nvidia", phase=1)
    assert (nvidia1["global_batch_size"], nvidia1["micro_batch_size"],
            nvidia1["gradient_accumulation_steps"]) == (65536, 512, 128)
    assert (nvidia1["learning_rate"], nvidia1["warmup_steps"],
            nvidia1["train_steps"], nvidia1["decay_power"]) == (
                6e-3, 2001, 7038, 0.5)
    pod2 = plan(recipe="lamb_64k_32k", phase=2, learning_rate=3e-3,
                gradient_accumulation_steps=4)
    assert (pod2["global_batch_size"], pod2["max_seq_length"],
            pod2["max_predictions_per_seq"], pod2["train_steps"]) == (
                32768, 512, 80, 1563)
    assert pod2["learning_rate"] == 3e-3  # explicit flags win
    assert pod2["micro_batch_size"] == 8192
    with pytest.raises(ValueError, match="multiple of"):
        plan(recipe="lamb_paper", global_batch_size=1000,
             max_seq_length=128, gradient_accumulation_steps=3)
