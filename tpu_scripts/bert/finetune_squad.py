r"""Fine-tunes a pre-trained BERT on SQuAD v1.1 and reports EM / F1.

From a `tpu_scripts/bert/pretrain.py` phase-2 checkpoint, on a TPU, with TFDS
`squad/v1.1` (downloaded by TFDS into --tfds_data_dir):

    python -m tpu_scripts.bert.finetune_squad --strategy=tpu --tpu=my-tpu \
      --init_checkpoint=gs://my-bucket/bert/phase2 \
      --vocab_file=gs://my-bucket/bert/vocab.txt --bert_config=large \
      --tfds_data_dir=gs://my-bucket/tfds --global_batch_size=48 \
      --learning_rate=5e-5 --num_train_epochs=2 --mixed_precision=bfloat16 \
      --model_dir=gs://my-bucket/bert/squad

Offline, from the SQuAD JSON files (`train-v1.1.json`, `dev-v1.1.json`):

    python tpu_scripts/bert/finetune_squad.py --train_file=train-v1.1.json \
      --predict_file=dev-v1.1.json --init_checkpoint=/tmp/bert/phase2 \
      --vocab_file=/tmp/bert/vocab.txt --bert_config=tiny \
      --max_seq_length=128 --model_dir=/tmp/bert/squad

Writes `predictions.json` ({question id: answer}) and `results.json`
(`exact_match`, `f1` in percent, as the official v1.1 script) to
`--model_dir`. Training runs on the shared trainer (`tpu_scripts.trainer`);
the logic lives in `tpu_scripts.bert.squad`.
"""

import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
    sys.path.insert(0, os.path.abspath(
        os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if __name__ == "__main__":  # TensorFlow unless KERAS_BACKEND=jax
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags  # noqa: E402

from tpu_scripts import distribute  # noqa: E402
from tpu_scripts.bert import pretrain as bert_pretrain  # noqa: E402

FLAG_NAMES = set()


def define_flags(flag_values=None):
    """Defines the script's flags on `flag_values` (default: absl FLAGS)."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    before = set(flag_values)
    f = dict(flag_values=flag_values)
    distribute.define_flags(flag_values)
    flags.DEFINE_string(
        "train_file", None, "SQuAD v1.1 training JSON (default: TFDS "
        "squad/v1.1 train).", **f)
    flags.DEFINE_string(
        "predict_file", None, "SQuAD v1.1 JSON to answer and score "
        "(default: TFDS squad/v1.1 validation).", **f)
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory.", **f)
    flags.DEFINE_string(
        "init_checkpoint", None, "bert/pretrain.py checkpoint (prefix or "
        "model_dir) whose encoder starts fine-tuning (none: random).", **f)
    flags.DEFINE_string("bert_config", "base", "tiny, mini, small, medium, "
                        "base, large or a JSON file; as pre-training.", **f)
    flags.DEFINE_string("vocab_file", None, "The pre-training WordPiece "
                        "vocabulary.", **f)
    flags.DEFINE_boolean("do_lower_case", True, "Uncased tokenization "
                         "(lowercase, strip accents).", **f)
    flags.DEFINE_float("dropout", None, "Dropout (default: the config's).",
                       **f)
    flags.DEFINE_integer("max_seq_length", 384, "Tokens per feature.", **f)
    flags.DEFINE_integer("doc_stride", 128, "Stride between context "
                         "windows.", **f)
    flags.DEFINE_integer("max_query_length", 64, "Question tokens kept.", **f)
    flags.DEFINE_integer("global_batch_size", 32, "Features per step over "
                         "all replicas.", **f)
    flags.DEFINE_integer("predict_batch_size", 0, "Features per prediction "
                         "step (0: --global_batch_size).", **f)
    flags.DEFINE_float("num_train_epochs", 2.0, "Training epochs.", **f)
    flags.DEFINE_integer("train_steps", 0, "Training steps (0: from "
                         "--num_train_epochs).", **f)
    flags.DEFINE_enum("optimizer", "adamw", bert_pretrain.OPTIMIZER_NAMES,
                      "Optimizer (BERT fine-tunes with AdamW).", **f)
    flags.DEFINE_float("learning_rate", 5e-5, "Peak learning rate.", **f)
    flags.DEFINE_float("warmup_proportion", 0.1, "Linear warmup fraction, "
                       "then linear decay to 0.", **f)
    flags.DEFINE_float("weight_decay", 0.01, "Weight decay.", **f)
    flags.DEFINE_integer("n_best_size", 20, "Start/end candidates per "
                         "feature.", **f)
    flags.DEFINE_integer("max_answer_length", 30, "Longest answer, tokens.",
                         **f)
    flags.DEFINE_string("model_dir", None, "Checkpoints, TensorBoard logs, "
                        "predictions.json, results.json (resumes).", **f)
    flags.DEFINE_integer("steps_per_loop", 100, "Steps per compiled loop.",
                         **f)
    flags.DEFINE_integer("seed", 0, "Seed of the head and the order.", **f)
    flags.DEFINE_float(
        "checkpoint_every_minutes", 30.0, "Checkpoint every epoch and at "
        "the first loop boundary this many minutes after the last "
        "checkpoint (0: not by time). On SIGTERM the run saves a checkpoint "
        "and exits with code 143.", **f)
    flags.DEFINE_boolean(
        "allow_changed_flags", False, "Resume a run in --model_dir even if "
        "flags that shape its training differ from its first start.", **f)
    FLAG_NAMES.update(set(flag_values) - before)


# Flags that do not change the fine-tuned weights: everything else is the
# run's identity (`run_state.RunRecord`).
NOT_IDENTITY_FLAGS = (
    "strategy", "tpu", "num_cpu_devices", "collective", "jit_compile",
    "predict_file", "predict_batch_size", "n_best_size", "max_answer_length",
    "model_dir", "steps_per_loop", "checkpoint_every_minutes",
    "allow_changed_flags",
)


def validate_flags(flags_):
    """Raises `run_state.FlagError` naming the flag for a value out of range
    (before any data or model is built)."""
    from tpu_scripts import run_state

    def check(name, ok, requirement):
        if not ok:
            raise run_state.FlagError(
                f"--{name} must be {requirement}. Received: "
                f"{getattr(flags_, name)!r}."
            )

    check("vocab_file", bool(flags_.vocab_file),
          "given (the pre-training vocabulary)")
    for name in ("max_seq_length", "doc_stride", "max_query_length",
                 "global_batch_size", "n_best_size", "max_answer_length",
                 "steps_per_loop"):
        check(name, getattr(flags_, name) >= 1, ">= 1")
    for name in ("predict_batch_size", "train_steps", "learning_rate",
                 "weight_decay", "checkpoint_every_minutes",
                 "num_cpu_devices"):
        check(name, getattr(flags_, name) >= 0, ">= 0")
    check("num_train_epochs",
          flags_.num_train_epochs > 0 or flags_.train_steps > 0,
          "positive (or set --train_steps)")
    check("warmup_proportion", 0 <= flags_.warmup_proportion < 1,
          "in [0, 1)")
    check("dropout", flags_.dropout is None or 0 <= flags_.dropout < 1,
          "in [0, 1)")
    bert_pretrain.check_finite_flags(_flag_values(flags_))
    run_state.check_init_checkpoint(flags_.init_checkpoint, flags_.model_dir)
    # The files, before anything is written (run_identity.json).
    import keras

    from tpu_scripts import fileio
    from tpu_scripts.bert import data as bert_data
    from tpu_scripts.bert import models as bert_models

    for name in ("train_file", "predict_file"):
        path = getattr(flags_, name)
        if path and not fileio.exists(path):
            raise run_state.DataError(
                f"--{name}={path} does not exist. SQuAD v1.1's files are "
                "train-v1.1.json and dev-v1.1.json "
                "(https://rajpurkar.github.io/SQuAD-explorer/); without the "
                "flag the run reads TFDS squad/v1.1."
            )
    bert_data.load_vocabulary(flags_.vocab_file)
    bert_models.load_bert_config(flags_.bert_config)
    if flags_.init_checkpoint and keras.backend.backend() == "tensorflow":
        bert_models.resolve_checkpoint(flags_.init_checkpoint)


def _flag_values(flags_):
    if isinstance(flags_, flags.FlagValues):
        return {n: flags_[n].value for n in sorted(FLAG_NAMES) if n in flags_}
    return dict(vars(flags_))


def run(flags_, log=print):
    """Fine-tunes and evaluates as `flags_` say; returns the results."""
    from tpu_scripts import run_state
    from tpu_scripts.bert import (data as bert_data, models as bert_models,
                                  squad as bert_squad)

    start = time.time()
    validate_flags(flags_)
    runtime = distribute.setup(flags_, layout_map=bert_models.layout_map)
    is_chief = runtime.is_chief
    log = log if is_chief else (lambda *a, **k: None)
    distribute.per_replica_batch_size(flags_.global_batch_size,
                                      runtime.num_replicas)
    distribute.per_replica_batch_size(
        flags_.predict_batch_size or flags_.global_batch_size,
        runtime.num_replicas, "predict_batch_size")
    record = run_state.RunRecord(
        flags_.model_dir, {n: v for n, v in _flag_values(flags_).items()
                           if n not in NOT_IDENTITY_FLAGS},
        flags_.model_dir and os.path.join(flags_.model_dir, "results.json"),
        flags_.allow_changed_flags, is_chief, log,
    )
    finished = record.start()
    if finished is not None:
        return finished
    distribute.set_random_seed(flags_.seed)
    vocabulary = bert_data.load_vocabulary(flags_.vocab_file)
    tokenizer = bert_data.make_tokenizer(vocabulary, flags_.do_lower_case)

    def features(examples, training):
        return bert_squad.make_features(
            examples, tokenizer, vocabulary, flags_.max_seq_length,
            flags_.doc_stride, flags_.max_query_length, training=training,
        )

    def read(path, split):
        if path:
            return bert_squad.read_squad_json(path)
        return bert_squad.read_squad_tfds(split, flags_.tfds_data_dir)

    train_examples = read(flags_.train_file, "train")
    predict_examples = read(flags_.predict_file, "validation")
    unanswered = sum(not e.answers for e in predict_examples)
    if unanswered == len(predict_examples):
        raise run_state.FlagError(
            f"No question of --predict_file={flags_.predict_file} has an "
            "answer: the SQuAD v1.1 metric has nothing to score."
        )
    if unanswered:
        log(f"{unanswered} question(s) to answer have no ground-truth "
            "answer: they get predictions but no EM/F1 score.")
    train_arrays, _ = features(train_examples, training=True)
    predict_arrays, predict_meta = features(predict_examples, training=False)
    log(f"{len(train_examples)} training questions -> "
        f"{len(train_arrays['input_ids'])} features; "
        f"{len(predict_examples)} to answer -> "
        f"{len(predict_arrays['input_ids'])} features.")
    train_input = bert_data.ArrayInput(
        train_arrays, flags_.global_batch_size, training=True,
        seed=flags_.seed,
    )
    train_steps = flags_.train_steps or max(
        2, round(flags_.num_train_epochs * train_input.steps_per_epoch)
    )
    plan = dict(
        optimizer=flags_.optimizer, learning_rate=flags_.learning_rate,
        train_steps=train_steps,
        warmup_steps=max(1, round(flags_.warmup_proportion * train_steps)),
        decay_power=1.0, end_learning_rate=0.0,
        weight_decay=flags_.weight_decay, beta_1=0.9, beta_2=0.999,
        epsilon=1e-6, clipnorm=1.0, momentum=0.9, trust_coefficient=1e-3,
        gradient_accumulation_steps=1,
    )
    record.check_plan(dict(
        plan, global_batch_size=flags_.global_batch_size,
        train_features=len(train_arrays["input_ids"]),
        # Only JAX runs name their engine (see tpu_scripts/resnet/train.py).
        **({"engine": "jax"} if runtime.engine == "jax" else {})))
    config = bert_models.load_bert_config(
        flags_.bert_config, vocabulary_size=len(vocabulary),
        dropout=flags_.dropout,
    )

    def model_fn():
        backbone = bert_models.build_backbone(config)
        if flags_.init_checkpoint:
            # The pre-training model around the same encoder reads the
            # checkpoint; the span model then shares the restored encoder.
            prefix = bert_models.load_pretrained_weights(
                bert_models.BertPretrainer(backbone), flags_.init_checkpoint
            )
            log(f"Encoder initialised from {prefix}.")
        return bert_models.BertSpanModel(backbone)

    loop = runtime.trainer(
        bert_squad.SquadTask(model_fn),
        lambda: bert_pretrain.make_training_optimizer(
            plan, mixed_precision=flags_.mixed_precision,
        ),
        flags_.global_batch_size, model_dir=flags_.model_dir,
        steps_per_loop=flags_.steps_per_loop,
        jit_compile=flags_.jit_compile, log=log,
        unit="sequences",
    )
    if runtime.engine == "tensorflow":  # JAX checkpoints hold every variable
        bert_models.checkpoint_dropout_state(loop.checkpoint, loop.model,
                                             flags_.model_dir, log)
    outcome = loop.train(
        train_input, train_steps,
        checkpoint_every_steps=train_input.steps_per_epoch,
        checkpoint_every_seconds=60 * flags_.checkpoint_every_minutes,
        record=record,
    )
    totals = record.totals(flags_.global_batch_size)
    start_logits, end_logits = bert_squad.predict_logits(
        loop, predict_arrays,
        flags_.predict_batch_size or flags_.global_batch_size,
    )
    predictions = bert_squad.best_answers(
        predict_examples, predict_meta, start_logits, end_logits,
        flags_.n_best_size, flags_.max_answer_length,
    )
    if flags_.model_dir and is_chief:  # before scoring: never lost
        run_state.write_json(
            os.path.join(flags_.model_dir, "predictions.json"), predictions)
    metrics = bert_squad.squad_v1_metrics(predictions, predict_examples)
    results = dict(
        **metrics, train=outcome["train"], train_steps=outcome["step"],
        # Over every segment of the run (restarts, preemptions).
        train_seconds=(totals["train_seconds"] if flags_.model_dir
                       else outcome["train_seconds"]),
        wall_seconds=time.time() - start,
        train_features=len(train_arrays["input_ids"]),
        predict_features=len(predict_arrays["input_ids"]),
        num_replicas=runtime.num_replicas, engine=runtime.engine, plan=plan,
        flags=_flag_values(flags_),
    )
    log(f"SQuAD v1.1: exact match {metrics['exact_match']:.2f}, F1 "
        f"{metrics['f1']:.2f} over {metrics['count']} questions.")
    return record.finish(results, outcome["step"])


def main(argv):
    from tpu_scripts import run_state

    run_state.run_script(run, argv)


if __name__ == "__main__":
    define_flags()
    app.run(main)
