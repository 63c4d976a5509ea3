"""SQuAD v1.1 fine-tuning: data, features, span task, answers and metric.

- `read_squad_json` / `read_squad_tfds`: SQuAD examples from the official
  JSON files or TFDS `squad/v1.1`.
- `make_features`: `[CLS] question [SEP] context window [SEP]` features with
  google-research/bert's sliding window (`doc_stride`) and its "max context"
  rule; every context token keeps the character span it came from, so an
  answer is a slice of the original context.
- `SquadTask`: the start/end cross-entropy for the shared trainer.
- `predict_logits`, `best_answers`: logits on any strategy, then the best
  valid span (n-best start/end, end >= start, at most `max_answer_length`
  tokens), as in google-research/bert's `run_squad.py`.
- `squad_v1_metrics`: exact match and F1 with the official v1.1 evaluation
  script's normalisation (lowercase, drop punctuation, the articles a/an/the
  and extra whitespace; maximum over the ground-truth answers).
"""

import collections
import json
import re
import string

import keras
import numpy as np
from keras import ops

from tpu_scripts import fileio
from tpu_scripts.tasks import Task
from tpu_scripts.run_state import DataError
from tpu_scripts.bert import data as bert_data

SquadExample = collections.namedtuple(
    "SquadExample", ["qas_id", "question", "context", "answers",
                     "answer_start"],
)


# ----------------------------------------------------------------------------
# Reading


def read_squad_json(path):
    """Examples of a SQuAD v1.1 JSON file (`answer_start` of the first
    answer, -1 when there is none). A file that is not valid JSON (e.g.
    truncated) or lacks SQuAD's fields is a `run_state.DataError` naming
    it."""
    try:
        with fileio.GFile(path, "rb") as f:
            dataset = json.loads(f.read())
    except OSError as e:
        raise DataError(f"Cannot read {path}: {e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(
            f"{path} is not valid JSON ({e}); a truncated download? SQuAD "
            "v1.1's files are train-v1.1.json and dev-v1.1.json."
        ) from None
    if not isinstance(dataset, dict) or "data" not in dataset:
        raise DataError(f"{path!r} is not a SQuAD JSON file (no 'data').")
    examples = []
    try:
        for article in dataset["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = [a["text"] for a in qa.get("answers", [])]
                    start = (qa["answers"][0]["answer_start"] if answers
                             else -1)
                    examples.append(SquadExample(
                        qa["id"], qa["question"], context, answers, start
                    ))
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise DataError(
            f"{path} is not a SQuAD v1.1 file: question "
            f"{len(examples)} lacks {e} (expected data / paragraphs / "
            "context, qas / id, question, answers)."
        ) from None
    if not examples:
        raise DataError(f"No questions in {path!r}.")
    return examples


def read_squad_tfds(split, data_dir=None):
    """Examples of TFDS `squad/v1.1` (`train` or `validation`)."""
    import tensorflow_datasets as tfds

    ds = tfds.load("squad/v1.1", split=split, data_dir=data_dir)
    examples = []
    for row in tfds.as_numpy(ds):
        texts = [t.decode("utf-8") for t in row["answers"]["text"]]
        starts = list(row["answers"]["answer_start"])
        examples.append(SquadExample(
            row["id"].decode("utf-8"), row["question"].decode("utf-8"),
            row["context"].decode("utf-8"), texts,
            int(starts[0]) if starts else -1,
        ))
    return examples


# ----------------------------------------------------------------------------
# Features


def _tokenize_context(context, piece_ids):
    """Token ids of `context` and the character span of each token."""
    ids, spans = [], []
    for piece, start, end in bert_data.split_with_offsets(context):
        for token in piece_ids[piece]:
            ids.append(token)
            spans.append((start, end))
    return ids, spans


def _windows(num_tokens, max_tokens, doc_stride):
    """google-research/bert's sliding windows `(start, length)`."""
    windows, start = [], 0
    while True:
        length = min(num_tokens - start, max_tokens)
        windows.append((start, length))
        if start + length >= num_tokens:
            return windows
        start += min(length, doc_stride)


def _is_max_context(windows, index, position):
    """Whether token `position` has the most context (min of left and right
    context, plus a little for long windows) in window `index`."""
    best, best_score = None, None
    for i, (start, length) in enumerate(windows):
        end = start + length - 1
        if not start <= position <= end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best == index


def make_features(examples, tokenizer, vocabulary, max_seq_length=384,
                  doc_stride=128, max_query_length=64, training=False):
    """Features of `examples`: `(arrays, meta)`.

    `arrays`: `input_ids`, `input_mask`, `segment_ids` `[n, max_seq_length]`,
    `start_positions`, `end_positions` (0, the `[CLS]` position, when the
    window does not hold the answer) and `feature_index` `[n]`. `meta`: per
    feature, `example_index`, `spans` (context position -> character span
    in the context) and `max_context` (the positions whose window is the one
    with the most context around them; only those may start an answer).
    """
    index = {t: i for i, t in enumerate(vocabulary)}
    cls_id, sep_id = index[bert_data.CLS], index[bert_data.SEP]
    pieces = sorted({
        piece for e in examples
        for piece, _, _ in bert_data.split_with_offsets(e.context)
    })
    piece_ids = dict(zip(pieces, bert_data.tokenize_lines(tokenizer, pieces)))
    questions = bert_data.tokenize_lines(
        tokenizer, [e.question for e in examples]
    )
    arrays = collections.defaultdict(list)
    meta = []
    for example_index, (example, question) in enumerate(
            zip(examples, questions)):
        question = question[:max_query_length]
        doc_ids, doc_spans = _tokenize_context(example.context, piece_ids)
        if not doc_ids:
            continue
        answer = None
        if training and example.answer_start >= 0 and example.answers:
            a_start = example.answer_start
            a_end = a_start + len(example.answers[0])
            inside = [i for i, (s, e) in enumerate(doc_spans)
                      if e > a_start and s < a_end]
            if inside:
                answer = (inside[0], inside[-1])
        max_tokens = max_seq_length - len(question) - 3
        if max_tokens < 1:
            raise ValueError(
                f"max_seq_length={max_seq_length} leaves no room for the "
                f"context after a {len(question)}-token question."
            )
        windows = _windows(len(doc_ids), max_tokens, doc_stride)
        for w, (start, length) in enumerate(windows):
            ids = [cls_id, *question, sep_id,
                   *doc_ids[start:start + length], sep_id]
            offset = len(question) + 2
            segment = [0] * offset + [1] * (length + 1)
            pad = max_seq_length - len(ids)
            spans = {offset + i: doc_spans[start + i] for i in range(length)}
            max_context = {
                offset + i for i in range(length)
                if _is_max_context(windows, w, start + i)
            }
            start_position = end_position = 0
            if answer and start <= answer[0] and answer[1] < start + length:
                start_position = offset + answer[0] - start
                end_position = offset + answer[1] - start
            arrays["input_ids"].append(ids + [0] * pad)
            arrays["input_mask"].append([1] * len(ids) + [0] * pad)
            arrays["segment_ids"].append(segment + [0] * pad)
            arrays["start_positions"].append(start_position)
            arrays["end_positions"].append(end_position)
            arrays["feature_index"].append(len(meta))
            meta.append(dict(example_index=example_index, spans=spans,
                             max_context=max_context))
    arrays = {k: np.asarray(v, dtype=np.int32) for k, v in arrays.items()}
    return arrays, meta


# ----------------------------------------------------------------------------
# Task and prediction


class SquadTask(Task):
    """Mean of the start and end cross-entropies, per feature."""

    MODEL_INPUTS = ("input_ids", "input_mask", "segment_ids")

    def __init__(self, model_fn):
        self.model_fn = model_fn

    def build_model(self):
        return self.model_fn()

    def build_metrics(self):
        return {
            "start_accuracy": keras.metrics.SparseCategoricalAccuracy(
                "start_accuracy"
            ),
            "end_accuracy": keras.metrics.SparseCategoricalAccuracy(
                "end_accuracy"
            ),
        }

    def compute_loss(self, model, batch, training):
        outputs = model({k: batch[k] for k in self.MODEL_INPUTS},
                        training=training)
        loss = 0.5 * (
            ops.sparse_categorical_crossentropy(
                batch["start_positions"],
                ops.cast(outputs["start_logits"], "float32"),
                from_logits=True)
            + ops.sparse_categorical_crossentropy(
                batch["end_positions"],
                ops.cast(outputs["end_logits"], "float32"),
                from_logits=True)
        )
        weights = self.example_weights(batch)
        if weights is not None:
            loss *= weights
        return loss, outputs

    def example_weights(self, batch):
        return batch.get("example_weight")

    def update_metrics(self, metrics, batch, outputs):
        weights = self.example_weights(batch)
        metrics["start_accuracy"].update_state(
            batch["start_positions"], outputs["start_logits"],
            sample_weight=weights,
        )
        metrics["end_accuracy"].update_state(
            batch["end_positions"], outputs["end_logits"],
            sample_weight=weights,
        )


def predict_logits(loop, arrays, global_batch_size):
    """`(start_logits, end_logits)` `[n, seq]` for every feature, computed
    by the devices of the trainer `loop` (either engine; features padded to
    whole batches)."""
    inputs = {k: arrays[k] for k in SquadTask.MODEL_INPUTS + (
        "feature_index",)}
    input_fn = bert_data.ArrayInput(inputs, global_batch_size,
                                    training=False)
    n, seq = arrays["input_ids"].shape
    start_logits = np.zeros((n, seq), np.float32)
    end_logits = np.zeros((n, seq), np.float32)
    if keras.backend.backend() == "jax":
        def outputs_fn(model, b):
            out = model({k: b[k] for k in SquadTask.MODEL_INPUTS},
                        training=False)
            return (b["feature_index"], b["example_weight"],
                    out["start_logits"], out["end_logits"])

        for index, weight, start, end in loop.predict(input_fn, outputs_fn):
            keep = weight > 0
            start_logits[index[keep]] = start[keep]
            end_logits[index[keep]] = end[keep]
        return start_logits, end_logits
    import tensorflow as tf

    strategy, model = loop.strategy, loop.model
    dataset = strategy.distribute_datasets_from_function(input_fn)

    @tf.function
    def step(batch):
        def replica_fn(b):
            out = model({k: b[k] for k in SquadTask.MODEL_INPUTS},
                        training=False)
            return (b["feature_index"], b["example_weight"],
                    out["start_logits"], out["end_logits"])

        # Every replica of every worker: under MultiWorkerMirroredStrategy
        # the local results hold only this worker's features.
        return [strategy.gather(x, axis=0)
                for x in strategy.run(replica_fn, args=(batch,))]

    for batch in dataset:
        index, weight, start, end = (np.asarray(x) for x in step(batch))
        keep = weight > 0
        start_logits[index[keep]] = start[keep]
        end_logits[index[keep]] = end[keep]
    return start_logits, end_logits


def best_answers(examples, meta, start_logits, end_logits, n_best_size=20,
                 max_answer_length=30):
    """`{qas_id: answer text}`: the best valid span over each example's
    features (score = start logit + end logit)."""
    best = {}
    for feature, (starts, ends) in enumerate(zip(start_logits, end_logits)):
        spans = meta[feature]["spans"]
        start_positions = np.array(sorted(meta[feature]["max_context"]))
        if not start_positions.size:
            continue
        positions = np.array(sorted(spans))
        top_starts = start_positions[
            np.argsort(-starts[start_positions])[:n_best_size]]
        top_ends = positions[np.argsort(-ends[positions])[:n_best_size]]
        example_index = meta[feature]["example_index"]
        for s in top_starts:
            for e in top_ends:
                if e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(starts[s] + ends[e])
                if example_index not in best or score > best[example_index][0]:
                    best[example_index] = (score, spans[s][0], spans[e][1])
    answers = {}
    for i, example in enumerate(examples):
        if i in best:
            _, char_start, char_end = best[i]
            answers[example.qas_id] = example.context[char_start:char_end]
        else:
            answers[example.qas_id] = ""
    return answers


# ----------------------------------------------------------------------------
# The official SQuAD v1.1 metric


def normalize_answer(text):
    """Lowercase, drop punctuation, articles (a, an, the), extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    common = (collections.Counter(prediction_tokens)
              & collections.Counter(truth_tokens))
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction, ground_truth):
    return float(
        normalize_answer(prediction) == normalize_answer(ground_truth)
    )


def squad_v1_metrics(predictions, examples):
    """`{"exact_match", "f1", "count", "missing", "unanswered"}`, EM and F1
    in percent, as the v1.1 evaluation script computes them (a missing
    prediction scores 0). Questions without a ground-truth answer (SQuAD
    v2's unanswerable ones) cannot be scored by the v1.1 metric: they are
    left out of `count` and counted in `unanswered`."""
    exact_match = f1 = 0.0
    missing = 0
    scored = [e for e in examples if e.answers]
    unanswered = len(examples) - len(scored)
    for example in scored:
        if example.qas_id not in predictions:
            missing += 1
            continue
        prediction = predictions[example.qas_id]
        exact_match += max(exact_match_score(prediction, truth)
                           for truth in example.answers)
        f1 += max(f1_score(prediction, truth) for truth in example.answers)
    count = len(scored)
    if not count:
        raise ValueError("No question with a ground-truth answer to score.")
    return dict(exact_match=100.0 * exact_match / count,
                f1=100.0 * f1 / count, count=count, missing=missing,
                unanswered=unanswered)
