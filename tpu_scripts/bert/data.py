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
"""

import collections
import glob
import json
import os
import random
import unicodedata

import numpy as np
import tensorflow as tf

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


def expand_patterns(patterns):
    """Sorted files matching comma-separated globs (local or `gs://`).

    Raises `FileNotFoundError` naming the pattern that matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    files = []
    for pattern in patterns:
        pattern = pattern.strip()
        matches = tf.io.gfile.glob(pattern) if glob.has_magic(pattern) else (
            [pattern] if tf.io.gfile.exists(pattern) else []
        )
        if not matches:
            raise FileNotFoundError(
                f"No file matches input pattern {pattern!r}."
            )
        files.extend(matches)
    if not files:
        raise ValueError("No input files given.")
    return sorted(set(files))


def read_documents(paths):
    """Documents (lists of non-empty stripped lines) from text files.

    Blank lines separate documents. Raises `ValueError` with the path if a
    file cannot be read as UTF-8 text or holds no text at all.
    """
    documents = []
    for path in paths:
        if tf.io.gfile.isdir(path):
            raise ValueError(
                f"Cannot read input file {path!r}: it is a directory."
            )
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, tf.errors.OpError, UnicodeDecodeError) as e:
            raise ValueError(f"Cannot read input file {path!r}: {e}") from e
        file_documents = [[]]
        for line in text.splitlines():
            line = line.strip()
            if line:
                file_documents[-1].append(line)
            elif file_documents[-1]:
                file_documents.append([])
        file_documents = [d for d in file_documents if d]
        if not file_documents:
            raise ValueError(f"Input file {path!r} holds no text.")
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


def load_vocabulary(path):
    """Tokens of a one-token-per-line vocabulary file; checks the specials."""
    with tf.io.gfile.GFile(path) as f:
        vocabulary = [line.rstrip("\n") for line in f]
    while vocabulary and not vocabulary[-1]:
        vocabulary.pop()
    missing = [t for t in RESERVED_TOKENS if t not in vocabulary]
    if missing:
        raise ValueError(
            f"Vocabulary {path!r} lacks the special tokens {missing}."
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


class AtomicFiles:
    """Writes files under temporary names and renames them all at the end.

    Use as a context manager: `path = files.temp(final)` gives the name to
    write to; on a clean exit the files `remove_on_success` are deleted and
    every temporary file is renamed to its final name, on an exception (Ctrl-C included) every one is deleted, so a failed
    run leaves nothing half-written behind.
    """

    def __init__(self, remove_on_success=()):
        self._pending = []
        self._remove = list(remove_on_success)

    def temp(self, final_path):
        temp_path = f"{final_path}.tmp-{os.getpid()}"
        self._pending.append((temp_path, final_path))
        return temp_path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            for path in self._remove:  # old outputs the new ones replace
                if tf.io.gfile.exists(path):
                    tf.io.gfile.remove(path)
            for temp_path, final_path in self._pending:
                tf.io.gfile.rename(temp_path, final_path, overwrite=True)
        else:
            for temp_path, _ in self._pending:
                if tf.io.gfile.exists(temp_path):
                    tf.io.gfile.remove(temp_path)
        return False


def write_instances(instances, paths, max_seq_length, max_predictions_per_seq,
                    files):
    """Writes `instances` round-robin into `paths` (temporary names from
    `files`, an `AtomicFiles`)."""
    writers = [tf.io.TFRecordWriter(files.temp(p)) for p in paths]
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
    finally:
        for writer in writers:
            writer.close()


def old_outputs(output_dir, overwrite):
    """The data files already in `output_dir`, which `overwrite` allows to
    replace; raises `run_state.FlagError` for a non-empty directory
    without `overwrite`."""
    from tpu_scripts.run_state import FlagError

    if not tf.io.gfile.isdir(output_dir):
        if tf.io.gfile.exists(output_dir):
            raise FlagError(f"--output_dir={output_dir} is a file.")
        return []
    names = sorted(tf.io.gfile.listdir(output_dir))
    if names and not overwrite:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FlagError(
            f"--output_dir={output_dir} is not empty ({len(names)} entries: "
            f"{shown}). New shards next to old ones would be read together "
            "by a glob; use an empty directory or pass --overwrite to "
            "replace the old shards, vocab.txt and metadata.json."
        )
    return [os.path.join(output_dir, n) for n in names
            if n.endswith(".tfrecord")
            or n in (VOCAB_FILENAME, METADATA_FILENAME)]


def create_pretraining_data(input_patterns, output_dir, vocab_file=None,
                            vocabulary_size=8192, lowercase=True,
                            max_seq_length=128, max_predictions_per_seq=20,
                            masked_lm_prob=0.15, short_seq_prob=0.1,
                            dupe_factor=10, whole_word_mask=False,
                            num_shards=1, output_prefix="pretrain",
                            random_seed=12345, overwrite=False, log=print):
    """Text files -> (vocabulary) -> sharded TFRecords; see the module doc.

    Writes into `output_dir`: `{output_prefix}-0000i-of-0000n.tfrecord`,
    `vocab.txt` (the vocabulary used, learnt unless `vocab_file` is given)
    and `metadata.json` (counts and settings; `bert/pretrain.py` reads the
    example count from it). All files appear together at the end or not at
    all. A non-empty `output_dir` is refused unless `overwrite`; then its
    old shards (`*.tfrecord`), `vocab.txt` and `metadata.json` are removed
    when the new files are complete (a glob over the directory never mixes
    two datasets; a failed run leaves the old one whole).

    Returns the metadata dict.
    """
    stale = old_outputs(output_dir, overwrite)
    if not 0 < masked_lm_prob < 1:
        raise ValueError(
            f"masked_lm_prob must be in (0, 1). Received: {masked_lm_prob}."
        )
    if max_predictions_per_seq < 1 or num_shards < 1 or dupe_factor < 1:
        raise ValueError(
            "max_predictions_per_seq, num_shards and dupe_factor must be >= 1."
        )
    paths = expand_patterns(input_patterns)
    documents = read_documents(paths)
    if vocab_file:
        vocabulary = load_vocabulary(vocab_file)
    else:
        log(f"Learning a {vocabulary_size}-token WordPiece vocabulary from "
            f"{len(paths)} file(s).")
        vocabulary = build_vocabulary(documents, vocabulary_size, lowercase)
    tokenizer = make_tokenizer(vocabulary, lowercase)
    tokenized = tokenize_documents(tokenizer, documents)
    maker = InstanceMaker(
        vocabulary, max_seq_length, max_predictions_per_seq, masked_lm_prob,
        short_seq_prob, whole_word_mask, random.Random(random_seed),
    )
    instances = maker.from_documents(tokenized, dupe_factor)
    if not instances:
        raise ValueError(
            f"The input files {paths} gave no training instance (each "
            "instance needs two non-empty segments)."
        )
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
        num_predictions=sum(len(i.masked_lm_positions) for i in instances),
        files=[os.path.basename(p) for p in
               shard_paths(output_dir, output_prefix, num_shards)],
    )
    tf.io.gfile.makedirs(output_dir)
    new_paths = set(shard_paths(output_dir, output_prefix, num_shards))
    with AtomicFiles([p for p in stale if p not in new_paths]) as files:
        write_instances(
            instances, shard_paths(output_dir, output_prefix, num_shards),
            max_seq_length, max_predictions_per_seq, files,
        )
        write_vocabulary(
            vocabulary, files.temp(os.path.join(output_dir, VOCAB_FILENAME))
        )
        with tf.io.gfile.GFile(
            files.temp(os.path.join(output_dir, METADATA_FILENAME)), "w"
        ) as f:
            json.dump(metadata, f, indent=1, sort_keys=True)
    log(f"Wrote {len(instances)} examples from {len(tokenized)} documents "
        f"to {num_shards} file(s) in {output_dir}.")
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
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def record_lengths(path):
    """`{feature: length}` of the first record of TFRecord file `path`."""
    for serialized in tf.data.TFRecordDataset([path]).take(1):
        example = tf.train.Example.FromString(serialized.numpy())
        return {
            name: len(getattr(feature, feature.WhichOneof("kind")).value)
            for name, feature in example.features.feature.items()
        }
    raise ValueError(f"No records in {path!r}.")


def check_record_lengths(files, max_seq_length, max_predictions_per_seq):
    """Raises `run_state.FlagError` naming the flags if the first record of
    `files[0]` does not have `max_seq_length` tokens and
    `max_predictions_per_seq` masked positions."""
    from tpu_scripts.run_state import FlagError

    lengths = record_lengths(files[0])
    missing = [n for n in GOOGLE_FEATURE_NAMES if n not in lengths]
    if missing:
        raise FlagError(
            f"{files[0]} is not a BERT pre-training record file: its records "
            f"lack {missing}."
        )
    found = (lengths["input_ids"], lengths["masked_lm_positions"])
    if found != (max_seq_length, max_predictions_per_seq):
        raise FlagError(
            f"The records in {files[0]} have {found[0]} tokens and "
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


def load_records(patterns, max_seq_length, max_predictions_per_seq):
    """Every record of the files as a dict of numpy arrays (in file order)."""
    files = expand_patterns(patterns)
    ds = tf.data.TFRecordDataset(files).batch(4096).map(
        lambda s: parse_examples(s, max_seq_length, max_predictions_per_seq)
    )
    batches = list(ds.as_numpy_iterator())
    if not batches:
        raise ValueError(f"No records in {files}.")
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


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
            raise ValueError(
                f"The training set has {num_examples} examples, fewer than "
                f"one global batch of {global_batch_size}."
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
