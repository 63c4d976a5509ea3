r"""Pre-trains BERT (masked LM + next sentence) with LAMB on any strategy.

The LAMB paper's BERT-Large run on a TPU pod, phase 1 (batch 65,536, sequence
128) and phase 2 (batch 32,768, sequence 512, re-warmed from phase 1):

    python -m tpu_scripts.bert.pretrain --strategy=tpu --tpu=my-pod \
      --input_files='gs://my-bucket/bert/seq128/*.tfrecord' \
      --vocab_file=gs://my-bucket/bert/vocab.txt --bert_config=large \
      --recipe=lamb_64k_32k --phase=1 --mixed_precision=bfloat16 \
      --steps_per_loop=200 --model_dir=gs://my-bucket/bert/phase1
    python -m tpu_scripts.bert.pretrain --strategy=tpu --tpu=my-pod \
      --input_files='gs://my-bucket/bert/seq512/*.tfrecord' \
      --vocab_file=gs://my-bucket/bert/vocab.txt --bert_config=large \
      --recipe=lamb_64k_32k --phase=2 --mixed_precision=bfloat16 \
      --init_checkpoint=gs://my-bucket/bert/phase1 \
      --steps_per_loop=100 --model_dir=gs://my-bucket/bert/phase2

A tiny run on one CPU machine, emulating batch 1024 with 8 steps of 128:

    python tpu_scripts/bert/pretrain.py --input_files='/tmp/bert/*.tfrecord' \
      --vocab_file=/tmp/bert/vocab.txt --bert_config=tiny \
      --max_seq_length=64 --max_predictions_per_seq=10 --recipe=lamb_paper \
      --global_batch_size=1024 --gradient_accumulation_steps=8 \
      --train_steps=50 --in_memory --model_dir=/tmp/bert/run

Checkpoints, TensorBoard logs (loss, MLM and NSP accuracy and loss, learning
rate, per-variable trust ratios) and `results.json` go to `--model_dir`; a
run restarted with the same `--model_dir` resumes from its last checkpoint.

The script is also the library of pre-training (the other BERT scripts
import it): `run(flags_)` takes the script's flags (or any object with the
same attributes). The pieces:

- `plan_hyperparameters`: a recipe's numbers (`keras_lamb.recipes`) with
  every value a flag sets explicitly overriding the recipe's;
- `make_optimizer`: LAMB, LARS, AdamW or Adam with a warmup + polynomial
  decay schedule, clipping and the BERT exclusions; `make_training_optimizer`
  densifies embedding gradients for Keras's own optimizers (see
  `densify_sparse_gradients`). LAMB and LARS clip the all-reduced gradient
  by themselves under every strategy;
- `BertPretrainingTask`: the loss and metrics, in `keras.ops`, for both
  engines (`tpu_scripts.trainer`, `tpu_scripts.jax_trainer`).

Gradient accumulation. With `gradient_accumulation_steps=k` each trainer step
is one optimizer update on `global_batch_size` examples: every replica runs
its share as k micro-batches of `global_batch_size / (k * replicas)`, sums
their gradients locally, and the optimizer all-reduces and applies the sum
once (`trainer.Trainer(gradient_accumulation_steps=k)`). Each micro-batch
loss is divided by the whole update's batch, so that sum is exactly the
gradient of the mean loss over all `global_batch_size` examples: BERT has no
BatchNorm (nothing couples the examples of a micro-batch) and, with dropout
off, the k micro-batches equal one step on the whole batch up to float
summation order (`tests/test_bert_pretraining.py` checks this). With dropout
on, the masks differ but are drawn from the same distribution. Steps,
schedules, `--eval_every_steps` and `--save_checkpoints_steps` all count
optimizer updates.

Loss. Per example: the mean cross-entropy over its masked positions plus the
next-sentence cross-entropy; the batch loss is the mean over examples.
google-research/bert instead divides the summed masked-LM loss by the number
of masked positions in the (per-core) batch; with a fixed number of
predictions per full-length sequence the two agree, and the per-example form
does not depend on the replica count or on gradient accumulation.
"""

import os
import sys

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
    sys.path.insert(0, os.path.abspath(
        os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
if __name__ == "__main__":  # TensorFlow unless KERAS_BACKEND=jax
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import math  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_lamb  # noqa: E402
from keras_lamb import recipes  # noqa: E402
from keras_lamb.schedules import warmup_polynomial_decay  # noqa: E402
from tpu_scripts import distribute, run_state  # noqa: E402
from tpu_scripts.tasks import Task  # noqa: E402
from tpu_scripts.bert import data as bert_data  # noqa: E402
from tpu_scripts.bert import models as bert_models  # noqa: E402

OPTIMIZER_NAMES = ("lamb", "adamw", "adam", "lars")
RECIPE_NAMES = ("lamb_paper", "lamb_64k_32k", "nvidia", "none")

# Masked positions per sequence in google-research/bert's data for the two
# sequence lengths of the two-phase recipes.
MAX_PREDICTIONS = {128: 20, 512: 80}

# NVIDIA DeepLearningExamples PyTorch BERT, `scripts/run_pretraining.sh`
# (DGX-1, 8 GPUs): the 64k/32k batches are reached by accumulating 128 (phase
# 1) and 512 (phase 2) steps of 8 x 64 and 8 x 8 sequences.
NVIDIA_ACCUMULATION_STEPS = {1: 128, 2: 512}

# `--recipe=none` defaults: BERT's Adam(W) settings (Devlin et al.).
DEFAULTS = dict(
    learning_rate=1e-4, warmup_ratio=0.01, decay_power=1.0,
    end_learning_rate=0.0, weight_decay=0.01, beta_1=0.9, beta_2=0.999,
    epsilon=1e-6, clipnorm=1.0, momentum=0.9, trust_coefficient=1e-3,
)
# Hyperparameter flags: `None` means "the recipe's (or DEFAULTS') value".
HYPERPARAMETER_FLAGS = (
    "learning_rate", "warmup_steps", "decay_power", "end_learning_rate",
    "weight_decay", "beta_1", "beta_2", "epsilon", "clipnorm", "momentum",
    "trust_coefficient",
)


# ----------------------------------------------------------------------------
# Hyperparameters


def _recipe_numbers(recipe, phase, global_batch_size, train_steps,
                    weight_decay):
    """The recipe's numbers: a dict of hyperparameters (update units)."""
    if recipe == "lamb_paper":
        _, _, notes = recipes.lamb_bert(
            global_batch_size, total_steps=train_steps,
            **({} if weight_decay is None else {"weight_decay": weight_decay}),
        )
        return dict(
            source=notes["source"], global_batch_size=global_batch_size,
            train_steps=notes["total_steps"],
            learning_rate=notes["peak_learning_rate"],
            warmup_steps=notes["warmup_steps"],
            decay_power=notes["decay_power"],
            end_learning_rate=notes["end_learning_rate"],
            weight_decay=notes["weight_decay"], epsilon=notes["epsilon"],
            clipnorm=notes["global_clipnorm"],
        )
    if recipe in ("lamb_64k_32k", "nvidia"):
        _, _, notes = recipes.lamb_bert_64k_32k()
        if phase not in (1, 2):
            raise run_state.FlagError(
                f"--recipe={recipe} has phases 1 and 2. Received: "
                f"--phase={phase}."
            )
        numbers = notes["phases"][phase - 1]
        steps = numbers["steps"] if train_steps is None else train_steps
        warmup = numbers["warmup_steps"] if train_steps is None else max(
            1, round(numbers["warmup_ratio"] * steps)
        )
        plan = dict(
            source=notes["source"],
            global_batch_size=numbers["global_batch_size"],
            max_seq_length=numbers["sequence_length"],
            max_predictions_per_seq=MAX_PREDICTIONS[
                numbers["sequence_length"]
            ],
            train_steps=steps, learning_rate=numbers["peak_learning_rate"],
            warmup_steps=warmup, decay_power=notes["decay_power"],
            end_learning_rate=notes["end_learning_rate"],
            weight_decay=notes["weight_decay"], epsilon=notes["epsilon"],
            clipnorm=notes["global_clipnorm"],
        )
        if recipe == "nvidia":
            plan["gradient_accumulation_steps"] = (
                NVIDIA_ACCUMULATION_STEPS[phase]
            )
        return plan
    return dict(source="--recipe=none (BERT defaults, Devlin et al.)")


def plan_hyperparameters(flags_):
    """Every training hyperparameter: the recipe's, then explicit flags.

    Returns a dict with `optimizer`, `global_batch_size` (examples per
    optimizer update), `gradient_accumulation_steps`, `train_steps` and
    `warmup_steps` (optimizer updates), `learning_rate` (peak), the
    optimizer's settings, `max_seq_length`, `max_predictions_per_seq`,
    `recipe`, `phase` and `source`.
    """
    distribute.check_choice("recipe", flags_.recipe, RECIPE_NAMES)
    distribute.check_choice("optimizer", flags_.optimizer, OPTIMIZER_NAMES)
    recipe = flags_.recipe
    batch = flags_.global_batch_size
    if recipe == "lamb_paper" and not batch:
        raise run_state.FlagError(
            "--recipe=lamb_paper needs --global_batch_size.")
    plan = _recipe_numbers(recipe, flags_.phase, batch, flags_.train_steps,
                           flags_.weight_decay)
    plan.update(recipe=recipe, phase=flags_.phase, optimizer=flags_.optimizer)
    for name in ("global_batch_size", "train_steps", "max_seq_length",
                 "max_predictions_per_seq", "gradient_accumulation_steps"):
        value = getattr(flags_, name)
        if value:
            plan[name] = value
    plan.setdefault("gradient_accumulation_steps", 1)
    for name, value in DEFAULTS.items():
        if name != "warmup_ratio":
            plan.setdefault(name, value)
    for name in HYPERPARAMETER_FLAGS:
        value = getattr(flags_, name)
        if value is not None:
            plan[name] = value
    if not plan.get("max_predictions_per_seq"):
        plan["max_predictions_per_seq"] = MAX_PREDICTIONS.get(
            plan.get("max_seq_length"))
    for name in ("global_batch_size", "train_steps", "max_seq_length",
                 "max_predictions_per_seq"):
        if not plan.get(name):
            raise run_state.FlagError(
                f"--{name} is required with --recipe={recipe}.")
    if "warmup_steps" not in plan:
        plan["warmup_steps"] = max(
            1, round(DEFAULTS["warmup_ratio"] * plan["train_steps"])
        )
    if not 1 <= plan["warmup_steps"] < plan["train_steps"]:
        raise run_state.FlagError(
            f"--warmup_steps must be in [1, train_steps={plan['train_steps']})"
            f". Received: {plan['warmup_steps']}."
        )
    k = plan["gradient_accumulation_steps"]
    if k < 1 or plan["global_batch_size"] % k:
        raise run_state.FlagError(
            f"--global_batch_size={plan['global_batch_size']} must be a "
            f"multiple of --gradient_accumulation_steps={k} (>= 1)."
        )
    plan["micro_batch_size"] = plan["global_batch_size"] // k
    return plan


# ----------------------------------------------------------------------------
# Optimizer


def make_schedule(plan):
    """Linear warmup to the peak, then polynomial decay at the global step
    (the BERT reference code's and the LAMB recipes' schedule)."""
    schedule = warmup_polynomial_decay(
        plan["learning_rate"], plan["train_steps"], plan["warmup_steps"],
        end_learning_rate=plan["end_learning_rate"],
        power=plan["decay_power"],
    )
    return schedule


def make_optimizer(plan, track_trust_ratios=False, mixed_precision="none"):
    """The optimizer `plan` describes (call inside `strategy.scope()`).

    LayerNorm parameters and biases are excluded from weight decay (all
    optimizers) and from layer adaptation (LAMB, LARS), as in the LAMB
    recipes (`keras_lamb.recipes.BERT_EXCLUDE`).
    """
    common = dict(
        learning_rate=make_schedule(plan),
        global_clipnorm=plan["clipnorm"] or None,
    )
    name = plan["optimizer"]
    exclude = recipes.BERT_EXCLUDE
    if name == "lamb":
        optimizer = keras_lamb.LAMB(
            beta_1=plan["beta_1"], beta_2=plan["beta_2"],
            epsilon=plan["epsilon"], weight_decay=plan["weight_decay"],
            exclude_from_weight_decay=exclude,
            exclude_from_layer_adaptation=exclude,
            track_trust_ratios=track_trust_ratios, **common,
        )
    elif name == "lars":
        optimizer = keras_lamb.LARS(
            momentum=plan["momentum"], weight_decay=plan["weight_decay"],
            trust_coefficient=plan["trust_coefficient"],
            exclude_from_weight_decay=exclude,
            exclude_from_layer_adaptation=exclude,
            track_trust_ratios=track_trust_ratios, **common,
        )
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(
            weight_decay=plan["weight_decay"], beta_1=plan["beta_1"],
            beta_2=plan["beta_2"], epsilon=plan["epsilon"], **common,
        )
        # Keras matches `var_names` against `variable.name` (gamma, beta,
        # bias, output_bias in keras-hub's BERT).
        optimizer.exclude_from_weight_decay(
            var_names=["gamma", "beta", "bias"]
        )
    elif name == "adam":
        optimizer = keras.optimizers.Adam(
            beta_1=plan["beta_1"], beta_2=plan["beta_2"],
            epsilon=plan["epsilon"], **common,
        )
    else:
        distribute.check_choice("optimizer", name, OPTIMIZER_NAMES)
    if mixed_precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def densify_sparse_gradients(optimizer):
    """Converts `tf.IndexedSlices` gradients to dense before `apply`.

    The gradient of an embedding lookup (here the segment embedding; the
    token embedding is tied to the masked-LM output, so its gradient is
    already dense) is a `tf.IndexedSlices` with one row per token, so its
    indices repeat. Keras 3.15 (TensorFlow backend) squares such gradients
    row by row, so Adam's second moment gets `sum(g_i**2)` instead of
    `(sum g_i)**2`, and `global_clipnorm` measures `sqrt(sum ||g_i||**2)`
    instead of the norm of the summed gradient: both wrong, and by a factor
    that grows with the batch (gradient accumulation, which sums into dense
    buffers, disagrees with one large batch). keras_lamb's LAMB and LARS
    densify gradients themselves; this makes AdamW, Adam and the clipping
    right too. The embedding tables here are small (2 and 512 rows), and
    google-research/bert uses dense (one-hot) embedding gradients on TPU
    anyway. Patches `optimizer.apply` in place; returns the optimizer.
    """
    import tensorflow as tf

    apply = optimizer.apply

    def apply_dense(grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices)
                 else g for g in grads]
        return apply(grads, trainable_variables)

    optimizer.apply = apply_dense
    return optimizer


def make_training_optimizer(plan, track_trust_ratios=False,
                            mixed_precision="none"):
    """`make_optimizer` ready for the trainer: on TensorFlow, dense
    gradients (`densify_sparse_gradients`; JAX's are dense already).

    Clipping: keras_lamb's LAMB and LARS clip the all-reduced gradient under
    every strategy. Keras's AdamW and Adam clip each replica's gradient
    before the all-reduce, so with several replicas their `--clipnorm`
    differs from one device's (see docs/distributed.md).
    """
    optimizer = make_optimizer(plan, track_trust_ratios, mixed_precision)
    if keras.backend.backend() != "tensorflow":
        return optimizer
    return densify_sparse_gradients(optimizer)


# ----------------------------------------------------------------------------
# Task


class BertPretrainingTask(Task):
    """Masked-LM + next-sentence loss and metrics on google-research/bert
    feature dicts (see the module doc for the loss)."""

    MODEL_INPUTS = ("input_ids", "input_mask", "segment_ids",
                    "masked_lm_positions")

    def __init__(self, model_fn):
        self.model_fn = model_fn

    def build_model(self):
        return self.model_fn()

    def build_metrics(self):
        return {
            "mlm_accuracy": keras.metrics.SparseCategoricalAccuracy(
                "mlm_accuracy"
            ),
            "nsp_accuracy": keras.metrics.SparseCategoricalAccuracy(
                "nsp_accuracy"
            ),
            "mlm_loss": keras.metrics.Mean("mlm_loss"),
            "nsp_loss": keras.metrics.Mean("nsp_loss"),
        }

    def compute_loss(self, model, batch, training):
        outputs = model({k: batch[k] for k in self.MODEL_INPUTS},
                        training=training)
        mlm_logits = ops.cast(outputs["mlm_logits"], "float32")
        nsp_logits = ops.cast(outputs["nsp_logits"], "float32")
        weights = ops.cast(batch["masked_lm_weights"], "float32")
        mlm_xent = ops.sparse_categorical_crossentropy(
            batch["masked_lm_ids"], mlm_logits, from_logits=True
        )
        mlm_loss = ops.divide_no_nan(
            ops.sum(mlm_xent * weights, axis=-1),
            ops.sum(weights, axis=-1),
        )
        nsp_loss = ops.sparse_categorical_crossentropy(
            batch["next_sentence_labels"][:, 0], nsp_logits, from_logits=True
        )
        per_example = mlm_loss + nsp_loss
        example_weights = self.example_weights(batch)
        if example_weights is not None:
            per_example *= example_weights
        return per_example, dict(
            mlm_logits=mlm_logits, nsp_logits=nsp_logits,
            mlm_loss=mlm_loss, nsp_loss=nsp_loss,
        )

    def example_weights(self, batch):
        return batch.get("example_weight")

    def update_metrics(self, metrics, batch, outputs):
        example_weights = self.example_weights(batch)
        mlm_weights = ops.cast(batch["masked_lm_weights"], "float32")
        if example_weights is not None:
            mlm_weights *= example_weights[:, None]
        metrics["mlm_accuracy"].update_state(
            batch["masked_lm_ids"], outputs["mlm_logits"],
            sample_weight=mlm_weights,
        )
        metrics["nsp_accuracy"].update_state(
            batch["next_sentence_labels"][:, 0], outputs["nsp_logits"],
            sample_weight=example_weights,
        )
        metrics["mlm_loss"].update_state(
            outputs["mlm_loss"], sample_weight=example_weights
        )
        metrics["nsp_loss"].update_state(
            outputs["nsp_loss"], sample_weight=example_weights
        )


# ----------------------------------------------------------------------------
# Inputs and the run


def build_train_input(flags_, plan):
    """The training input function (`bert_data.ArrayInput` or
    `bert_data.RecordInput`): batches of one optimizer update each."""
    files = bert_data.expand_patterns(flags_.input_files)
    seq, preds = plan["max_seq_length"], plan["max_predictions_per_seq"]
    metadata = bert_data.read_metadata(files)
    if metadata and (metadata.get("max_seq_length"), metadata.get(
            "max_predictions_per_seq")) != (seq, preds):
        raise run_state.FlagError(
            f"The records in {os.path.dirname(files[0])} have "
            f"max_seq_length={metadata.get('max_seq_length')} and "
            "max_predictions_per_seq="
            f"{metadata.get('max_predictions_per_seq')};"
            f" the run expects {seq} and {preds}. Pass --max_seq_length and "
            "--max_predictions_per_seq to match the data."
        )
    if flags_.in_memory:
        features = bert_data.load_records(files, seq, preds)
        return bert_data.ArrayInput(features, plan["global_batch_size"],
                                    training=True, seed=flags_.seed)
    bert_data.check_file_sizes(files, metadata)
    declared = bert_data.declared_counts(files, metadata)
    if flags_.num_train_examples:
        num_examples = flags_.num_train_examples
    elif len(declared) == len(files):
        num_examples = sum(records for records, _ in declared.values())
    elif metadata and sorted(map(os.path.basename, files)) == sorted(
            metadata.get("files", [])):
        num_examples = metadata["num_examples"]
    else:
        num_examples = bert_data.count_records(files)
    return bert_data.RecordInput(
        files, plan["global_batch_size"], seq, preds, num_examples,
        seed=flags_.seed, shuffle_buffer=flags_.shuffle_buffer,
    )


def build_model_fn(flags_, plan):
    vocab_size = flags_.vocab_size or None
    if flags_.vocab_file:
        vocab_size = len(bert_data.load_vocabulary(flags_.vocab_file))
    config = bert_models.load_bert_config(
        flags_.bert_config, vocabulary_size=vocab_size,
        dropout=flags_.dropout,
    )
    if plan["max_seq_length"] > config.max_sequence_length:
        raise run_state.FlagError(
            f"--max_seq_length={plan['max_seq_length']} exceeds the model's "
            f"position embeddings ({config.max_sequence_length})."
        )

    def model_fn():
        return bert_models.BertPretrainer(bert_models.build_backbone(config))

    return model_fn, config


def trust_ratio_summary(optimizer):
    """min/median/max trust ratio over the layer-adapted variables."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(inner, "track_trust_ratios", False):
        return None
    ratios = np.array([
        v["trust_ratio"] for v in inner.trust_ratio_stats().values()
        if v["adapted"] and np.isfinite(v["trust_ratio"])
    ])  # NaN: not updated yet
    if not ratios.size:
        return None
    return dict(min=float(ratios.min()), median=float(np.median(ratios)),
                max=float(ratios.max()))


def weight_norm(model):
    """Global L2 norm of the trainable weights (compare runs cheaply)."""
    return float(math.sqrt(sum(
        float(np.sum(np.square(keras.ops.convert_to_numpy(v), dtype="f8")))
        for v in model.trainable_variables
    )))


# Flags that do not change what the run computes: everything else is the
# run's identity (`run_state.RunRecord`).
NOT_IDENTITY_FLAGS = (
    "strategy", "tpu", "num_cpu_devices", "collective", "jit_compile",
    "jax_num_processes", "jax_coordinator_address", "jax_process_id",
    "model_parallel", "eval_files", "model_dir", "steps_per_loop", "save_checkpoints_steps",
    "eval_every_steps", "checkpoint_every_minutes", "results_json",
    "track_trust_ratios", "allow_changed_flags", "deterministic",
)


def validate_flags(flags_):
    """Raises `run_state.FlagError` naming the flag for a value out of range
    (before any data or model is built)."""
    def check(name, ok, requirement):
        if not ok:
            raise run_state.FlagError(
                f"--{name} must be {requirement}. Received: "
                f"{getattr(flags_, name)!r}."
            )

    def optional(name, low, requirement):
        value = getattr(flags_, name)
        check(name, value is None or value >= low, requirement)

    if not flags_.input_files:
        raise run_state.FlagError("--input_files is required.")
    check_finite_flags(flag_values_dict(flags_))
    for name in ("global_batch_size", "gradient_accumulation_steps",
                 "train_steps", "warmup_steps", "max_predictions_per_seq"):
        optional(name, 1, ">= 1")
    optional("max_seq_length", 5, ">= 5")
    for name in ("learning_rate", "decay_power", "end_learning_rate",
                 "weight_decay", "epsilon", "clipnorm", "momentum",
                 "trust_coefficient"):
        optional(name, 0, ">= 0")
    for name in ("beta_1", "beta_2"):
        value = getattr(flags_, name)
        check(name, value is None or 0 <= value < 1, "in [0, 1)")
    check("dropout", flags_.dropout is None or 0 <= flags_.dropout < 1,
          "in [0, 1)")
    for name in ("steps_per_loop", "shuffle_buffer"):
        check(name, getattr(flags_, name) >= 1, ">= 1")
    for name in ("save_checkpoints_steps", "eval_every_steps",
                 "checkpoint_every_minutes", "num_train_examples",
                 "vocab_size", "num_cpu_devices"):
        check(name, getattr(flags_, name) >= 0, ">= 0")
    check("phase", flags_.phase in (1, 2), "1 or 2")
    warmup, steps = flags_.warmup_steps, flags_.train_steps
    check("warmup_steps", not (warmup and steps and warmup >= steps),
          f"< --train_steps={steps}")
    batch, k = flags_.global_batch_size, flags_.gradient_accumulation_steps
    check("gradient_accumulation_steps", not (batch and k and batch % k),
          f"a divisor of --global_batch_size={batch}")
    run_state.check_init_checkpoint(flags_.init_checkpoint, flags_.model_dir)
    # Cheap checks of the files, before anything is written or built.
    for flag in ("input_files", "eval_files"):
        if getattr(flags_, flag):
            bert_data.expand_patterns(getattr(flags_, flag), f"--{flag}")
    if flags_.vocab_file:
        bert_data.load_vocabulary(flags_.vocab_file)
    bert_models.load_bert_config(flags_.bert_config)
    if (flags_.init_checkpoint and keras.backend.backend() == "tensorflow"
            and run_state.checkpoint_step(flags_.model_dir) is None):
        bert_models.resolve_checkpoint(flags_.init_checkpoint)


def check_finite_flags(values):
    """Raises `run_state.FlagError` naming the first float flag of
    `values` (`{name: value}`) that is infinite or NaN."""
    for name, value in sorted(values.items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise run_state.FlagError(
                f"--{name} must be a finite number. Received: {value!r}."
            )


def run_identity(flags_):
    """The flags that shape the run."""
    return {name: value for name, value in flag_values_dict(flags_).items()
            if name not in NOT_IDENTITY_FLAGS}


def results_path(flags_):
    if flags_.results_json:
        return flags_.results_json
    return (os.path.join(flags_.model_dir, "results.json")
            if flags_.model_dir else None)


def check_token_ids(flags_, train_input, vocabulary_size):
    """Raises `run_state.FlagError` if the first batch holds a token id the
    model's embedding does not have (on a GPU or TPU an out-of-range lookup
    returns zeros instead of failing)."""
    if isinstance(train_input, bert_data.ArrayInput):
        features = train_input.features
        source = "the training records"
    else:
        features = bert_data.first_records(
            train_input.files, train_input.global_batch_size,
            train_input.max_seq_length, train_input.max_predictions_per_seq,
        )
        source = "the first training records"
    largest = max(int(np.max(features["input_ids"])),
                  int(np.max(features["masked_lm_ids"])))
    if largest >= vocabulary_size:
        given = ("--vocab_file" if flags_.vocab_file else "--vocab_size"
                 if flags_.vocab_size else "--bert_config")
        raise run_state.FlagError(
            f"{source} hold token id {largest}, out of range for the "
            f"model's vocabulary of {vocabulary_size} (from {given}). Pass "
            "the --vocab_file the records were made with."
        )


def run(flags_, strategy=None, log=print):
    """Pre-trains as `flags_` (the script's flags) say.

    Returns the results dict, also written to `results.json` in
    `--model_dir` (or `--results_json`) by the chief. A corrupt record met
    while streaming is a `run_state.DataError` naming its file.
    """
    with bert_data.corrupt_records_named(flags_.input_files,
                                         flags_.eval_files):
        return train(flags_, strategy, log)[1]


def train(flags_, strategy=None, log=print):
    """`run`, returning `(trainer, results)` (the trained model is
    `trainer.model`; `trainer` is `None` when `--model_dir` holds a finished
    run, whose saved results are returned untouched)."""
    start = time.time()
    validate_flags(flags_)
    plan = plan_hyperparameters(flags_)
    if strategy is None:
        # Before anything creates a tensor.
        runtime = distribute.setup(
            flags_, deterministic=getattr(flags_, "deterministic", False),
            layout_map=bert_models.layout_map)
    else:  # a strategy made by the caller (the tests, the sweep)
        if getattr(flags_, "deterministic", False):
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        runtime = distribute.Runtime("tensorflow", strategy=strategy)
        distribute.set_mixed_precision(flags_.mixed_precision)
    is_chief = runtime.is_chief
    log = log if is_chief else (lambda *a, **k: None)
    k = plan["gradient_accumulation_steps"]
    replicas = runtime.num_replicas
    if plan["global_batch_size"] % (k * replicas):
        raise run_state.FlagError(
            f"--global_batch_size={plan['global_batch_size']} must be a "
            f"multiple of --gradient_accumulation_steps={k} x {replicas} "
            "replica(s): each replica runs k equal micro-batches per update."
        )
    log(f"Engine {runtime.engine}, strategy {flags_.strategy} "
        f"({runtime.name}): {replicas} replica(s); {plan['global_batch_size']} sequences per update = {k} "
        f"micro-batch(es) of {plan['micro_batch_size']} "
        f"({plan['micro_batch_size'] // replicas} per replica).")
    log("Plan: " + ", ".join(f"{n}={v}" for n, v in plan.items()))
    record = run_state.RunRecord(
        flags_.model_dir, run_identity(flags_), results_path(flags_),
        flags_.allow_changed_flags, is_chief, log,
    )
    finished = record.start()
    if finished is not None:
        return None, finished
    # Only JAX runs name their engine (see tpu_scripts/resnet/train.py).
    record.check_plan(dict(plan, **({"engine": "jax"}
                                    if runtime.engine == "jax" else {})))
    distribute.set_random_seed(flags_.seed)
    for flag, patterns in (("--input_files", flags_.input_files),
                           ("--eval_files", flags_.eval_files)):
        if not patterns:
            continue
        bert_data.check_record_lengths(
            bert_data.expand_patterns(patterns, flag), plan["max_seq_length"],
            plan["max_predictions_per_seq"],
        )
    train_input = build_train_input(flags_, plan)
    eval_input = None
    if flags_.eval_files:
        eval_input = bert_data.ArrayInput(
            bert_data.load_records(flags_.eval_files, plan["max_seq_length"],
                                   plan["max_predictions_per_seq"],
                                   flag="--eval_files"),
            plan["micro_batch_size"], training=False,
        )
    model_fn, config = build_model_fn(flags_, plan)
    check_token_ids(flags_, train_input, config.vocabulary_size)
    track = flags_.track_trust_ratios and plan["optimizer"] in ("lamb", "lars")
    loop = runtime.trainer(
        BertPretrainingTask(model_fn),
        lambda: make_training_optimizer(plan, track, flags_.mixed_precision),
        plan["global_batch_size"], model_dir=flags_.model_dir,
        steps_per_loop=flags_.steps_per_loop,
        jit_compile=flags_.jit_compile, log=log,
        gradient_accumulation_steps=k,
        unit="sequences",
    )
    if runtime.engine == "tensorflow":  # JAX checkpoints hold every variable
        bert_models.checkpoint_dropout_state(loop.checkpoint, loop.model,
                                             flags_.model_dir, log)
    initialised_from = None
    resuming = run_state.checkpoint_step(flags_.model_dir) is not None
    if flags_.init_checkpoint and not resuming:
        initialised_from = bert_models.load_pretrained_weights(
            loop.model, flags_.init_checkpoint
        )
        log(f"Initialised the model from {initialised_from}.")
    outcome = loop.train(
        train_input, plan["train_steps"], eval_input=eval_input,
        eval_every_steps=flags_.eval_every_steps,
        checkpoint_every_steps=flags_.save_checkpoints_steps,
        checkpoint_every_seconds=60 * flags_.checkpoint_every_minutes,
        record=record,
    )
    totals = record.totals(plan["global_batch_size"])
    results = dict(
        train=outcome["train"],
        eval=outcome["eval"],
        optimizer_updates=outcome["step"],
        micro_batches=outcome["step"] * k,
        examples_seen=outcome["step"] * plan["global_batch_size"],
        epochs=outcome["step"] / train_input.steps_per_epoch,
        train_examples=train_input.num_examples,
        # Over every segment of the run (restarts, preemptions).
        train_seconds=(totals["train_seconds"] if flags_.model_dir
                       else outcome["train_seconds"]),
        wall_seconds=time.time() - start,
        examples_per_second=(totals["examples_per_second"]
                             if flags_.model_dir
                             else outcome["images_per_second"]),
        final_learning_rate=loop.learning_rate(),
        trust_ratios=trust_ratio_summary(loop.optimizer),
        weight_norm=weight_norm(loop.model),
        num_parameters=bert_models.count_parameters(loop.model),
        num_replicas=runtime.num_replicas,
        engine=runtime.engine,
        initialised_from=initialised_from,
        bert_config=config.__dict__,
        plan=plan,
        flags=flag_values_dict(flags_),
    )
    results = record.finish(results, outcome["step"])
    return loop, results


def flag_values_dict(flags_):
    """The script's flags and their values (for results.json)."""
    from absl import flags

    if isinstance(flags_, flags.FlagValues):
        return {n: flags_[n].value for n in sorted(FLAG_NAMES) if n in flags_}
    return dict(vars(flags_))


# ----------------------------------------------------------------------------
# Flags

FLAG_NAMES = set()


def define_flags(flag_values=None):
    """Defines the script's flags on `flag_values` (default: absl's global
    `FLAGS`)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    before = set(flag_values)
    _define_flags(flags, dict(flag_values=flag_values))
    FLAG_NAMES.update(set(flag_values) - before)


def _define_flags(flags, f):
    distribute.define_flags(f["flag_values"])
    # Data.
    flags.DEFINE_string(
        "input_files", None, "Comma-separated globs of pre-training "
        "TFRecords (google-research/bert features; gs:// allowed).", **f)
    flags.DEFINE_string(
        "eval_files", None, "Comma-separated globs of held-out TFRecords, "
        "evaluated at the end (and every --eval_every_steps).", **f)
    flags.DEFINE_integer(
        "max_seq_length", None, "Sequence length of the records (default: "
        "the recipe's phase, 128 or 512).", **f)
    flags.DEFINE_integer(
        "max_predictions_per_seq", None, "Masked positions per record "
        "(default: 20 at length 128, 80 at 512).", **f)
    flags.DEFINE_integer(
        "num_train_examples", 0, "Records in --input_files (0: read "
        "metadata.json beside them, else count them).", **f)
    flags.DEFINE_boolean(
        "in_memory", False, "Load the records into host memory: exact "
        "epochs and exact resume (small corpora).", **f)
    flags.DEFINE_integer(
        "shuffle_buffer", 100_000, "Shuffle buffer of streamed records.", **f)
    # Model.
    flags.DEFINE_string(
        "bert_config", "base", "tiny, mini, small, medium, base, large, or a "
        "JSON file (google-research/bert bert_config.json keys).", **f)
    flags.DEFINE_string(
        "vocab_file", None, "WordPiece vocabulary of the records; sets the "
        "vocabulary size.", **f)
    flags.DEFINE_integer(
        "vocab_size", 0, "Vocabulary size when there is no --vocab_file "
        "(0: the config's).", **f)
    flags.DEFINE_float(
        "dropout", None, "Dropout rate (default: the config's, 0.1).", **f)
    flags.DEFINE_string(
        "init_checkpoint", None, "Checkpoint (prefix or model_dir) whose "
        "model weights start the run, e.g. phase 1's model_dir for phase 2. "
        "The optimizer and the step start fresh.", **f)
    # Optimisation.
    flags.DEFINE_enum(
        "recipe", "none", RECIPE_NAMES,
        "lamb_paper: the LAMB paper's table at --global_batch_size; "
        "lamb_64k_32k: the two-phase 64k/32k recipe, phase --phase; nvidia: "
        "the same phases reached with NVIDIA's gradient accumulation "
        "(128 / 512 steps); none: the flags below.", **f)
    flags.DEFINE_integer("phase", 1, "Phase of lamb_64k_32k / nvidia.", **f)
    flags.DEFINE_enum("optimizer", "lamb", OPTIMIZER_NAMES, "Optimizer.", **f)
    flags.DEFINE_integer(
        "global_batch_size", None, "Sequences per optimizer update over all "
        "replicas (default: the recipe's).", **f)
    flags.DEFINE_integer(
        "gradient_accumulation_steps", None, "Steps whose gradients are "
        "averaged per update; each step runs global_batch_size / this "
        "sequences (default: 1, nvidia: 128 / 512).", **f)
    flags.DEFINE_integer(
        "train_steps", None, "Optimizer updates (default: the recipe's).",
        **f)
    flags.DEFINE_float("learning_rate", None, "Peak learning rate.", **f)
    flags.DEFINE_integer(
        "warmup_steps", None, "Linear warmup, in updates (default: the "
        "recipe's, else 1 percent of --train_steps).", **f)
    flags.DEFINE_float(
        "decay_power", None, "Power of the polynomial decay to "
        "--end_learning_rate (1: linear, BERT; 0.5: NVIDIA).", **f)
    flags.DEFINE_float("end_learning_rate", None, "Final rate.", **f)
    flags.DEFINE_float("weight_decay", None, "Weight decay (0.01; adam: "
                       "none).", **f)
    flags.DEFINE_float("beta_1", None, "Adam/LAMB beta_1 (0.9).", **f)
    flags.DEFINE_float("beta_2", None, "Adam/LAMB beta_2 (0.999).", **f)
    flags.DEFINE_float("epsilon", None, "Adam/LAMB epsilon (1e-6).", **f)
    flags.DEFINE_float(
        "clipnorm", None, "Global gradient-norm clip (1.0; 0: none).", **f)
    flags.DEFINE_float("momentum", None, "LARS momentum (0.9).", **f)
    flags.DEFINE_float(
        "trust_coefficient", None, "LARS trust coefficient (1e-3).", **f)
    flags.DEFINE_boolean(
        "track_trust_ratios", True, "LAMB/LARS: log per-variable trust "
        "ratios and norms to TensorBoard.", **f)
    # Loop, checkpoints, logs.
    flags.DEFINE_string(
        "model_dir", None, "Checkpoints, TensorBoard logs, results.json; "
        "a run resumes from its latest checkpoint.", **f)
    flags.DEFINE_integer(
        "steps_per_loop", 100, "Updates per compiled loop (and per log "
        "line and TensorBoard point).", **f)
    flags.DEFINE_integer(
        "save_checkpoints_steps", 1000, "Checkpoint every this many "
        "updates (0: only by time), and at the end.", **f)
    flags.DEFINE_float(
        "checkpoint_every_minutes", 30.0, "Also checkpoint at the first "
        "loop boundary this many minutes after the last checkpoint (0: not "
        "by time). On SIGTERM the run saves a checkpoint and exits with "
        "code 143.", **f)
    flags.DEFINE_boolean(
        "allow_changed_flags", False, "Resume a run in --model_dir even if "
        "flags that shape it (batch, accumulation, recipe, schedule, "
        "model, data) differ from those of its first start.", **f)
    flags.DEFINE_integer(
        "eval_every_steps", 0, "Evaluate --eval_files every this many "
        "updates (0: at the end only).", **f)
    flags.DEFINE_integer("seed", 0, "Seed of weights, shuffling and "
                         "dropout.", **f)
    flags.DEFINE_boolean(
        "deterministic", False, "Turn on TensorFlow op determinism "
        "(tf.config.experimental.enable_op_determinism) for bit-identical "
        "reruns and resumes on GPUs and TPUs (slower).", **f)
    flags.DEFINE_string(
        "results_json", None, "Where to write results.json (default: "
        "--model_dir/results.json).", **f)


# ----------------------------------------------------------------------------
# The script


def main(argv):
    run_state.run_script(run, argv)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
