"""BERT pre-training on the JAX engine (`tpu_scripts/bert/pretrain.py` with
`KERAS_BACKEND=jax`) and SQuAD fine-tuning, on 8 virtual CPU devices:
`test_jax_backend.py::test_jax_engine_bert` runs this module.

The records are TFRecords read with `tf.data` on the host (TensorFlow
installed; the engine and the model run on JAX):

- data parallel over 8 devices, and a 4x2 (batch, model) mesh whose
  `LayoutMap` shards the attention heads, feed-forward units and token
  embedding, train as one device does (dropout on, accumulation);
- a SIGTERM and a restart end bit for bit where an uninterrupted run does,
  dropout masks included;
- phase 2 starts from phase 1's weights (`--init_checkpoint`), and so does
  SQuAD fine-tuning, whose predictions are gathered from the devices.
"""

import os
import signal

import numpy as np
import pytest

from conftest import jax_device_count

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "fixtures", "tiny_corpus.txt")
NANO = os.path.join(HERE, "fixtures", "bert_nano.json")
DEVICES = 8


pytestmark = [
    pytest.mark.skipif(
        jax_device_count() < DEVICES,
        reason="needs the JAX backend with 8 devices; run by "
        "test_jax_backend.py::test_jax_engine_bert"),
]
pytest.importorskip("tensorflow_text")  # the records' tokenizer


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from tpu_scripts.bert import data as bert_data

    seq64 = str(tmp_path_factory.mktemp("bert") / "seq64")
    bert_data.create_pretraining_data(
        CORPUS, seq64, vocabulary_size=400, max_seq_length=64,
        max_predictions_per_seq=10, log=lambda *a: None, dupe_factor=5,
        random_seed=1)
    return seq64


def bert_flags(records, **overrides):
    values = dict(
        input_files=os.path.join(records, "*.tfrecord"),
        vocab_file=os.path.join(records, "vocab.txt"), bert_config=NANO,
        max_seq_length=64, max_predictions_per_seq=10, global_batch_size=16,
        gradient_accumulation_steps=2, train_steps=10, learning_rate=0.05,
        warmup_steps=2, dropout=0.1, steps_per_loop=5, seed=0,
        in_memory=True, track_trust_ratios=False,
    )
    values.update(overrides)
    from absl import flags

    from tpu_scripts.bert import pretrain

    fv = flags.FlagValues()
    pretrain.define_flags(fv)
    fv(["pretrain"] + [f"--{k}={v}" for k, v in values.items()])
    return fv


def pretrain(records, log=None, **overrides):
    from tpu_scripts.bert import pretrain as bert_pretrain

    lines = [] if log is None else log
    return bert_pretrain.train(bert_flags(records, **overrides),
                               log=lambda *a, **k: lines.append(str(a[0])))


def trainable(loop):
    return [np.asarray(v.value) for v in loop.model.trainable_variables]


@pytest.fixture(scope="module")
def one_device(records, tmp_path_factory):
    return pretrain(records, strategy="default",
                    model_dir=tmp_path_factory.mktemp("one") / "run")


def test_data_and_model_parallel_train_as_one_device(records, tmp_path,
                                                     one_device):
    one, one_results = one_device
    assert one_results["engine"] == "jax" and one_results["num_replicas"] == 1
    data, _ = pretrain(records, strategy="data_parallel",
                       model_dir=tmp_path / "dp")
    lines = []
    model, results = pretrain(records, lines, strategy="data_parallel",
                              model_parallel=2, model_dir=tmp_path / "mp")
    assert results["num_replicas"] == 4
    assert any("4x2 mesh" in line for line in lines), lines
    kernels = {v.path: tuple(v.value.sharding.spec)
               for v in model.model.trainable_variables}
    assert kernels["transformer_layer_0/feedforward_intermediate_dense/"
                   "kernel"] == (None, "model")
    assert kernels["transformer_layer_0/self_attention_layer/query/"
                   "kernel"] == (None, "model", None)
    assert kernels["token_embedding/embeddings"] == (None, "model")
    # The same dropout masks, the same sums in another order.
    for name, loop in (("data parallel", data), ("model parallel", model)):
        for a, b in zip(trainable(one), trainable(loop)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6,
                                       err_msg=name)
    assert results["train"]["loss"] == pytest.approx(
        one_results["train"]["loss"], rel=1e-5)


def test_sigterm_and_restart_end_bit_for_bit_with_dropout(records, tmp_path,
                                                          one_device):
    from tpu_scripts import run_state

    model_dir = tmp_path / "run"
    lines = []

    def log(line):  # SIGTERM during the second loop of 5 steps
        lines.append(line)
        if line.startswith("step 5/10"):
            os.kill(os.getpid(), signal.SIGTERM)

    from tpu_scripts.bert import pretrain as bert_pretrain

    with pytest.raises(run_state.Preempted):
        bert_pretrain.train(
            bert_flags(records, strategy="default", model_dir=model_dir,
                       save_checkpoints_steps=100),
            log=lambda *a, **k: log(str(a[0])))
    assert run_state.checkpoint_step(str(model_dir)) == 5, lines
    resumed, results = pretrain(records, strategy="default",
                                model_dir=model_dir)
    assert results["optimizer_updates"] == 10
    one, one_results = one_device
    for a, b in zip(trainable(one), trainable(resumed)):
        np.testing.assert_array_equal(b, a)
    assert results["train"] == one_results["train"]


def test_phase_2_starts_from_phase_1(records, tmp_path, one_device):
    from tpu_scripts.bert import models as bert_models
    from tpu_scripts.bert import pretrain as bert_pretrain

    one, one_results = one_device
    phase1 = one_results["flags"]["model_dir"]
    fv = bert_flags(records)
    plan = bert_pretrain.plan_hyperparameters(fv)
    model_fn, _ = bert_pretrain.build_model_fn(fv, plan)
    fresh = model_fn()
    loaded = bert_models.load_pretrained_weights(fresh, phase1)
    assert loaded.endswith(os.path.join("checkpoints", "10"))
    for a, b in zip(trainable(one), [np.asarray(v.value) for v in
                                     fresh.trainable_variables]):
        np.testing.assert_array_equal(b, a)
    lines = []
    _, results = pretrain(records, lines, strategy="default",
                          init_checkpoint=phase1, phase=2, train_steps=4,
                          model_dir=tmp_path / "phase2")
    assert results["initialised_from"] == loaded
    assert any(line.startswith("Initialised the model from") for line in
               lines)


def test_squad_fine_tuning_on_jax_from_a_jax_pre_training(records, tmp_path,
                                                          one_device):
    """SQuAD v1.1 fine-tuning on JAX (data parallel over 8 devices), its
    encoder from the JAX pre-training run: predictions for every question
    of the file, gathered from the devices."""
    import json

    from absl import flags

    from tpu_scripts.bert import finetune_squad
    from tpu_scripts.bert import squad as bert_squad

    squad = os.path.join(HERE, "fixtures", "squad_tiny.json")
    _, pretrained = one_device
    fv = flags.FlagValues()
    finetune_squad.define_flags(fv)
    model_dir = tmp_path / "squad"
    fv(["finetune_squad", f"--train_file={squad}", f"--predict_file={squad}",
        f"--vocab_file={os.path.join(records, 'vocab.txt')}",
        f"--bert_config={NANO}",
        f"--init_checkpoint={pretrained['flags']['model_dir']}",
        "--max_seq_length=64", "--doc_stride=16", "--max_query_length=16",
        "--global_batch_size=8", "--predict_batch_size=8",
        "--train_steps=4", "--steps_per_loop=2", "--learning_rate=1e-3",
        "--strategy=data_parallel", f"--model_dir={model_dir}"])
    lines = []
    results = finetune_squad.run(fv, log=lambda *a, **k: lines.append(a[0]))
    assert any(line.startswith("Encoder initialised from") for line in lines)
    assert results["engine"] == "jax" and results["num_replicas"] == DEVICES
    assert results["count"] == 9 and results["missing"] == 0
    assert 0 <= results["exact_match"] <= results["f1"] <= 100
    with open(model_dir / "predictions.json") as f:
        predictions = json.load(f)
    assert set(predictions) == {e.qas_id for e in
                                bert_squad.read_squad_json(squad)}
