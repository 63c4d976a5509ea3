"""BERT from keras-hub, randomly initialised from a config, with the
pre-training heads (masked LM, next sentence) and the SQuAD span head.

No transformer is written here: the encoder is `keras_hub.models.BertBackbone`
and the masked-LM head is `keras_hub.layers.MaskedLMHead`, tied to the token
embedding as in BERT. keras-hub has no next-sentence head, so that one is a
`Dense(2)` on the pooled `[CLS]` output, as in google-research/bert.

Configs: `BERT_CONFIGS` names the sizes of Devlin et al. (base, large) and of
Turc et al.'s "Well-Read Students" miniatures (tiny, mini, small, medium);
`load_bert_config` also reads a JSON file in google-research/bert's
`bert_config.json` format or with keras-hub's argument names.
"""

import dataclasses
import json
import math

import keras
import keras_hub

from tpu_scripts import fileio
from tpu_scripts.run_state import DataError, FlagError

BERT_INITIALIZER_STDDEV = 0.02  # `initializer_range` of every BERT config


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The arguments of `keras_hub.models.BertBackbone`."""

    num_layers: int
    hidden_dim: int
    num_heads: int
    intermediate_dim: int
    vocabulary_size: int = 30522  # google-research/bert uncased WordPiece
    max_sequence_length: int = 512
    num_segments: int = 2
    dropout: float = 0.1

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


BERT_CONFIGS = {
    # Turc et al. 2019 (arXiv:1908.08962), the BERT miniatures.
    "tiny": BertConfig(num_layers=2, hidden_dim=128, num_heads=2,
                       intermediate_dim=512),
    "mini": BertConfig(num_layers=4, hidden_dim=256, num_heads=4,
                       intermediate_dim=1024),
    "small": BertConfig(num_layers=4, hidden_dim=512, num_heads=8,
                        intermediate_dim=2048),
    "medium": BertConfig(num_layers=8, hidden_dim=512, num_heads=8,
                         intermediate_dim=2048),
    # Devlin et al. 2018 (arXiv:1810.04805).
    "base": BertConfig(num_layers=12, hidden_dim=768, num_heads=12,
                       intermediate_dim=3072),
    "large": BertConfig(num_layers=24, hidden_dim=1024, num_heads=16,
                        intermediate_dim=4096),
}

# google-research/bert `bert_config.json` keys -> BertConfig fields.
_GOOGLE_KEYS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_dim",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_dim",
    "vocab_size": "vocabulary_size",
    "max_position_embeddings": "max_sequence_length",
    "type_vocab_size": "num_segments",
    "hidden_dropout_prob": "dropout",
}
_IGNORED_GOOGLE_KEYS = {
    # keras-hub's BERT has one dropout rate, GELU (tanh form) and stddev 0.02.
    "attention_probs_dropout_prob", "hidden_act", "initializer_range",
}


def load_bert_config(name_or_path, **overrides):
    """A `BertConfig` from a name in `BERT_CONFIGS` or a JSON file.

    Args:
        name_or_path: `tiny`, `mini`, `small`, `medium`, `base`, `large`, or
            the path of a JSON file with google-research/bert keys
            (`hidden_size`, `num_hidden_layers`, ...) or `BertConfig` fields.
        **overrides: `BertConfig` fields to replace (`None` values are
            ignored), e.g. `vocabulary_size` from a vocabulary file.
    """
    if name_or_path in BERT_CONFIGS:
        config = BERT_CONFIGS[name_or_path]
    elif name_or_path.endswith(".json") or fileio.exists(name_or_path):
        try:
            with fileio.GFile(name_or_path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(
                f"Cannot read --bert_config={name_or_path}: {e}"
            ) from None
        if not isinstance(raw, dict):
            raise DataError(f"--bert_config={name_or_path} is not a JSON "
                            "object.")
        fields = {f.name for f in dataclasses.fields(BertConfig)}
        values = {}
        for key, value in raw.items():
            key = _GOOGLE_KEYS.get(key, key)
            if key in fields:
                values[key] = value
            elif key not in _IGNORED_GOOGLE_KEYS:
                raise FlagError(
                    f"Unknown key {key!r} in BERT config {name_or_path!r}; "
                    f"expected google-research/bert keys or {sorted(fields)}."
                )
        config = BertConfig(**values)
    else:
        raise FlagError(
            f"Unknown --bert_config={name_or_path!r}; expected one of "
            f"{', '.join(BERT_CONFIGS)} or the path of a JSON file."
        )
    return config.replace(
        **{k: v for k, v in overrides.items() if v is not None}
    )


def build_backbone(config, dtype=None):
    """A randomly initialised `keras_hub.models.BertBackbone`."""
    return keras_hub.models.BertBackbone(
        vocabulary_size=config.vocabulary_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_dim,
        intermediate_dim=config.intermediate_dim,
        dropout=config.dropout,
        max_sequence_length=config.max_sequence_length,
        num_segments=config.num_segments,
        dtype=dtype,
    )


def _int_input(name):
    return keras.Input(shape=(None,), dtype="int32", name=name)


def _backbone_inputs():
    """Inputs named like google-research/bert's features."""
    return {
        "input_ids": _int_input("input_ids"),
        "input_mask": _int_input("input_mask"),
        "segment_ids": _int_input("segment_ids"),
    }


def _run_backbone(backbone, inputs):
    return backbone({
        "token_ids": inputs["input_ids"],
        "padding_mask": inputs["input_mask"],
        "segment_ids": inputs["segment_ids"],
    })


class BertPretrainer(keras.Model):
    """BERT with the masked-LM and next-sentence-prediction heads.

    Inputs (a dict, google-research/bert feature names): `input_ids`,
    `input_mask`, `segment_ids` `[batch, seq]` and `masked_lm_positions`
    `[batch, predictions]`. Outputs: `mlm_logits` `[batch, predictions,
    vocab]` and `nsp_logits` `[batch, 2]` (label 1 = random next sentence),
    in the compute dtype (cast to float32 before the loss).

    The encoder is reachable as `.backbone`, so a fine-tuning model can reuse
    it after `load_pretrained_weights`.
    """

    def __init__(self, backbone, **kwargs):
        initializer = keras.initializers.TruncatedNormal(
            stddev=BERT_INITIALIZER_STDDEV
        )
        masked_lm_head = keras_hub.layers.MaskedLMHead(
            vocabulary_size=backbone.vocabulary_size,
            token_embedding=backbone.token_embedding,
            intermediate_activation="gelu",
            kernel_initializer=initializer,
            dtype=backbone.dtype_policy,
            name="mlm_head",
        )
        nsp_head = keras.layers.Dense(
            2, kernel_initializer=initializer, dtype=backbone.dtype_policy,
            name="nsp_head",
        )
        inputs = dict(
            _backbone_inputs(),
            masked_lm_positions=_int_input("masked_lm_positions"),
        )
        encoded = _run_backbone(backbone, inputs)
        outputs = {
            "mlm_logits": masked_lm_head(
                encoded["sequence_output"], inputs["masked_lm_positions"]
            ),
            "nsp_logits": nsp_head(encoded["pooled_output"]),
        }
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.backbone = backbone
        self.masked_lm_head = masked_lm_head
        self.nsp_head = nsp_head


class BertSpanModel(keras.Model):
    """BERT with a start/end span head for extractive QA (SQuAD).

    Inputs: `input_ids`, `input_mask`, `segment_ids`. Outputs: `start_logits`
    and `end_logits` `[batch, seq]`, float32. The span head reads the
    sequence output only, so the backbone's pooler (`pooled_dense`) gets no
    gradient and is frozen (set non-trainable on the given backbone).
    """

    def __init__(self, backbone, **kwargs):
        backbone.pooled_dense.trainable = False
        span_head = keras.layers.Dense(
            2,
            kernel_initializer=keras.initializers.TruncatedNormal(
                stddev=BERT_INITIALIZER_STDDEV
            ),
            dtype=backbone.dtype_policy,
            name="span_head",
        )
        inputs = _backbone_inputs()
        encoded = _run_backbone(backbone, inputs)
        logits = keras.ops.cast(
            span_head(encoded["sequence_output"]), "float32"
        )
        outputs = {
            "start_logits": logits[..., 0],
            "end_logits": logits[..., 1],
        }
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.backbone = backbone
        self.span_head = span_head


def layout_map(mesh):
    """The `keras.distribution.LayoutMap` of `BertPretrainer` for a mesh with
    axes "batch" and "model" (`--model_parallel` on JAX), Megatron-style:
    attention heads and the feed-forward intermediate units are split over
    "model" (query/key/value kernels and biases by head, the attention
    output and feed-forward output kernels by their input), and so is the
    hidden axis of the token embedding (tied to the masked-LM output). The
    rest (layer norms, position and segment embeddings, heads) is
    replicated. The heads and the intermediate size must be multiples of
    the model axis."""
    layouts = keras.distribution.LayoutMap(mesh)
    layouts["token_embedding/embeddings"] = (None, "model")
    # Keys are regular expressions matched from the start of the path.
    layouts[r".*self_attention_layer/(query|key|value)/kernel"] = (
        None, "model", None)
    layouts[r".*self_attention_layer/(query|key|value)/bias"] = ("model", None)
    layouts[".*self_attention_layer/attention_output/kernel"] = (
        "model", None, None)
    layouts[".*feedforward_intermediate_dense/kernel"] = (None, "model")
    layouts[".*feedforward_intermediate_dense/bias"] = ("model",)
    layouts[".*feedforward_output_dense/kernel"] = ("model", None)
    return layouts


def resolve_checkpoint(path, flag="--init_checkpoint"):
    """A checkpoint prefix from a prefix or a directory (its latest);
    raises `run_state.FlagError` naming `flag` if there is none."""
    import tensorflow as tf

    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise FlagError(f"{flag}={path}: no checkpoint in that "
                            "directory.")
        return latest
    if not tf.io.gfile.exists(path + ".index"):
        raise FlagError(
            f"{flag}={path}: no checkpoint (expected {path}.index or a "
            "directory holding checkpoints)."
        )
    return path


def load_pretrained_weights(pretrainer, path):
    """Loads the model weights of a pre-training checkpoint into `pretrainer`.

    `path` is a checkpoint prefix or a `--model_dir` of `bert/pretrain.py`
    (its latest checkpoint); on JAX, a `--model_dir` of the JAX engine. Only the model is read: the optimizer state and
    the step stay behind, so a new run (phase 2, fine-tuning) starts with a
    fresh optimizer and its own learning-rate clock. Raises if any weight of
    `pretrainer` is missing from the checkpoint. Returns the prefix read.
    """
    if keras.backend.backend() == "jax":
        from tpu_scripts import jax_trainer

        return jax_trainer.load_model_weights(pretrainer, path)
    import tensorflow as tf

    prefix = resolve_checkpoint(path)
    status = tf.train.Checkpoint(model=pretrainer).read(prefix)
    status.assert_existing_objects_matched().expect_partial()
    return prefix


def checkpoint_dropout_state(checkpoint, model, model_dir=None, log=print):
    """Adds the state of `model`'s dropout to `checkpoint` (a
    `tf.train.Checkpoint`, e.g. the trainer's), so that a resumed run draws
    the masks the uninterrupted run would have drawn.

    Each Keras dropout layer draws its masks from a `keras.random.
    SeedGenerator` whose state variable advances at every call; it is one of
    `model.variables` but not of the layer's checkpointed weights, so without
    this a restart replays the masks of step 0. The states are listed in the
    model's layer order (the same in every process). A run in `model_dir`
    whose latest checkpoint has no dropout state (written by an older
    version) resumes without it, as before. Returns the states added.
    """
    import tensorflow as tf

    states = [generator.state for layer in model._flatten_layers()
              for generator in layer._seed_generators]
    from tpu_scripts import run_state

    checkpoints = run_state.list_checkpoints(model_dir)
    latest = checkpoints[-1][1] if checkpoints else None
    try:
        names = [name for name, _ in tf.train.list_variables(latest)] if (
            latest) else []
    except Exception:  # noqa: BLE001 damaged: the trainer falls back
        names = None
    if names and not any(name.startswith("dropout_state/")
                         for name in names):
        log(f"{latest} holds no dropout state (an older checkpoint): the "
            "resumed run's dropout masks differ from an uninterrupted "
            "run's.")
        return []
    if states:
        checkpoint.dropout_state = states
    return states


def count_parameters(model):
    return int(sum(math.prod(v.shape) for v in model.trainable_variables))
