"""BERT pre-training data: text -> WordPiece -> masked-LM/NSP TFRecords.

The records have the features of google-research/bert's
`create_pretraining_data.py` (`GOOGLE_FEATURE_SPEC`), so TFRecords made by
that script work with `tpu_scripts/bert/pretrain.py` unchanged and the other
way round.

Input text follows google-research/bert's format: one sentence (or line) per
line, documents separated by blank lines. The instances follow its algorithm
(Devlin et al. 2018, appendix A.1): sentences are packed up to a target length
(shorter with probability `short_seq_prob`) and split into segments A and B;
with probability 0.5, or when the chunk holds one sentence, B comes from a
random other document (`next_sentence_labels` = 1) and the unused sentences
go back to the document; the pair is truncated to `max_seq_length - 3`
tokens, randomly from the front or the back. 15 % of the tokens
(`masked_lm_prob`, at most `max_predictions_per_seq`, at least 1) are
predicted: 80 % replaced by `[MASK]`, 10 % by a random token, 10 % kept.
One deliberate difference: the random token is drawn from the non-special
tokens of the vocabulary (google-research/bert draws from all of it,
`[CLS]`, `[PAD]` and `[unusedN]` included).

Everything random comes from one `random.Random(seed)`, so the same inputs and
seed give byte-identical output files.

The output is a dataset folder (`DatasetWriter`): each run writes a new
version folder and switches one pointer file, `CURRENT`, to it, so readers
(`expand_patterns`, `load_vocabulary`) see a whole dataset, old or new.
Readers check the records against `metadata.json` (per-file sizes and
counts) and the TFRecord framing; bad data is a `run_state.DataError`
naming the file.
"""

import collections
import contextlib
import glob
import json
import os
import random
import re
import time
import unicodedata
import uuid

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from tpu_scripts.run_state import DataError, FlagError, write_text

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# [PAD] first: padding is id 0, as in google-research/bert's vocabularies.
RESERVED_TOKENS = (PAD, UNK, CLS, SEP, MASK)
VOCAB_FILENAME = "vocab.txt"
METADATA_FILENAME = "metadata.json"


def google_feature_spec(max_seq_length, max_predictions_per_seq):
    """The `tf.io.parse_example` spec of google-research/bert's records."""
    seq, pred = [max_seq_length], [max_predictions_per_seq]
    return {
        "input_ids": tf.io.FixedLenFeature(seq, tf.int64),
        "input_mask": tf.io.FixedLenFeature(seq, tf.int64),
        "segment_ids": tf.io.FixedLenFeature(seq, tf.int64),
        "masked_lm_positions": tf.io.FixedLenFeature(pred, tf.int64),
        "masked_lm_ids": tf.io.FixedLenFeature(pred, tf.int64),
        "masked_lm_weights": tf.io.FixedLenFeature(pred, tf.float32),
        "next_sentence_labels": tf.io.FixedLenFeature([1], tf.int64),
    }


GOOGLE_FEATURE_NAMES = tuple(google_feature_spec(1, 1))


# ----------------------------------------------------------------------------
# Reading text


def expand_patterns(patterns, flag="--input_files"):
    """Sorted files matching comma-separated globs (local or `gs://`).

    A pattern in a dataset folder of `create_pretraining_data` (one with a
    `CURRENT` file) matches in its current version (`dataset_path`); the
    folder itself stands for its `*.tfrecord` files. Raises
    `run_state.DataError` naming `flag` and the pattern that matches
    nothing.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    files = []
    for pattern in patterns:
        pattern = pattern.strip()
        if not glob.has_magic(pattern) and current_version(pattern):
            pattern = os.path.join(pattern, "*.tfrecord")
        pattern = dataset_path(pattern)
        matches = tf.io.gfile.glob(pattern) if glob.has_magic(pattern) else (
            [pattern] if tf.io.gfile.exists(pattern) else []
        )
        if not matches:
            raise DataError(
                f"No file matches {flag} pattern {pattern!r}."
            )
        if not glob.has_magic(pattern) and tf.io.gfile.isdir(pattern):
            raise DataError(
                f"{flag}: {pattern} is a directory; pass a glob of its "
                f"files (e.g. {os.path.join(pattern, '*')})."
            )
        files.extend(matches)
    if not files:
        raise FlagError(f"{flag} is required.")
    return sorted(set(files))


def _undecodable(path, data, error):
    """A `DataError` naming the byte offset and line of a UTF-8 error."""
    line = data.count(b"\n", 0, error.start) + 1
    return DataError(
        f"Input file {path!r} is not UTF-8 text: byte {error.start} (line "
        f"{line}) is {data[error.start:error.start + 1]!r} ({error.reason})."
    )


def _read_utf8(path, what):
    """The text of `path`; a `DataError` naming `what` if it cannot be read,
    or naming the byte and line if it is not UTF-8."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except (OSError, tf.errors.OpError) as e:
        raise DataError(f"Cannot read {what}: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _undecodable(path, data, e) from None


def read_documents(paths):
    """Documents (lists of non-empty stripped lines) from text files.

    Blank lines separate documents. Raises `run_state.DataError` with the
    path (and the byte and line of a UTF-8 error) if a file cannot be read
    as UTF-8 text or holds no text at all.
    """
    documents = []
    for path in paths:
        if tf.io.gfile.isdir(path):
            raise DataError(
                f"Cannot read input file {path!r}: it is a directory."
            )
        text = _read_utf8(path, f"input file {path!r}")
        file_documents = [[]]
        for line in text.splitlines():
            line = line.strip()
            if line:
                file_documents[-1].append(line)
            elif file_documents[-1]:
                file_documents.append([])
        file_documents = [d for d in file_documents if d]
        if not file_documents:
            raise DataError(f"Input file {path!r} holds no text.")
        documents.extend(file_documents)
    return documents


# ----------------------------------------------------------------------------
# Vocabulary and tokenizer


def build_vocabulary(documents, vocabulary_size, lowercase=True):
    """A WordPiece vocabulary learnt from `documents` by keras-hub.

    `keras_hub.tokenizers.compute_word_piece_vocabulary` (tensorflow-text's
    BERT vocabulary learner) with `RESERVED_TOKENS` first. `lowercase` also
    strips accents (BERT "uncased").
    """
    import keras_hub

    lines = [line for document in documents for line in document]
    vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(lines).batch(1024),
        vocabulary_size,
        lowercase=lowercase,
        strip_accents=lowercase,
        reserved_tokens=list(RESERVED_TOKENS),
    )
    return list(vocabulary)


def load_vocabulary(path, flag="--vocab_file"):
    """Tokens of a one-token-per-line vocabulary file.

    `path` may name `vocab.txt` in a dataset folder of
    `create_pretraining_data` (see `dataset_path`). Raises
    `run_state.DataError` naming `flag`, the file, and the line and token
    of a blank line or a repeated token (keras-hub refuses those without
    saying where), or the special tokens it lacks.
    """
    path = dataset_path(path)
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, VOCAB_FILENAME)
    text = _read_utf8(path, f"{flag}={path}")
    vocabulary = [line.rstrip("\r") for line in text.split("\n")]
    if vocabulary and not vocabulary[-1]:
        vocabulary.pop()  # the newline that ends the last line
    lines = {}
    for number, token in enumerate(vocabulary, 1):
        if not token.strip():
            raise DataError(
                f"{flag}={path} has a blank token on line {number}: one "
                "token per line, no blank lines."
            )
        if token in lines:
            raise DataError(
                f"{flag}={path} repeats token {token!r} on line {number} "
                f"(first on line {lines[token]}): tokens must be unique."
            )
        lines[token] = number
    missing = [t for t in RESERVED_TOKENS if t not in lines]
    if missing:
        raise DataError(
            f"{flag}={path} lacks the special tokens {missing}."
        )
    return vocabulary


def write_vocabulary(vocabulary, path):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(token + "\n" for token in vocabulary))


def make_tokenizer(vocabulary, lowercase=True):
    """keras-hub's WordPiece tokenizer (BERT's splitting: whitespace and
    punctuation; uncased = lowercase and strip accents)."""
    import keras_hub

    return keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=list(vocabulary),
        lowercase=lowercase,
        strip_accents=lowercase,
        oov_token=UNK,
        dtype="int32",
    )


def tokenize_lines(tokenizer, lines, chunk_size=8192):
    """Token ids (lists of ints) of each line, tokenized in batches."""
    ids = []
    for start in range(0, len(lines), chunk_size):
        tokens = tokenizer(tf.constant(lines[start:start + chunk_size]))
        if isinstance(tokens, tf.RaggedTensor):
            ids.extend(tokens.to_list())
        else:
            ids.extend([list(map(int, t)) for t in tokens])
    return ids


def tokenize_documents(tokenizer, documents):
    lines = [line for document in documents for line in document]
    ids = iter(tokenize_lines(tokenizer, lines))
    tokenized = []
    for document in documents:
        sentences = [next(ids) for _ in document]
        sentences = [s for s in sentences if s]
        if sentences:
            tokenized.append(sentences)
    return tokenized


# ----------------------------------------------------------------------------
# Instances


TrainingInstance = collections.namedtuple(
    "TrainingInstance",
    ["input_ids", "segment_ids", "is_random_next", "masked_lm_positions",
     "masked_lm_ids"],
)


class InstanceMaker:
    """google-research/bert's instance and masking algorithm (module doc).

    Args:
        vocabulary: the token list (ids are indices).
        max_seq_length: tokens per example including `[CLS]` and 2 `[SEP]`.
        max_predictions_per_seq: masked positions per example at most.
        masked_lm_prob: fraction of tokens predicted.
        short_seq_prob: probability of a shorter target length.
        whole_word_mask: mask all pieces of a word together.
        rng: a `random.Random`.
    """

    def __init__(self, vocabulary, max_seq_length, max_predictions_per_seq,
                 masked_lm_prob, short_seq_prob, whole_word_mask, rng):
        if max_seq_length < 5:
            raise ValueError(
                f"max_seq_length must be >= 5. Received: {max_seq_length}."
            )
        self.vocabulary = vocabulary
        index = {t: i for i, t in enumerate(vocabulary)}
        self.cls_id, self.sep_id, self.mask_id = (
            index[CLS], index[SEP], index[MASK]
        )
        self.is_continuation = [t.startswith("##") for t in vocabulary]
        self.random_ids = [
            i for i, t in enumerate(vocabulary)
            if not (t.startswith("[") and t.endswith("]"))
        ]
        self.max_seq_length = max_seq_length
        self.max_predictions_per_seq = max_predictions_per_seq
        self.masked_lm_prob = masked_lm_prob
        self.short_seq_prob = short_seq_prob
        self.whole_word_mask = whole_word_mask
        self.rng = rng

    def from_documents(self, documents, dupe_factor):
        """All instances, `dupe_factor` maskings of every document,
        shuffled."""
        documents = list(documents)
        self.rng.shuffle(documents)
        instances = []
        for _ in range(dupe_factor):
            for index in range(len(documents)):
                instances.extend(self.from_document(documents, index))
        self.rng.shuffle(instances)
        return instances

    def from_document(self, documents, document_index):
        rng = self.rng
        document = documents[document_index]
        max_num_tokens = self.max_seq_length - 3
        target_length = max_num_tokens
        if rng.random() < self.short_seq_prob:
            target_length = rng.randint(2, max_num_tokens)
        instances = []
        chunk, chunk_length, i = [], 0, 0
        while i < len(document):
            chunk.append(document[i])
            chunk_length += len(document[i])
            if i == len(document) - 1 or chunk_length >= target_length:
                a_end = 1
                if len(chunk) >= 2:
                    a_end = rng.randint(1, len(chunk) - 1)
                tokens_a = [t for s in chunk[:a_end] for t in s]
                tokens_b = []
                is_random_next = len(documents) > 1 and (
                    len(chunk) == 1 or rng.random() < 0.5
                )
                if is_random_next:
                    target_b_length = target_length - len(tokens_a)
                    other = document_index
                    for _ in range(10):
                        other = rng.randint(0, len(documents) - 1)
                        if other != document_index:
                            break
                    other_document = documents[other]
                    start = rng.randint(0, len(other_document) - 1)
                    for sentence in other_document[start:]:
                        tokens_b.extend(sentence)
                        if len(tokens_b) >= target_b_length:
                            break
                    # The unused sentences go back for the next instance.
                    i -= len(chunk) - a_end
                else:
                    tokens_b = [t for s in chunk[a_end:] for t in s]
                self._truncate_pair(tokens_a, tokens_b, max_num_tokens)
                if tokens_a and tokens_b:
                    instances.append(
                        self._instance(tokens_a, tokens_b, is_random_next)
                    )
                chunk, chunk_length = [], 0
            i += 1
        return instances

    def _truncate_pair(self, tokens_a, tokens_b, max_num_tokens):
        while len(tokens_a) + len(tokens_b) > max_num_tokens:
            longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
            # Truncate from the front or the back: less bias than always
            # cutting the end.
            if self.rng.random() < 0.5:
                del longer[0]
            else:
                longer.pop()

    def _instance(self, tokens_a, tokens_b, is_random_next):
        input_ids = [self.cls_id, *tokens_a, self.sep_id, *tokens_b,
                     self.sep_id]
        segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
        input_ids, positions, labels = self._mask(input_ids)
        return TrainingInstance(input_ids, segment_ids, is_random_next,
                                positions, labels)

    def _mask(self, input_ids):
        rng = self.rng
        candidates = []  # lists of positions masked together
        for position, token in enumerate(input_ids):
            if token in (self.cls_id, self.sep_id):
                continue
            if (self.whole_word_mask and candidates
                    and self.is_continuation[token]
                    and candidates[-1][-1] == position - 1):
                candidates[-1].append(position)
            else:
                candidates.append([position])
        rng.shuffle(candidates)
        num_to_predict = min(
            self.max_predictions_per_seq,
            max(1, int(round(len(input_ids) * self.masked_lm_prob))),
        )
        output = list(input_ids)
        covered = set()
        for group in candidates:
            if len(covered) >= num_to_predict:
                break
            if len(covered) + len(group) > num_to_predict:
                continue
            for position in group:
                covered.add(position)
                if rng.random() < 0.8:
                    output[position] = self.mask_id
                elif rng.random() < 0.5:
                    pass  # keep the original token
                else:
                    output[position] = self.random_ids[
                        rng.randint(0, len(self.random_ids) - 1)
                    ]
        positions = sorted(covered)
        return output, positions, [input_ids[p] for p in positions]


# ----------------------------------------------------------------------------
# Writing records


def _int_feature(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def instance_to_example(instance, max_seq_length, max_predictions_per_seq):
    """A `tf.train.Example` with google-research/bert's features, padded."""
    n = len(instance.input_ids)
    pad = max_seq_length - n
    p = len(instance.masked_lm_positions)
    pred_pad = max_predictions_per_seq - p
    features = {
        "input_ids": _int_feature(instance.input_ids + [0] * pad),
        "input_mask": _int_feature([1] * n + [0] * pad),
        "segment_ids": _int_feature(instance.segment_ids + [0] * pad),
        "masked_lm_positions": _int_feature(
            instance.masked_lm_positions + [0] * pred_pad
        ),
        "masked_lm_ids": _int_feature(instance.masked_lm_ids + [0] * pred_pad),
        "masked_lm_weights": tf.train.Feature(float_list=tf.train.FloatList(
            value=[1.0] * p + [0.0] * pred_pad
        )),
        "next_sentence_labels": _int_feature([int(instance.is_random_next)]),
    }
    return tf.train.Example(features=tf.train.Features(feature=features))


def shard_paths(output_dir, prefix, num_shards):
    return [
        os.path.join(output_dir, f"{prefix}-{i:05d}-of-{num_shards:05d}"
                                 ".tfrecord")
        for i in range(num_shards)
    ]


def write_instances(instances, paths, max_seq_length,
                    max_predictions_per_seq):
    """Writes `instances` round-robin into the TFRecord files `paths`;
    returns the number of records in each."""
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    counts = [0] * len(paths)
    try:
        for i, instance in enumerate(instances):
            example = instance_to_example(
                instance, max_seq_length, max_predictions_per_seq
            )
            # deterministic=True: map fields serialised in key order, so the
            # same instances give the same bytes.
            writers[i % len(writers)].write(
                example.SerializeToString(deterministic=True)
            )
            counts[i % len(writers)] += 1
    finally:
        for writer in writers:
            writer.close()
    return counts


# ----------------------------------------------------------------------------
# The dataset folder: versions, one pointer, a lock
#
# `output_dir/CURRENT` names the folder of the current dataset
# (`output_dir/data-<time>-<id>/` with the shards, vocab.txt and
# metadata.json). A new dataset is written into a folder of its own; the
# rename of one small file (`CURRENT`) then switches every reader from the
# complete old dataset to the complete new one, on any filesystem (a rename
# on gs:// is copy + delete, but of that one object). Only then are the old
# versions removed. `output_dir/LOCK` names the process writing; what a
# killed writer left behind (its lock, its unfinished folder, temporary
# files) is removed by the next one.

CURRENT_FILENAME = "CURRENT"
LOCK_FILENAME = "LOCK"
VERSION_PREFIX = "data-"
# Only names this module makes are ever removed (a user's `data-science/`
# or `notes.tmp-1` in --output_dir stay).
_VERSION_NAME = re.compile(r"data-\d{8}T\d{6}-[0-9a-f]{6}")
_TEMPORARY_NAME = re.compile(
    r"(CURRENT|LOCK|vocab\.txt|metadata\.json|.+\.tfrecord)"
    r"\.tmp-\d+(-[0-9a-f]{8})?")


def current_version(directory):
    """The folder of `directory`'s current dataset, or `None` (no
    `CURRENT` file: not a dataset folder)."""
    pointer = os.path.join(directory, CURRENT_FILENAME)
    try:
        if not tf.io.gfile.exists(pointer):
            return None
        with tf.io.gfile.GFile(pointer) as f:
            name = f.read().strip()
    except (OSError, tf.errors.OpError):
        return None
    return os.path.join(directory, name) if name else None


def dataset_path(path):
    """`path` with a dataset folder replaced by its current version.

    `out`, `out/*.tfrecord` and `out/vocab.txt`, for a dataset folder `out`
    of `create_pretraining_data`, become `out/data-.../`, `out/data-.../
    *.tfrecord` and `out/data-.../vocab.txt`; other paths stay as they are.
    """
    if not path or glob.has_magic(os.path.dirname(path)):
        return path
    version = None if glob.has_magic(path) else current_version(path)
    if version:
        return version
    head, tail = os.path.split(path.rstrip("/"))
    version = current_version(head) if head else None
    return os.path.join(version, tail) if version else path


def _is_version(name):
    return bool(_VERSION_NAME.fullmatch(name))


def _is_temporary(name):
    """A temporary file of this module or of `run_state.write_text`."""
    return bool(_TEMPORARY_NAME.fullmatch(name))


class DatasetWriter:
    """Writes one version of the dataset in `output_dir` (module notes).

    Use as a context manager: entering takes the lock, removes what a
    killed writer left and refuses a non-empty `output_dir` unless
    `overwrite`; `folder` is where the files go; `commit()` switches
    `CURRENT` to it and removes the old versions; leaving without a commit
    (an error, Ctrl-C) removes the folder. The lock is released on exit.
    """

    def __init__(self, output_dir, overwrite=False, log=print):
        self.output_dir = output_dir.rstrip("/")
        self.overwrite = overwrite
        self.log = log
        self.folder = None
        self._locked = False
        self._switched = False

    def __enter__(self):
        if tf.io.gfile.exists(self.output_dir) and not tf.io.gfile.isdir(
                self.output_dir):
            raise FlagError(f"--output_dir={self.output_dir} is a file.")
        try:
            tf.io.gfile.makedirs(self.output_dir)
        except (OSError, tf.errors.OpError) as e:
            raise FlagError(
                f"Cannot create --output_dir={self.output_dir}: {e}"
            ) from None
        self._lock()
        try:
            self._remove_stale()
            self._check_empty()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            self.folder = os.path.join(
                self.output_dir,
                f"{VERSION_PREFIX}{stamp}-{uuid.uuid4().hex[:6]}",
            )
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            # Once switched to, the folder is the dataset: keep it even if
            # removing the old versions failed.
            if (exc_type is not None and self.folder and not self._switched
                    and tf.io.gfile.exists(self.folder)):
                tf.io.gfile.rmtree(self.folder)
        finally:
            self._unlock()
        return False

    def path(self, name):
        return os.path.join(self.folder, name)

    def commit(self):
        """Points `CURRENT` at the new folder, then removes the old
        versions and any files of the old flat layout."""
        write_text(os.path.join(self.output_dir, CURRENT_FILENAME),
                   os.path.basename(self.folder) + "\n")
        self._switched = True
        self._remove_old()

    def _remove_old(self):
        for name in self._names():
            path = os.path.join(self.output_dir, name)
            if path == self.folder or name in (CURRENT_FILENAME,
                                               LOCK_FILENAME):
                continue
            if _is_version(name) and tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            elif (name.endswith(".tfrecord") or name in (
                    VOCAB_FILENAME, METADATA_FILENAME)) and (
                    not tf.io.gfile.isdir(path)):
                tf.io.gfile.remove(path)  # a dataset of the flat layout

    def _names(self):
        return sorted(n.rstrip("/") for n in
                      tf.io.gfile.listdir(self.output_dir))

    def _remove_stale(self):
        """Removes what killed writers left: versions `CURRENT` does not
        name, temporary files."""
        current = current_version(self.output_dir)
        for name in self._names():
            path = os.path.join(self.output_dir, name)
            if _is_version(name) and path != current and (
                    tf.io.gfile.isdir(path)):
                self.log(f"Removing {path}, left by a run that did not "
                         "finish.")
                tf.io.gfile.rmtree(path)
            elif _is_temporary(name) and not tf.io.gfile.isdir(path):
                tf.io.gfile.remove(path)

    def _check_empty(self):
        names = [n for n in self._names() if n != LOCK_FILENAME]
        if names and not self.overwrite:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5
                                            else "")
            raise FlagError(
                f"--output_dir={self.output_dir} is not empty ({len(names)} "
                f"entries: {shown}). Use an empty directory or pass "
                "--overwrite to replace its dataset (the old one stays "
                "readable until the new one is complete)."
            )

    def _lock(self):
        """Takes `LOCK` (`run_state.RunLock`: host, PID and heartbeat;
        refused while a live process holds it, taken over from a dead
        one)."""
        from tpu_scripts.run_state import RunLock

        self._locked = RunLock(self.output_dir, log=self.log,
                               filename=LOCK_FILENAME,
                               flag="--output_dir").acquire()

    def _unlock(self):
        if self._locked:
            self._locked.release()
            self._locked = False


# ----------------------------------------------------------------------------
# The whole pipeline


def check_settings(vocab_file, vocabulary_size, max_seq_length,
                   max_predictions_per_seq, masked_lm_prob, short_seq_prob,
                   dupe_factor, num_shards, output_prefix):
    """Raises `run_state.FlagError` naming the flag for a value out of
    range (before any file is read or a vocabulary learnt)."""
    def check(name, value, ok, requirement):
        if not ok:
            raise FlagError(
                f"--{name} must be {requirement}. Received: {value!r}."
            )

    for name, value in (("num_shards", num_shards),
                        ("dupe_factor", dupe_factor),
                        ("max_predictions_per_seq", max_predictions_per_seq)):
        check(name, value, value >= 1, ">= 1")
    # [CLS] A [SEP] B [SEP]: two segments of at least one token each.
    check("max_seq_length", max_seq_length, max_seq_length >= 5, ">= 5")
    check("masked_lm_prob", masked_lm_prob, 0 < masked_lm_prob < 1,
          "in (0, 1)")
    check("short_seq_prob", short_seq_prob, 0 <= short_seq_prob <= 1,
          "in [0, 1]")
    if not vocab_file:
        check("vocab_size", vocabulary_size,
              vocabulary_size > len(RESERVED_TOKENS),
              f"> {len(RESERVED_TOKENS)} (the special tokens)")
    check("output_prefix", output_prefix,
          bool(output_prefix) and "/" not in output_prefix
          and not glob.has_magic(output_prefix),
          "a file name prefix (no '/', '*', '?' or '[')")


def create_pretraining_data(input_patterns, output_dir, vocab_file=None,
                            vocabulary_size=8192, lowercase=True,
                            max_seq_length=128, max_predictions_per_seq=20,
                            masked_lm_prob=0.15, short_seq_prob=0.1,
                            dupe_factor=10, whole_word_mask=False,
                            num_shards=1, output_prefix="pretrain",
                            random_seed=12345, overwrite=False, log=print):
    """Text files -> (vocabulary) -> sharded TFRecords; see the module doc.

    Writes a new version of the dataset folder `output_dir` (see
    `DatasetWriter`): `{output_prefix}-0000i-of-0000n.tfrecord`, `vocab.txt`
    (the vocabulary used, learnt unless `vocab_file` is given) and
    `metadata.json` (counts, sizes and settings; `bert/pretrain.py` checks
    the records against it) in `output_dir/data-<time>-<id>/`, which
    `output_dir/CURRENT` names once every file is complete. Readers go
    through `CURRENT` (`expand_patterns`, `load_vocabulary`), so they see
    the old dataset or the new one, never a mix. A non-empty `output_dir`
    is refused unless `overwrite`. Flags are checked before anything is
    read.

    Returns the metadata dict.
    """
    check_settings(vocab_file, vocabulary_size, max_seq_length,
                   max_predictions_per_seq, masked_lm_prob, short_seq_prob,
                   dupe_factor, num_shards, output_prefix)
    paths = expand_patterns(input_patterns)
    vocabulary = load_vocabulary(vocab_file) if vocab_file else None
    with DatasetWriter(output_dir, overwrite, log) as writer:
        documents = read_documents(paths)
        if vocabulary is None:
            log(f"Learning a {vocabulary_size}-token WordPiece vocabulary "
                f"from {len(paths)} file(s).")
            vocabulary = build_vocabulary(documents, vocabulary_size,
                                          lowercase)
            if len(vocabulary) < vocabulary_size:
                log(f"The learnt vocabulary has {len(vocabulary)} tokens, "
                    f"fewer than --vocab_size={vocabulary_size}: the corpus "
                    "has no more word pieces frequent enough to keep.")
        tokenizer = make_tokenizer(vocabulary, lowercase)
        tokenized = tokenize_documents(tokenizer, documents)
        maker = InstanceMaker(
            vocabulary, max_seq_length, max_predictions_per_seq,
            masked_lm_prob, short_seq_prob, whole_word_mask,
            random.Random(random_seed),
        )
        instances = maker.from_documents(tokenized, dupe_factor)
        if not instances:
            raise DataError(
                f"The input files {paths} gave no training instance (each "
                "instance needs two non-empty segments)."
            )
        tf.io.gfile.makedirs(writer.folder)
        shards = shard_paths(writer.folder, output_prefix, num_shards)
        counts = write_instances(instances, shards, max_seq_length,
                                 max_predictions_per_seq)
        write_vocabulary(vocabulary, writer.path(VOCAB_FILENAME))
        metadata = dict(
            num_examples=len(instances),
            num_documents=len(tokenized),
            num_tokens=sum(len(s) for d in tokenized for s in d),
            input_files=paths,
            vocab_size=len(vocabulary),
            vocab_file=vocab_file or VOCAB_FILENAME,
            lowercase=lowercase,
            max_seq_length=max_seq_length,
            max_predictions_per_seq=max_predictions_per_seq,
            masked_lm_prob=masked_lm_prob,
            short_seq_prob=short_seq_prob,
            dupe_factor=dupe_factor,
            whole_word_mask=whole_word_mask,
            random_seed=random_seed,
            num_random_next=sum(i.is_random_next for i in instances),
            num_predictions=sum(len(i.masked_lm_positions)
                                for i in instances),
            files=[os.path.basename(p) for p in shards],
            # Per file: what a reader checks the records against.
            file_examples=counts,
            file_bytes=[tf.io.gfile.stat(p).length for p in shards],
        )
        with tf.io.gfile.GFile(writer.path(METADATA_FILENAME), "w") as f:
            json.dump(metadata, f, indent=1, sort_keys=True)
        writer.commit()
    log(f"Wrote {len(instances)} examples from {len(tokenized)} documents "
        f"to {num_shards} file(s) in {writer.folder} (now {output_dir}'s "
        "current dataset).")
    return metadata


# ----------------------------------------------------------------------------
# Reading records


def parse_examples(serialized, max_seq_length, max_predictions_per_seq):
    """Parses a batch of serialized records; int64 -> int32 (TPU-friendly)."""
    features = tf.io.parse_example(
        serialized,
        google_feature_spec(max_seq_length, max_predictions_per_seq),
    )
    return {
        name: tf.cast(value, tf.int32) if value.dtype == tf.int64 else value
        for name, value in features.items()
    }


def read_metadata(files):
    """`metadata.json` beside the first record file, or `None`."""
    path = os.path.join(os.path.dirname(files[0]), METADATA_FILENAME)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            metadata = json.load(f)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(metadata, dict):
        raise DataError(f"{path} is not a metadata object.")
    return metadata


def declared_counts(files, metadata):
    """`{path: (records, bytes)}` that `metadata` declares for each of
    `files` (`None` for a value it does not declare); `{}` without
    metadata or per-file counts (older metadata, other tools)."""
    if not metadata or "file_examples" not in metadata:
        return {}
    declared = dict(zip(metadata.get("files", []), zip(
        metadata["file_examples"], metadata.get("file_bytes", []))))
    return {path: declared[os.path.basename(path)] for path in files
            if os.path.basename(path) in declared}


def check_file_sizes(files, metadata):
    """Raises `run_state.DataError` naming a file whose size differs from
    the one `metadata.json` declares (a truncated or replaced shard): one
    `stat` per file, cheap enough for streaming input."""
    for path, (records, size) in declared_counts(files, metadata).items():
        actual = tf.io.gfile.stat(path).length
        if size is not None and actual != size:
            raise DataError(
                f"{path} has {actual} bytes; metadata.json declares {size} "
                f"({records} records): the file is truncated or was "
                "replaced. Recreate the data."
            )


def count_framed_records(path):
    """Records in TFRecord file `path`, from its framing (per record: an
    8-byte length, its 4-byte CRC, the data, the data's 4-byte CRC).

    TensorFlow's reader stops silently at a truncated last record; this
    raises `run_state.DataError` naming the file and the record instead.
    (The CRCs are checked by TensorFlow's reader, see `read_file_records`.)
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    offset, index = 0, 0
    while offset < len(data):
        if offset + 12 > len(data):
            needed = 12
        else:
            length = int.from_bytes(data[offset:offset + 8], "little")
            needed = 12 + length + 4
        if offset + needed > len(data):
            raise DataError(
                f"{path} is truncated: record {index} (at byte {offset}) "
                f"needs {needed} bytes, the file ends after "
                f"{len(data) - offset}."
            )
        offset += needed
        index += 1
    return index


def _corrupt_record_error(path, error):
    """A `DataError` naming `path` and the first record TensorFlow cannot
    read in it."""
    index = 0
    try:
        for _ in tf.data.TFRecordDataset([path]):
            index += 1
        where = ""
    except tf.errors.OpError:
        where = f" at record {index}"
    return DataError(f"{path} is corrupt{where}: {_op_message(error)}")


def _op_message(error):
    """The first line of a TensorFlow error's message, without the
    `{{function_node ...}}` prefix of errors raised in a function."""
    message = error.message.splitlines()[0]
    return re.sub(r"^\{\{[^}]*\}\}\s*", "", message)


def read_file_records(path, max_seq_length, max_predictions_per_seq):
    """The parsed records of one TFRecord file (a list of batch dicts);
    a corrupt record or one without the BERT features is a
    `run_state.DataError` naming the file."""
    ds = tf.data.TFRecordDataset([path]).batch(4096).map(
        lambda s: parse_examples(s, max_seq_length, max_predictions_per_seq)
    )
    try:
        return list(ds.as_numpy_iterator())
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        raise _corrupt_record_error(path, e) from None


@contextlib.contextmanager
def corrupt_records_named(*patterns):
    """Turns a `tf.errors.DataLossError` raised inside (streaming input
    meeting a corrupt record) into a `run_state.DataError` naming the file
    and record: the files of `patterns` (`None`s skipped) are read again,
    one by one, only after the error. A record file removed while it was
    streamed (its dataset overwritten) is a `DataError` too."""
    try:
        yield
    except tf.errors.NotFoundError as e:
        raise DataError(
            f"A record file of {', '.join(filter(None, patterns))} was "
            f"removed while the run read it ({_op_message(e)}); was its "
            "dataset overwritten by create_pretraining_data?"
        ) from None
    except tf.errors.DataLossError as e:
        for pattern in filter(None, patterns):
            for path in expand_patterns(pattern):
                try:
                    count_records([path])
                except tf.errors.OpError as file_error:
                    raise _corrupt_record_error(path, file_error) from None
        raise DataError(
            f"A record of {', '.join(filter(None, patterns))} is corrupt: "
            f"{_op_message(e)}"
        ) from None


def record_lengths(path):
    """`{feature: length}` of the first record of TFRecord file `path`
    (`None` if it has no record)."""
    try:
        for serialized in tf.data.TFRecordDataset([path]).take(1):
            example = tf.train.Example.FromString(serialized.numpy())
            return {
                name: len(getattr(feature, feature.WhichOneof("kind")).value)
                for name, feature in example.features.feature.items()
            }
    except tf.errors.DataLossError as e:
        raise _corrupt_record_error(path, e) from None
    except tf.errors.OpError as e:
        raise DataError(f"Cannot read {path}: {_op_message(e)}") from None
    except DecodeError as e:
        raise DataError(
            f"{path}: record 0 is not a tf.train.Example ({e})."
        ) from None
    return None


def check_record_lengths(files, max_seq_length, max_predictions_per_seq):
    """Raises `run_state.FlagError` naming the flags if the first record of
    the first non-empty file does not have `max_seq_length` tokens and
    `max_predictions_per_seq` masked positions (`run_state.DataError` if
    no file has a record)."""
    for path in files:  # shards beyond the number of records are empty
        lengths = record_lengths(path)
        if lengths is not None:
            break
    else:
        raise DataError(f"No records in {', '.join(files)}.")
    missing = [n for n in GOOGLE_FEATURE_NAMES if n not in lengths]
    if missing:
        raise FlagError(
            f"{path} is not a BERT pre-training record file: its records "
            f"lack {missing}."
        )
    found = (lengths["input_ids"], lengths["masked_lm_positions"])
    if found != (max_seq_length, max_predictions_per_seq):
        raise FlagError(
            f"The records in {path} have {found[0]} tokens and "
            f"{found[1]} masked positions; the run expects "
            f"--max_seq_length={max_seq_length} and "
            f"--max_predictions_per_seq={max_predictions_per_seq}. Pass "
            f"--max_seq_length={found[0]} "
            f"--max_predictions_per_seq={found[1]} to match the data."
        )


def first_records(files, count, max_seq_length, max_predictions_per_seq):
    """The first `count` records of `files` as a dict of numpy arrays."""
    ds = tf.data.TFRecordDataset(files).take(count).batch(count).map(
        lambda s: parse_examples(s, max_seq_length, max_predictions_per_seq)
    )
    return next(ds.as_numpy_iterator())


def count_records(files):
    return int(tf.data.TFRecordDataset(files).reduce(
        np.int64(0), lambda n, _: n + 1
    ))


def load_records(patterns, max_seq_length, max_predictions_per_seq,
                 flag="--input_files"):
    """Every record of the files as a dict of numpy arrays (in file order).

    Each file's framing is walked (`count_framed_records`) and its records
    counted against `metadata.json` where it declares them (per file, or
    the total when it lists exactly these files): a truncated, corrupt or
    short file is a `run_state.DataError` naming it.
    """
    files = expand_patterns(patterns, flag)
    metadata = read_metadata(files)
    declared = declared_counts(files, metadata)
    batches = []
    for path in files:
        framed = count_framed_records(path)
        expected = declared.get(path, (None,))[0]
        if expected is not None and framed != expected:
            raise DataError(
                f"{path} holds {framed} records; metadata.json declares "
                f"{expected}. Recreate the data."
            )
        batches += read_file_records(path, max_seq_length,
                                     max_predictions_per_seq)
    if not batches:
        raise DataError(f"No records in {files}.")
    records = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    count = len(records["input_ids"])
    if (metadata and not declared and "num_examples" in metadata
            and sorted(map(os.path.basename, files))
            == sorted(metadata.get("files", []))
            and count != metadata["num_examples"]):
        raise DataError(
            f"The files of {os.path.dirname(files[0])} hold {count} records; "
            f"its metadata.json declares {metadata['num_examples']}."
        )
    return records


def _pipeline_share(input_context, global_batch_size):
    """`(per_replica_batch, replicas_per_pipeline, num_pipelines, id)`."""
    if input_context is None:
        return global_batch_size, 1, 1, 0
    return (
        input_context.get_per_replica_batch_size(global_batch_size),
        (input_context.num_replicas_in_sync
         // input_context.num_input_pipelines),
        input_context.num_input_pipelines,
        input_context.input_pipeline_id,
    )


class _InputSpec:
    def __init__(self, num_examples, global_batch_size, training):
        if training and num_examples < global_batch_size:
            raise FlagError(
                f"The training set has {num_examples} examples, fewer than "
                f"one global batch of {global_batch_size} "
                "(--global_batch_size)."
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.training = training

    @property
    def steps_per_epoch(self):
        """Training: whole batches only; evaluation: every example once."""
        if self.training:
            return self.num_examples // self.global_batch_size
        return -(-self.num_examples // self.global_batch_size)


class ArrayInput(_InputSpec):
    """Input function over records held in memory (a dict of numpy arrays).

    Exact epochs (a permutation per `(seed, epoch)`) and exact resume at
    `start_step`. Evaluation covers every example once; padding examples
    carry `example_weight` 0 (all batches carry `example_weight`).
    """

    def __init__(self, features, global_batch_size, training, seed=0):
        self.features = {k: np.asarray(v) for k, v in features.items()}
        super().__init__(len(self.features["input_ids"]), global_batch_size,
                         training)
        self.seed = seed

    def __call__(self, input_context=None, epoch=0, start_step=0):
        per_replica, replicas, pipelines, pipeline_id = _pipeline_share(
            input_context, self.global_batch_size
        )
        n, steps = self.num_examples, self.steps_per_epoch
        if self.training:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            order = order[: steps * self.global_batch_size]
        else:
            order = np.arange(steps * self.global_batch_size)
        # Replicas of one step take consecutive per-replica batches.
        order = order.reshape(-1, per_replica)[pipeline_id::pipelines]
        order = order[start_step * replicas:].reshape(-1)
        features = {k: tf.constant(v) for k, v in self.features.items()}

        def gather(index):
            real = index < n
            safe = tf.minimum(index, n - 1)
            batch = {k: tf.gather(v, safe) for k, v in features.items()}
            batch["example_weight"] = tf.cast(real, tf.float32)
            return batch

        ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
        ds = ds.batch(per_replica, drop_remainder=True).map(gather)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    def numpy_batches(self, epoch=0, start_step=0, process_count=1,
                      process_index=0):
        """This process's share of each global batch of `epoch` from batch
        `start_step` on, as dicts of NumPy arrays (the JAX engine): the same
        examples in the same order as `__call__` gives one replica."""
        batch, n = self.global_batch_size, self.num_examples
        if batch % process_count:
            raise FlagError(
                f"The batch of {batch} is not divisible by the "
                f"{process_count} processes.")
        share = batch // process_count
        start, stop = process_index * share, (process_index + 1) * share
        if self.training:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(self.steps_per_epoch * batch)
        for step in range(start_step, self.steps_per_epoch):
            indices = order[step * batch:(step + 1) * batch][start:stop]
            safe = np.minimum(indices, n - 1)
            features = {k: v[safe] for k, v in self.features.items()}
            features["example_weight"] = (indices < n).astype(np.float32)
            yield features


class RecordInput(_InputSpec):
    """Streaming training input over TFRecord files (local or GCS).

    Files are sharded per input pipeline when there are enough of them (else
    records are), read with a deterministic interleave, shuffled within
    `shuffle_buffer` records with a seed per `(seed, epoch)`, parsed in
    batches. Every pipeline yields exactly `steps_per_epoch` steps (its
    share wraps around if it runs short). On resume at `start_step` the
    records already used are skipped, so the batches equal the
    uninterrupted run's; skipping reads (does not parse) those records.
    """

    def __init__(self, patterns, global_batch_size, max_seq_length,
                 max_predictions_per_seq, num_examples, seed=0,
                 shuffle_buffer=100_000, cycle_length=8):
        self.files = expand_patterns(patterns)
        super().__init__(num_examples, global_batch_size, training=True)
        self.max_seq_length = max_seq_length
        self.max_predictions_per_seq = max_predictions_per_seq
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.cycle_length = cycle_length

    def __call__(self, input_context=None, epoch=0, start_step=0):
        per_replica, replicas, pipelines, pipeline_id = _pipeline_share(
            input_context, self.global_batch_size
        )
        seed = self.seed * 100003 + epoch
        files = list(self.files)
        random.Random(seed).shuffle(files)
        shard_files = pipelines > 1 and len(files) >= pipelines
        if shard_files:
            files = files[pipeline_id::pipelines]
        ds = tf.data.Dataset.from_tensor_slices(files).interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(self.cycle_length, len(files)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
        if pipelines > 1 and not shard_files:
            ds = ds.shard(pipelines, pipeline_id)
        # Shuffle, then repeat: an epoch draws without replacement (a pass
        # over the pipeline's records; it wraps around only if its share is
        # short of the epoch's steps).
        ds = ds.shuffle(
            self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False
        ).repeat()
        ds = ds.skip(start_step * per_replica * replicas)
        ds = ds.batch(per_replica, drop_remainder=True)
        ds = ds.take((self.steps_per_epoch - start_step) * replicas)
        ds = ds.map(
            lambda s: parse_examples(
                s, self.max_seq_length, self.max_predictions_per_seq
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return ds.prefetch(tf.data.AUTOTUNE)


def split_with_offsets(text):
    """BERT's basic split with character offsets: `[(piece, start, end)]`.

    Whitespace separates pieces and every punctuation character is a piece
    of its own (google-research/bert `BasicTokenizer`), so each WordPiece
    token of a piece maps back to a span of `text` (used by SQuAD).
    """
    pieces, start = [], None
    for i, char in enumerate(text):
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf"):
            if start is not None:
                pieces.append((text[start:i], start, i))
                start = None
        elif _is_punctuation(char):
            if start is not None:
                pieces.append((text[start:i], start, i))
                start = None
            pieces.append((char, i, i + 1))
        elif start is None:
            start = i
    if start is not None:
        pieces.append((text[start:], start, len(text)))
    return pieces


def _is_punctuation(char):
    code = ord(char)
    # ASCII symbols count as punctuation in BERT ("$", "^", "`", ...).
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or (
        123 <= code <= 126
    ):
        return True
    return unicodedata.category(char).startswith("P")
