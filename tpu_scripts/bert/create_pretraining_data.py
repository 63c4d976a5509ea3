r"""Text files -> WordPiece vocabulary -> BERT pre-training TFRecords.

The records have google-research/bert's features (`input_ids`, `input_mask`,
`segment_ids`, `masked_lm_positions`, `masked_lm_ids`, `masked_lm_weights`,
`next_sentence_labels`), so records made by either tool work with either
trainer. Input: one sentence per line, blank lines between documents (any
plain text works; its paragraphs become the documents).

Phase-1 data (sequence 128) with a vocabulary learnt from the corpus:

    python -m tpu_scripts.bert.create_pretraining_data \
      --input_files='corpus/*.txt' --output_dir=/tmp/bert/seq128 \
      --vocab_size=30522 --max_seq_length=128 --max_predictions_per_seq=20 \
      --dupe_factor=5 --num_shards=64

Phase-2 data (sequence 512) with the same vocabulary:

    python -m tpu_scripts.bert.create_pretraining_data \
      --input_files='corpus/*.txt' --output_dir=/tmp/bert/seq512 \
      --vocab_file=/tmp/bert/seq128/vocab.txt --max_seq_length=512 \
      --max_predictions_per_seq=80 --dupe_factor=5 --num_shards=64

`--output_dir` becomes a dataset folder: the shards, `vocab.txt` and
`metadata.json` go into a new version folder `data-<time>-<id>/` inside it,
and `--output_dir/CURRENT` names that folder once every file is complete.
The scripts read through `CURRENT`:
`--input_files='/tmp/bert/seq128/*.tfrecord'` (or just the folder) and
`--vocab_file=/tmp/bert/seq128/vocab.txt` work as written, and see the old dataset or the new one, never a mix, even while
`--overwrite` replaces it or after a run was killed. `--output_dir` must be
empty unless `--overwrite`; the old version is removed after the switch,
and what a killed run left is removed by the next one. The same inputs and
`--random_seed` give byte-identical files. Flags are checked before any
file is read. The logic lives in `tpu_scripts.bert.data`.
"""

import os
import sys

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
    sys.path.insert(0, os.path.abspath(
        os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

from absl import app, flags  # noqa: E402


def define_flags(flag_values=None):
    """Defines the script's flags on `flag_values` (default: absl FLAGS)."""
    f = dict(flag_values=flags.FLAGS if flag_values is None else flag_values)
    flags.DEFINE_string(
        "input_files", None, "Comma-separated globs of UTF-8 text files "
        "(local or gs://).", **f)
    flags.DEFINE_string("output_dir", None, "Dataset folder: the TFRecord "
                        "shards, vocab.txt and metadata.json go into a new "
                        "version folder in it, named by its CURRENT file.",
                        **f)
    flags.DEFINE_string("output_prefix", "pretrain", "Shard file prefix.",
                        **f)
    flags.DEFINE_integer("num_shards", 1, "Output TFRecord files.", **f)
    flags.DEFINE_string(
        "vocab_file", None, "Existing WordPiece vocabulary (e.g. "
        "google-research/bert's vocab.txt); default: learn one from the "
        "input with keras-hub's compute_word_piece_vocabulary.", **f)
    flags.DEFINE_integer("vocab_size", 30522, "Size of the learnt "
                         "vocabulary (an upper bound).", **f)
    flags.DEFINE_boolean("do_lower_case", True, "Uncased: lowercase and "
                         "strip accents.", **f)
    flags.DEFINE_integer("max_seq_length", 128, "Tokens per sequence, "
                         "[CLS] and [SEP]s included.", **f)
    flags.DEFINE_integer("max_predictions_per_seq", 20, "Masked positions "
                         "per sequence at most.", **f)
    flags.DEFINE_float("masked_lm_prob", 0.15, "Fraction of tokens "
                       "masked.", **f)
    flags.DEFINE_float("short_seq_prob", 0.1, "Probability of a shorter "
                       "target length.", **f)
    flags.DEFINE_integer("dupe_factor", 10, "Maskings of each document.",
                         **f)
    flags.DEFINE_boolean("do_whole_word_mask", False, "Mask all WordPieces "
                         "of a word together.", **f)
    flags.DEFINE_integer("random_seed", 12345, "Seed: the same seed and "
                         "inputs give the same bytes.", **f)
    flags.DEFINE_boolean(
        "overwrite", False, "Replace the dataset of a non-empty --output_dir "
        "(the old one stays readable until the new one is complete; without "
        "it such a directory is refused).", **f)


def run(f):
    """Runs the script with flags `f`; returns the metadata."""
    from tpu_scripts import run_state
    from tpu_scripts.bert import data as bert_data

    for name in ("input_files", "output_dir"):
        if not getattr(f, name):
            raise run_state.FlagError(f"--{name} is required.")
    return bert_data.create_pretraining_data(
        f.input_files, f.output_dir, vocab_file=f.vocab_file,
        vocabulary_size=f.vocab_size, lowercase=f.do_lower_case,
        max_seq_length=f.max_seq_length,
        max_predictions_per_seq=f.max_predictions_per_seq,
        masked_lm_prob=f.masked_lm_prob, short_seq_prob=f.short_seq_prob,
        dupe_factor=f.dupe_factor, whole_word_mask=f.do_whole_word_mask,
        num_shards=f.num_shards, output_prefix=f.output_prefix,
        random_seed=f.random_seed, overwrite=f.overwrite,
    )


def main(argv):
    from tpu_scripts import run_state

    run_state.run_script(run, argv)


if __name__ == "__main__":
    define_flags()
    app.run(main)
