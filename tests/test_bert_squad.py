"""SQuAD v1.1: the official metric, features and answers, and the
fine-tuning script end to end (tpu_scripts.bert.squad, tpu_scripts/bert/finetune_squad.py)."""

import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")
pytest.importorskip("tensorflow_text")

import keras  # noqa: E402
from absl import flags  # noqa: E402

from tpu_scripts.bert import data as bert_data  # noqa: E402
from tpu_scripts.bert import finetune_squad  # noqa: E402
from tpu_scripts.bert import models as bert_models  # noqa: E402
from tpu_scripts.bert import squad as bert_squad  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("tpu_scripts need the TensorFlow backend",
                allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
SQUAD = os.path.join(HERE, "fixtures", "squad_tiny.json")
CORPUS = os.path.join(HERE, "fixtures", "tiny_corpus.txt")
NANO = os.path.join(HERE, "fixtures", "bert_nano.json")


@pytest.mark.parametrize("prediction, truths, em, f1", [
    ("Denver Broncos", ["Denver Broncos"], 1.0, 1.0),
    # lowercase, punctuation, articles and whitespace are normalised away
    ("the  Denver broncos!", ["Denver Broncos"], 1.0, 1.0),
    ("An apple.", ["apple"], 1.0, 1.0),
    # partial overlap: precision 1, recall 1/2 -> F1 2/3
    ("Denver", ["Denver Broncos"], 0.0, 2 / 3),
    # precision 1/3, recall 1 -> F1 1/2
    ("the Carolina Panthers team", ["Panthers"], 0.0, 0.5),
    ("blue", ["red"], 0.0, 0.0),
    ("", ["red"], 0.0, 0.0),
    # the maximum over the ground truths
    ("Saturday", ["on Saturday", "Saturday"], 1.0, 1.0),
])
def test_metric_on_known_pairs(prediction, truths, em, f1):
    assert max(bert_squad.exact_match_score(prediction, t)
               for t in truths) == em
    assert max(bert_squad.f1_score(prediction, t)
               for t in truths) == pytest.approx(f1)


def test_aggregate_metric_counts_missing_predictions_as_zero():
    examples = [
        bert_squad.SquadExample("a", "q", "c", ["Denver Broncos"], 0),
        bert_squad.SquadExample("b", "q", "c", ["Denver Broncos"], 0),
        bert_squad.SquadExample("c", "q", "c", ["red"], 0),
    ]
    metrics = bert_squad.squad_v1_metrics({"a": "the Denver Broncos",
                                           "b": "Denver"}, examples)
    assert metrics["exact_match"] == pytest.approx(100 / 3)
    assert metrics["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert metrics["missing"] == 1 and metrics["count"] == 3


@pytest.fixture(scope="module")
def vocabulary():
    documents = bert_data.read_documents([CORPUS])
    return bert_data.build_vocabulary(documents, 400)


def test_features_map_answers_back_to_the_context(vocabulary):
    examples = bert_squad.read_squad_json(SQUAD)
    tokenizer = bert_data.make_tokenizer(vocabulary)
    # Short windows: long contexts are split with a stride.
    arrays, meta = bert_squad.make_features(
        examples, tokenizer, vocabulary, max_seq_length=48, doc_stride=8,
        max_query_length=16, training=True)
    n = len(arrays["input_ids"])
    assert n > len(examples)  # several windows per context
    assert arrays["input_ids"].shape == (n, 48)
    checked = 0
    for i in range(n):
        s, e = arrays["start_positions"][i], arrays["end_positions"][i]
        if s == 0:
            assert e == 0  # the answer is outside this window
            continue
        assert arrays["segment_ids"][i][s] == 1 and e >= s
        spans = meta[i]["spans"]
        example = examples[meta[i]["example_index"]]
        text = example.context[spans[s][0]:spans[e][1]]
        assert bert_squad.normalize_answer(text) == (
            bert_squad.normalize_answer(example.answers[0]))
        checked += 1
    assert checked >= len(examples)
    # Perfect logits recover every answer exactly (one window each here).
    arrays, meta = bert_squad.make_features(
        examples, tokenizer, vocabulary, max_seq_length=320,
        max_query_length=64, training=True)
    assert len(arrays["input_ids"]) == len(examples)
    start = np.full(arrays["input_ids"].shape, -10.0, np.float32)
    end = start.copy()
    rows = np.arange(len(examples))
    start[rows, arrays["start_positions"]] = 10.0
    end[rows, arrays["end_positions"]] = 10.0
    answers = bert_squad.best_answers(examples, meta, start, end)
    assert bert_squad.squad_v1_metrics(answers, examples)["exact_match"] == (
        100.0)


def test_finetune_squad_end_to_end(vocabulary, tmp_path):
    vocab_file = str(tmp_path / "vocab.txt")
    bert_data.write_vocabulary(vocabulary, vocab_file)
    # A pre-training checkpoint as bert/pretrain.py writes one.
    config = bert_models.load_bert_config(
        NANO, vocabulary_size=len(vocabulary))
    pretrainer = bert_models.BertPretrainer(
        bert_models.build_backbone(config))
    prefix = tf.train.Checkpoint(model=pretrainer).save(
        str(tmp_path / "pretrained" / "ckpt"))
    fv = flags.FlagValues()
    finetune_squad.define_flags(fv)
    model_dir = tmp_path / "squad"
    fv(["finetune_squad", f"--train_file={SQUAD}", f"--predict_file={SQUAD}",
        f"--vocab_file={vocab_file}", f"--bert_config={NANO}",
        f"--init_checkpoint={prefix}", "--max_seq_length=64",
        "--doc_stride=16", "--max_query_length=16", "--global_batch_size=4",
        "--train_steps=4", "--steps_per_loop=2", "--learning_rate=1e-3",
        f"--model_dir={model_dir}"])
    lines = []
    results = finetune_squad.run(fv, log=lambda *a, **k: lines.append(a[0]))
    assert any(line.startswith("Encoder initialised from") for line in lines)
    assert results["count"] == 9 and results["missing"] == 0
    assert 0 <= results["exact_match"] <= results["f1"] <= 100
    assert results["train_steps"] == 4
    assert np.isfinite(results["train"]["loss"])
    predictions = json.load(open(model_dir / "predictions.json"))
    ids = {e.qas_id for e in bert_squad.read_squad_json(SQUAD)}
    assert set(predictions) == ids
    saved = json.load(open(model_dir / "results.json"))
    assert saved["f1"] == pytest.approx(results["f1"])
