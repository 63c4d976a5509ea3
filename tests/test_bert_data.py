"""BERT pre-training data: google-research/bert records, masking, seeds,
errors (tpu_scripts.bert.data, tpu_scripts/bert/create_pretraining_data.py)."""

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")
pytest.importorskip("tensorflow_text")

from tpu_scripts import run_state  # noqa: E402
from tpu_scripts.bert import data as bert_data  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CORPUS = os.path.join(FIXTURES, "tiny_corpus.txt")
SEQ, PREDS = 64, 10
SETTINGS = dict(vocabulary_size=400, max_seq_length=SEQ,
                max_predictions_per_seq=PREDS, dupe_factor=5,
                random_seed=1, log=lambda *a: None)

# google-research/bert run_pretraining.py `input_fn_builder`, written out
# here (not imported) so the test checks compatibility independently.
GOOGLE_NAME_TO_FEATURES = {
    "input_ids": tf.io.FixedLenFeature([SEQ], tf.int64),
    "input_mask": tf.io.FixedLenFeature([SEQ], tf.int64),
    "segment_ids": tf.io.FixedLenFeature([SEQ], tf.int64),
    "masked_lm_positions": tf.io.FixedLenFeature([PREDS], tf.int64),
    "masked_lm_ids": tf.io.FixedLenFeature([PREDS], tf.int64),
    "masked_lm_weights": tf.io.FixedLenFeature([PREDS], tf.float32),
    "next_sentence_labels": tf.io.FixedLenFeature([1], tf.int64),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    metadata = bert_data.create_pretraining_data(CORPUS, out, **SETTINGS)
    vocabulary = bert_data.load_vocabulary(os.path.join(out, "vocab.txt"))
    files = bert_data.expand_patterns(out)  # its current version
    records = [
        {k: v.numpy() for k, v in tf.io.parse_single_example(
            serialized, GOOGLE_NAME_TO_FEATURES).items()}
        for serialized in tf.data.TFRecordDataset(files)
    ]
    return dict(out=out, metadata=metadata, vocabulary=vocabulary,
                records=records)


def test_records_parse_with_google_feature_spec(made):
    records, vocab = made["records"], made["vocabulary"]
    assert len(records) == made["metadata"]["num_examples"] > 100
    cls, sep, pad = (vocab.index(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert pad == 0
    for r in records:
        length = int(r["input_mask"].sum())
        assert np.all(r["input_mask"][:length] == 1)
        assert np.all(r["input_ids"][length:] == 0)
        ids = r["input_ids"][:length]
        assert ids[0] == cls and ids[-1] == sep and (ids == sep).sum() == 2
        # segment A = [CLS] a [SEP], segment B = b [SEP], then padding
        first_sep = int(np.argmax(ids == sep))
        assert np.all(r["segment_ids"][:first_sep + 1] == 0)
        assert np.all(r["segment_ids"][first_sep + 1:length] == 1)
        n = int(r["masked_lm_weights"].sum())
        positions = r["masked_lm_positions"][:n]
        assert n >= 1 and np.all(np.diff(positions) > 0)
        assert np.all((positions > 0) & (positions < length))
        assert not np.isin(r["masked_lm_ids"][:n], [cls, sep, pad]).any()
        assert np.all(r["masked_lm_positions"][n:] == 0)
        assert r["next_sentence_labels"][0] in (0, 1)
    labels = [r["next_sentence_labels"][0] for r in records]
    assert 0 < np.mean(labels) < 1  # both kinds of sentence pairs


def test_masking_rate_and_80_10_10(made):
    vocab = made["vocabulary"]
    mask = vocab.index("[MASK]")
    masked = kept = replaced = 0
    for r in made["records"]:
        length = int(r["input_mask"].sum())
        n = int(r["masked_lm_weights"].sum())
        # 15 % of the tokens, rounded, at least 1, at most PREDS.
        assert n == min(PREDS, max(1, int(round(length * 0.15))))
        inputs = r["input_ids"][r["masked_lm_positions"][:n]]
        targets = r["masked_lm_ids"][:n]
        masked += int((inputs == mask).sum())
        kept += int((inputs == targets).sum())
        replaced += int(((inputs != mask) & (inputs != targets)).sum())
    total = masked + kept + replaced
    assert total == made["metadata"]["num_predictions"] > 1500
    # Binomial standard errors are ~0.01 at this count; 0.04 is ~5 sigma.
    # (A random replacement equal to the original counts as "kept".)
    assert abs(masked / total - 0.8) < 0.04
    assert abs(kept / total - 0.1) < 0.04
    assert abs(replaced / total - 0.1) < 0.04


def _file_bytes(output_dir):
    """The files of the dataset folder's current version."""
    directory = bert_data.current_version(output_dir)
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))}


def test_same_seed_same_bytes(made, tmp_path):
    again = str(tmp_path / "again")
    bert_data.create_pretraining_data(CORPUS, again, **SETTINGS)
    first = _file_bytes(made["out"])
    assert set(first) == {"pretrain-00000-of-00001.tfrecord", "vocab.txt",
                          "metadata.json"}
    assert _file_bytes(again) == first
    other = str(tmp_path / "other_seed")
    bert_data.create_pretraining_data(
        CORPUS, other, vocab_file=os.path.join(made["out"], "vocab.txt"),
        **dict(SETTINGS, random_seed=2))
    records = "pretrain-00000-of-00001.tfrecord"
    assert _file_bytes(other)[records] != first[records]


def _assert_nothing_written(out):
    assert not os.path.exists(out) or os.listdir(out) == []


def test_empty_input_is_a_clear_error_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = str(tmp_path / "out")
    with pytest.raises(run_state.DataError,
                       match="empty.txt.*holds no text"):
        bert_data.create_pretraining_data(str(empty), out, **SETTINGS)
    _assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["missing", "directory", "not_utf8"])
def test_unreadable_input_is_a_clear_error_and_writes_nothing(tmp_path,
                                                              kind):
    path = tmp_path / "input.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "not_utf8":
        path.write_bytes(b"\xff\xfe\x00 not text \x81")
    out = str(tmp_path / "out")
    expected = {
        "missing": (run_state.DataError,
                    "No file matches --input_files pattern.*input.txt"),
        "directory": (run_state.DataError,
                      "--input_files: .*input.txt is a directory"),
        "not_utf8": (run_state.DataError,
                     "input.txt' is not UTF-8 text: byte 0 \\(line 1\\)"),
    }[kind]
    with pytest.raises(expected[0], match=expected[1]):
        bert_data.create_pretraining_data(str(path), out, **SETTINGS)
    _assert_nothing_written(out)


def test_failure_while_writing_leaves_no_partial_files(tmp_path,
                                                       monkeypatch):
    out = tmp_path / "out"
    real = bert_data.instance_to_example
    calls = []

    def fail_midway(*args):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(bert_data, "instance_to_example", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        bert_data.create_pretraining_data(
            CORPUS, str(out), **dict(SETTINGS, dupe_factor=1))
    assert len(calls) == 21
    assert os.listdir(out) == []  # the unfinished version was removed


def test_split_with_offsets_maps_pieces_back():
    text = "Don't  stop: café, 3.5$"
    pieces = bert_data.split_with_offsets(text)
    assert [p for p, _, _ in pieces] == [
        "Don", "'", "t", "stop", ":", "café", ",", "3", ".", "5", "$"]
    assert all(text[s:e] == p for p, s, e in pieces)


def _batches(input_fn, **kwargs):
    return [b["input_ids"].numpy() for b in input_fn(**kwargs)]


@pytest.mark.parametrize("in_memory", [False, True])
def test_input_functions_resume_exactly_and_shard(made, in_memory):
    files = os.path.join(made["out"], "*.tfrecord")
    n = made["metadata"]["num_examples"]
    if in_memory:
        make = lambda batch: bert_data.ArrayInput(  # noqa: E731
            bert_data.load_records(files, SEQ, PREDS), batch, training=True,
            seed=3)
    else:
        make = lambda batch: bert_data.RecordInput(  # noqa: E731
            files, batch, SEQ, PREDS, n, seed=3)
    full = _batches(make(8), epoch=1)
    assert len(full) == n // 8 and full[0].shape == (8, SEQ)
    # A resumed epoch yields exactly the batches the full epoch had left.
    resumed = _batches(make(8), epoch=1, start_step=5)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, full[5:]))
    assert len(resumed) == len(full) - 5
    # Two input pipelines (2 replicas of 4): each step's two halves are the
    # single-pipeline global batch, so the replica count does not change
    # which examples form a step.
    halves = [
        _batches(make(8), input_context=tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=i,
            num_replicas_in_sync=2), epoch=1)
        for i in (0, 1)
    ]
    assert halves[0][0].shape == (4, SEQ)
    assert len(halves[0]) == len(halves[1]) == len(full)
    if in_memory:
        # (Streaming shards records across pipelines instead: disjoint, but
        # not the same global batches.)
        assert np.array_equal(np.concatenate([halves[0][0], halves[1][0]]),
                              full[0])
    seen = {r.tobytes() for h in halves for b in h for r in b}
    assert len(seen) == len({r.tobytes() for b in full for r in b})
