"""Issue 12: restarts, reruns, preemption and bad flags never lose or corrupt
a result. One regression test (or more) per numbered item of the issue; the
gs://-style paths use TensorFlow's in-process `ram://` filesystem."""

import json
import os
import signal
import time
import uuid

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")
pytest.importorskip("tensorflow_text")

import keras  # noqa: E402
from absl import flags  # noqa: E402

from test_tpu_distributed import (  # noqa: E402
    checkpoint_values, finish, small_run_flags, start)
from conftest import (  # noqa: E402
    free_ports, read_until, write_tiny_fashion_mnist)
from tpu_scripts import run_state  # noqa: E402
from tpu_scripts.bert import data as bert_data  # noqa: E402
from tpu_scripts.bert import finetune_squad  # noqa: E402
from tpu_scripts.bert import models as bert_models  # noqa: E402
from tpu_scripts.bert import pretrain as bert_pretrain  # noqa: E402
from tpu_scripts.bert import squad as bert_squad  # noqa: E402
from tpu_scripts.bert import sweep_batch_size as bert_sweep  # noqa: E402
from tpu_scripts.resnet import sweep_batch_size as resnet_sweep  # noqa: E402
from tpu_scripts.resnet import train as resnet_train  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("tpu_scripts need the TensorFlow backend",
                allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "tpu_scripts", "resnet", "train.py")
CORPUS = os.path.join(HERE, "fixtures", "tiny_corpus.txt")
SQUAD = os.path.join(HERE, "fixtures", "squad_tiny.json")
NANO = os.path.join(HERE, "fixtures", "bert_nano.json")


def ram_dir(name):
    return f"ram://{name}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_tiny_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def parse(module, argv):
    values = flags.FlagValues()
    module.define_flags(values)
    values(["script"] + argv)
    return values


def resnet_flags(data_dir, **overrides):
    return parse(resnet_train, small_run_flags(data_dir, **overrides))


# ----------------------------------------------------------------------------
# Item 1: SQuAD logits of every worker under multi_worker_mirrored.

SQUAD_WORKER = """
import numpy as np
import tensorflow as tf
from tpu_scripts import distribute
from tpu_scripts.bert import squad as bert_squad

strategy = distribute.get_strategy("multi_worker_mirrored")
ids = np.arange(1, 41, dtype=np.int32).reshape(10, 4)
arrays = dict(input_ids=ids, input_mask=np.ones_like(ids),
              segment_ids=np.zeros_like(ids),
              feature_index=np.arange(10, dtype=np.int32))

def model(inputs, training):
    x = tf.cast(inputs["input_ids"], tf.float32)
    return {"start_logits": x, "end_logits": -x}

class Loop:  # what predict_logits reads of the TensorFlow trainer
    pass

loop = Loop()
loop.strategy, loop.model = strategy, model
start, end = bert_squad.predict_logits(loop, arrays, 4)
missing = [i for i in range(10) if not np.array_equal(start[i], ids[i])
           or not np.array_equal(end[i], -ids[i])]
print("rows without their logits:", missing)
assert not missing
"""


def test_squad_logits_cover_the_features_of_every_worker():
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [start(["-c", SQUAD_WORKER], TF_CONFIG=json.dumps({
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": i}})) for i in range(2)]
    for out in finish(processes):
        assert "rows without their logits: []" in out


# ----------------------------------------------------------------------------
# Items 2 and 9: flags are checked before anything is built.


@pytest.mark.parametrize("argv, message", [
    # --eval_every is an alias of --epochs_between_evals.
    (["--eval_every=-1"], "--epochs_between_evals must be >= 0"),
    (["--checkpoint_every=-8"], "--checkpoint_every must be >= 0"),
    (["--checkpoint_every_minutes=-1"], "--checkpoint_every_minutes must"),
    (["--epochs=0"], "--epochs must be positive"),
    (["--train_steps=-5"], "--train_steps must be >= 0"),
    (["--optimizer=lamb", "--clip_trust_ratio"],
     "--clip_trust_ratio must be false unless --optimizer=lars"),
    (["--steps_per_loop=0"], "--steps_per_loop must be >= 1"),
])
def test_resnet_flags_out_of_range_are_refused(argv, message):
    with pytest.raises(run_state.FlagError, match=message):
        resnet_train.validate_flags(parse(resnet_train, argv))


@pytest.mark.parametrize("module, argv, message", [
    (bert_pretrain, ["--input_files=x", "--save_checkpoints_steps=-1"],
     "--save_checkpoints_steps must be >= 0"),
    (bert_pretrain, ["--input_files=x", "--eval_every_steps=-2"],
     "--eval_every_steps must be >= 0"),
    (bert_pretrain, ["--input_files=x", "--train_steps=-3"],
     "--train_steps must be >= 1"),
    (finetune_squad, ["--vocab_file=v", "--num_train_epochs=0"],
     "--num_train_epochs must be positive"),
    (finetune_squad, ["--vocab_file=v", "--train_steps=-1"],
     "--train_steps must be >= 0"),
])
def test_bert_flags_out_of_range_are_refused(module, argv, message):
    with pytest.raises(run_state.FlagError, match=message):
        module.validate_flags(parse(module, argv))


def test_help_texts_print_no_doubled_percent_signs():
    for module in (bert_pretrain, finetune_squad, resnet_train):
        values = flags.FlagValues()
        module.define_flags(values)
        for name in values:
            assert "%%" not in values[name].help, (module.__name__, name)


# ----------------------------------------------------------------------------
# Items 3, 4 and 8: restart, rerun and changed flags of the ResNet script;
# a checkpoint every epoch by default; results over every segment. The run
# lives on ram:// as it would on gs://.


def test_resnet_restart_rerun_and_changed_flags(idx_dir):
    model_dir = ram_dir("resnet")
    common = dict(train_steps=0, epochs=2, steps_per_loop=2,
                  model_dir=model_dir, track_trust_ratios=False)
    quiet = dict(log=lambda *a, **k: None)
    first = resnet_train.run(resnet_flags(idx_dir, **common), **quiet)
    assert first["steps"] == 8 and first["complete"]
    # 4 steps per epoch: the epoch checkpoint and the final one.
    names = tf.io.gfile.listdir(model_dir)
    assert {"ckpt-4.index", "ckpt-8.index"} <= set(names), names
    results = os.path.join(model_dir, "results.json")
    with tf.io.gfile.GFile(results) as f:
        saved = f.read()
    lines = []
    again = resnet_train.run(resnet_flags(idx_dir, **common),
                                log=lambda *a, **k: lines.append(a[0]))
    assert again == json.loads(saved)
    assert any("is complete (step 8)" in line for line in lines)
    with tf.io.gfile.GFile(results) as f:
        assert f.read() == saved  # item 4: a rerun does not overwrite
    with pytest.raises(run_state.ChangedFlagsError, match=(
            r"(?s)--epochs: was 2.0, now 4.0.*--global_batch_size: was 16, "
            r"now 8.*--allow_changed_flags")):
        resnet_train.run(resnet_flags(
            idx_dir, **dict(common, epochs=4, global_batch_size=8)), **quiet)
    extended = resnet_train.run(resnet_flags(
        idx_dir, **dict(common, epochs=3, allow_changed_flags=True)), **quiet)
    assert extended["steps"] == 12 and extended["epochs"] == 3.0
    assert extended["examples_seen"] == 12 * 16
    assert [(s["start_step"], s["end_step"])
            for s in extended["segments"]] == [(0, 8), (8, 12)]
    assert extended["train_seconds"] == pytest.approx(
        sum(s["train_seconds"] for s in extended["segments"]))
    assert extended["train_seconds"] > first["train_seconds"]


def test_time_based_checkpoints_every_loop(idx_dir, tmp_path):
    # --checkpoint_every_minutes tiny: a save at every loop boundary.
    model_dir = str(tmp_path / "timed")
    saves = []
    resnet_flags_ = resnet_flags(
        idx_dir, train_steps=3, steps_per_loop=1, checkpoint_every=100,
        checkpoint_every_minutes=1e-9, model_dir=model_dir,
        track_trust_ratios=False)
    record_checkpointed = run_state.RunRecord.checkpointed

    def spy(self, step, *args):
        saves.append(step)
        return record_checkpointed(self, step, *args)

    run_state.RunRecord.checkpointed = spy
    try:
        resnet_train.run(resnet_flags_, log=lambda *a, **k: None)
    finally:
        run_state.RunRecord.checkpointed = record_checkpointed
    assert saves[:2] == [1, 2] and saves[-1] == 3


def test_sigterm_mid_epoch_then_restart_continues_bit_identically(
        idx_dir, tmp_path):
    # 8 steps per epoch, 2 epochs, one step per loop, checkpoints only per
    # epoch and at the end: a SIGTERM after step 2 must save where it is.
    argv = small_run_flags(
        idx_dir, global_batch_size=8, train_steps=16, steps_per_loop=1,
        deterministic=True, augmentation="pad_crop_flip",
        track_trust_ratios=False)
    straight, victim_dir = str(tmp_path / "straight"), str(tmp_path / "term")
    uninterrupted = start([SCRIPT] + argv + [f"--model_dir={straight}"])
    victim = start([SCRIPT] + argv + [f"--model_dir={victim_dir}"])
    read_until(victim, "step 2/16")
    victim.send_signal(signal.SIGTERM)
    out, _ = victim.communicate(timeout=240)
    assert victim.returncode == run_state.PREEMPTED_EXIT_CODE, out[-3000:]
    saved_step = run_state.checkpoint_step(victim_dir)
    assert 2 <= saved_step < 16
    assert f"Preempted: saved a checkpoint at step {saved_step}" in out
    assert not tf.io.gfile.exists(os.path.join(victim_dir, "results.json"))
    resumed = start([SCRIPT] + argv + [f"--model_dir={victim_dir}"])
    outputs = finish([uninterrupted, resumed])
    assert f"at step {saved_step}." in outputs[1]
    a, b = checkpoint_values(straight), checkpoint_values(victim_dir)
    assert a.keys() == b.keys() and len(a) > 10
    for key in set(a) - {"save_counter/.ATTRIBUTES/VARIABLE_VALUE"}:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    results = run_state.read_json(os.path.join(victim_dir, "results.json"))
    assert [(s["start_step"], s["end_step"])
            for s in results["segments"]] == [(0, saved_step),
                                              (saved_step, 16)]


# ----------------------------------------------------------------------------
# BERT: items 3 (accumulation changed), 4 (--init_checkpoint), 6, 9.


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_reliability")
    out = str(root / "seq64")
    bert_data.create_pretraining_data(
        CORPUS, out, vocabulary_size=400, max_seq_length=64,
        max_predictions_per_seq=10, dupe_factor=2, random_seed=1,
        num_shards=2, log=lambda *a: None)
    return dict(root=root, dir=out, vocab=os.path.join(out, "vocab.txt"))


def bert_flags(records, **overrides):
    args = dict(
        input_files=os.path.join(records["dir"], "*.tfrecord"),
        vocab_file=records["vocab"], bert_config=NANO, max_seq_length=64,
        max_predictions_per_seq=10, global_batch_size=8, train_steps=2,
        warmup_steps=1, learning_rate=1e-3, steps_per_loop=2,
        in_memory=True)
    args.update(overrides)
    return parse(bert_pretrain, [f"--{k}={v}" for k, v in args.items()
                                    if v is not None])


def test_bert_rerun_changed_accumulation_and_init_checkpoint(records):
    model_dir = str(records["root"] / "run")
    quiet = dict(log=lambda *a, **k: None)
    _, first = bert_pretrain.train(bert_flags(records,
                                                 model_dir=model_dir), **quiet)
    assert first["optimizer_updates"] == 2 and first["complete"]
    loop, again = bert_pretrain.train(
        bert_flags(records, model_dir=model_dir), **quiet)
    assert loop is None and again == first
    with pytest.raises(run_state.ChangedFlagsError,
                       match="--gradient_accumulation_steps: was None, now 2"):
        bert_pretrain.train(bert_flags(
            records, model_dir=model_dir, gradient_accumulation_steps=2),
            **quiet)
    with pytest.raises(run_state.FlagError, match="--init_checkpoint"):
        bert_pretrain.train(bert_flags(
            records, model_dir=model_dir, init_checkpoint=model_dir), **quiet)


def test_bert_records_checked_against_the_flags(records):
    quiet = dict(log=lambda *a, **k: None)
    with pytest.raises(run_state.FlagError, match=(
            "have 64 tokens and 10 masked positions; the run expects "
            "--max_seq_length=128 and --max_predictions_per_seq=20")):
        bert_pretrain.train(bert_flags(
            records, max_seq_length=128, max_predictions_per_seq=20),
            **quiet)
    # A vocabulary smaller than the ids in the records: a clear error
    # before training (on an accelerator the lookup would give zeros).
    for in_memory in (True, False):
        with pytest.raises(run_state.FlagError,
                           match=r"token id \d+, out of range for the "
                           r"model's vocabulary of 50 \(from --vocab_size"):
            bert_pretrain.train(bert_flags(
                records, vocab_file=None, vocab_size=50,
                in_memory=in_memory), **quiet)


def test_create_pretraining_data_refuses_a_used_output_dir(records, tmp_path):
    out = str(tmp_path / "data")
    common = dict(vocab_file=records["vocab"], max_seq_length=32,
                  max_predictions_per_seq=5, dupe_factor=1,
                  log=lambda *a: None)
    bert_data.create_pretraining_data(CORPUS, out, num_shards=3, **common)
    with pytest.raises(run_state.FlagError,
                       match="--output_dir=.* is not empty.*--overwrite"):
        bert_data.create_pretraining_data(CORPUS, out, num_shards=1,
                                          **common)
    current = bert_data.current_version(out)  # the dataset folder's files
    assert len([n for n in os.listdir(current)
                if n.endswith(".tfrecord")]) == 3
    bert_data.create_pretraining_data(CORPUS, out, num_shards=1,
                                      overwrite=True, **common)
    assert sorted(os.listdir(bert_data.current_version(out))) == [
        "metadata.json", "pretrain-00000-of-00001.tfrecord", "vocab.txt"]


# ----------------------------------------------------------------------------
# Item 5: SQuAD with an unanswered question; reruns.


def test_squad_with_an_unanswered_question_writes_predictions(tmp_path):
    squad = json.load(open(SQUAD))
    paragraph = squad["data"][0]["paragraphs"][0]
    paragraph["qas"].append(dict(id="no-answer", question="Who owns it?",
                                 answers=[]))
    predict_file = str(tmp_path / "predict.json")
    json.dump(squad, open(predict_file, "w"))
    documents = bert_data.read_documents([CORPUS])
    vocab_file = str(tmp_path / "vocab.txt")
    bert_data.write_vocabulary(bert_data.build_vocabulary(documents, 300),
                               vocab_file)
    model_dir = str(tmp_path / "squad")
    argv = [f"--train_file={SQUAD}", f"--predict_file={predict_file}",
            f"--vocab_file={vocab_file}", f"--bert_config={NANO}",
            "--max_seq_length=64", "--doc_stride=32", "--max_query_length=16",
            "--global_batch_size=4", "--train_steps=2", "--steps_per_loop=2",
            f"--model_dir={model_dir}"]
    results = finetune_squad.run(parse(finetune_squad, argv),
                                 log=lambda *a, **k: 0)
    assert results["unanswered"] == 1 and results["count"] == 9
    predictions = json.load(open(os.path.join(model_dir, "predictions.json")))
    assert "no-answer" in predictions and len(predictions) == 10
    lines = []
    again = finetune_squad.run(parse(finetune_squad, argv),
                               log=lambda *a, **k: lines.append(a[0]))
    assert again == results and any("is complete" in x for x in lines)
    examples = [bert_squad.SquadExample("q", "?", "c", [], -1)]
    with pytest.raises(ValueError, match="No question with a ground-truth"):
        bert_squad.squad_v1_metrics({"q": ""}, examples)


# ----------------------------------------------------------------------------
# Item 7: sweeps key runs by every setting. Item 10: gs://-style paths.


def fake_train_one(calls):
    def train(flags_, data_, optimizer, batch_size, multiplier):
        calls.append((optimizer, batch_size, multiplier, flags_.epochs))
        steps = int(flags_.epochs * len(data_[0][0]) // batch_size)
        return dict(optimizer=optimizer, batch_size=batch_size,
                    lr_multiplier=multiplier, peak_lr=0.1 * multiplier,
                    val_accuracy=0.5 + multiplier / 10, test_accuracy=0.4,
                    train_loss=1.0, steps=steps, seconds=1.0)
    return train


def test_sweep_reruns_runs_whose_settings_changed():
    data_dir = write_tiny_fashion_mnist(ram_dir("idx"))  # gs://-style
    out = ram_dir("sweep")

    def sweep(epochs):
        values = parse(resnet_sweep, [
            f"--data_dir={data_dir}", f"--output_dir={out}",
            "--batch_sizes=8,16", "--optimizers=lars", "--lr_multipliers=1,3",
            "--validation_examples=16", f"--epochs={epochs}"])
        return resnet_sweep.run_sweep(values, [], train=fake_train_one(
            calls), log=lambda *a, **k: None)

    calls = []
    sweep(1)
    assert len(calls) == 4
    sweep(1)
    assert len(calls) == 4  # the same settings: nothing to run
    table = sweep(3)
    assert len(calls) == 8 and {c[3] for c in calls[4:]} == {3.0}
    assert "| 8 | 18 |" in table and "epochs=3.0" in table  # 48 * 3 / 8
    with tf.io.gfile.GFile(os.path.join(out, "runs.csv")) as f:
        assert f.read().count("\n") == 9  # header + 8 runs


def test_bert_sweep_runs_are_keyed_by_settings(monkeypatch):
    out = ram_dir("bert_sweep")
    calls = []

    def train_once(cfg, data_, optimizer, learning_rate, batch_size, log):
        calls.append(cfg.epochs)
        return dict(optimizer=optimizer, learning_rate=learning_rate,
                    batch_size=batch_size)

    monkeypatch.setattr(bert_sweep, "train_once", train_once)
    values = flags.FlagValues()
    bert_sweep.define_flags(values)
    values(["sweep", "--text_file=ram://corpus.txt", "--epochs=1"])
    path = os.path.join(out, "runs.jsonl")
    log = bert_sweep.RunLog(path, bert_sweep.run_settings(values))
    log.get_or_run(values, None, "lamb", 1e-2, 32, None)
    same = bert_sweep.RunLog(path, bert_sweep.run_settings(values))
    same.get_or_run(values, None, "lamb", 1e-2, 32, None)
    assert calls == [1.0]
    values.epochs = 2.0
    other = bert_sweep.RunLog(path, bert_sweep.run_settings(values))
    other.get_or_run(values, None, "lamb", 1e-2, 32, None)
    assert calls == [1.0, 2.0] and len(other.all_runs) == 2
    # split_text through tf.io.gfile as well.
    text = ram_dir("text") + "/corpus.txt"
    run_state.write_text(text, open(CORPUS).read())
    paths = bert_sweep.split_text(text, ram_dir("work"), 0.2)
    assert tf.io.gfile.exists(paths["train"])


def test_bert_config_file_without_json_suffix_on_ram(tmp_path):
    path = ram_dir("config") + "/bert_config"
    run_state.write_text(path, open(NANO).read())
    config = bert_models.load_bert_config(path, vocabulary_size=100)
    assert (config.num_layers, config.hidden_dim) == (1, 32)
