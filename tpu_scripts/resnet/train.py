r"""Trains a ResNet with LARS, LAMB or SGD on any tf.distribute strategy, or
on JAX (`KERAS_BACKEND=jax`) with keras.distribution.

ResNet-50 v1.5 on ImageNet TFRecords (TPU / Model Garden layout) on a TPU pod
at batch 32k with the MLPerf LARS recipe, stopping at 75.9 % top-1:

    python -m tpu_scripts.resnet.train --strategy=tpu --tpu=my-tpu-pod \
      --train_files='gs://my-bucket/imagenet/train-*' \
      --eval_files='gs://my-bucket/imagenet/validation-*' \
      --num_train_examples=1281167 --num_eval_examples=50000 \
      --model=resnet50 --optimizer=lars --recipe=mlperf \
      --global_batch_size=32768 --epochs=44 --mixed_precision=bfloat16 \
      --steps_per_loop=39 --epochs_between_evals=4 --target_accuracy=0.759 \
      --model_dir=gs://my-bucket/r50

Throughput with synthetic data made on the device:

    python -m tpu_scripts.resnet.train --synthetic_data \
      --global_batch_size=256 --train_steps=200 --model_dir=/tmp/synthetic

A small run on a CPU (the Fashion-MNIST IDX files of `apt-get install
dataset-fashion-mnist`; 40 s on 2 cores):

    python tpu_scripts/resnet/train.py --dataset=fashion_mnist \
      --data_dir=/usr/share/datasets/fashion-mnist --model=small_resnet \
      --small_resnet_widths=8,16,32 --small_resnet_blocks=1 --stem_stride=2 \
      --global_batch_size=512 --epochs=2 --warmup_epochs=0.25 \
      --model_dir=/tmp/fmnist

On JAX (TPU VMs, GPUs; no TensorFlow needed for synthetic and in-memory
data), every device of every host:

    KERAS_BACKEND=jax python -m tpu_scripts.resnet.train \
      --strategy=data_parallel --synthetic_data --global_batch_size=1024 \
      --train_steps=200 --mixed_precision=bfloat16 --model_dir=/tmp/jax

The same training loop (`tpu_scripts.engine.Engine`) runs under every
strategy and on both engines; `results.json` in `--model_dir` (local or gs://) records the final
top-1, the steps, the wall time, images/s, when `--target_accuracy` was
reached and every flag.
"""

import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
    sys.path.insert(0, os.path.abspath(
        os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
if __name__ == "__main__":  # TensorFlow unless KERAS_BACKEND=jax
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags  # noqa: E402

from tpu_scripts import distribute  # noqa: E402
from tpu_scripts.resnet.data import AUGMENTATIONS  # noqa: E402
from keras_lamb.recipes import RESNET_EXCLUDE  # noqa: E402
from tpu_scripts.resnet.models import MODEL_NAMES  # noqa: E402
from tpu_scripts.optimizers import (  # noqa: E402
    DECAY_NAMES,
    OPTIMIZER_NAMES,
    SCALING_RULES,
)

RECIPE_NAMES = ("none", "mlperf", "goyal", "lamb_paper")
# The largest --image_size accepted: 8x ResNet-50's 224, past anything
# trained at; a larger size would only exhaust the accelerator's memory.
MAX_IMAGE_SIZE = 2048
# The widest small_resnet stage accepted (ResNet-50's widest has 2048
# channels); wider only exhausts memory.
MAX_WIDTH = 4096

# --recipe=none defaults, per optimizer: base rate at `base_batch_size` 256,
# scaling rule, decay, weight decay. Every value can be overridden by a flag.
OPTIMIZER_DEFAULTS = {
    "lars": dict(base_learning_rate=0.2, lr_scaling="linear",
                 decay="polynomial", weight_decay=1e-4),
    "momentum": dict(base_learning_rate=0.1, lr_scaling="linear",
                     decay="cosine", weight_decay=1e-4),
    "nesterov": dict(base_learning_rate=0.1, lr_scaling="linear",
                     decay="cosine", weight_decay=1e-4),
    "lamb": dict(base_learning_rate=2e-3, lr_scaling="sqrt",
                 decay="polynomial", weight_decay=0.01),
    "adamw": dict(base_learning_rate=1e-3, lr_scaling="sqrt",
                  decay="cosine", weight_decay=0.05),
}


SCRIPT_FLAGS = set()


def define_flags(flag_values=flags.FLAGS):
    """Defines every flag of the script on `flag_values`."""
    before = set(flag_values)
    _define_flags(dict(flag_values=flag_values))
    SCRIPT_FLAGS.update(set(flag_values) - before)


def _define_flags(f):
    distribute.define_flags(f["flag_values"])
    # Data.
    flags.DEFINE_string(
        "train_files", "", "ImageNet TFRecords for training: comma-separated "
        "globs (gs:// allowed) of shards in the TPU / Model Garden layout "
        "(image/encoded JPEG, image/class/label **1-based**, 1..num_classes; "
        "the labels are made 0-based). Takes the place of --dataset.", **f)
    flags.DEFINE_string(
        "eval_files", "", "ImageNet TFRecords for evaluation (globs, like "
        "--train_files; empty: no evaluation).", **f)
    flags.DEFINE_integer(
        "num_train_examples", 0, "Records in --train_files (0: count them, "
        "which reads every file once and checks it whole; ImageNet: "
        "1281167, required of files named as its 1024 shards "
        "train-*-of-01024). A wrong count stops the run with an error "
        "(unless the files are sharded over several hosts). With "
        "--synthetic_data: examples per epoch (0: 1281167).", **f)
    flags.DEFINE_integer(
        "num_eval_examples", 0, "Records in --eval_files (0: count them; "
        "ImageNet: 50000, required of validation-*-of-00128); a wrong count "
        "stops the evaluation with an error. With --synthetic_data: "
        "evaluation examples (0: no evaluation).", **f)
    flags.DEFINE_integer(
        "num_classes", 1000, "Classes of --train_files and "
        "--synthetic_data (the files' labels are 1..num_classes).", **f)
    flags.DEFINE_boolean(
        "synthetic_data", False, "Train on random images and labels made on "
        "the device, with the shapes of ImageNet (--image_size, "
        "--num_classes): the throughput mode. images/s goes to TensorBoard "
        "and results.json.", **f)
    flags.DEFINE_string(
        "dataset", "imagenet2012", "TFDS dataset name (imagenet2012, "
        "imagenette, cifar10, fashion_mnist, ...). fashion_mnist is read "
        "from IDX files when --data_dir (or /usr/share/datasets/"
        "fashion-mnist) holds them, else from TFDS.", **f)
    flags.DEFINE_string(
        "data_dir", None, "TFDS data directory, or the directory of the "
        "Fashion-MNIST IDX files.", **f)
    flags.DEFINE_string("train_split", "train", "Training split.", **f)
    flags.DEFINE_string(
        "eval_split", "", "Evaluation split (empty: `validation` if the "
        "dataset has one, else `test`).", **f)
    flags.DEFINE_integer(
        "image_size", 0, "Training and evaluation image size (0: 224 for "
        "resnet50, resnet50_v1, --train_files and --synthetic_data, else the "
        "dataset's own size).", **f)
    flags.DEFINE_enum(
        "augmentation", "auto", AUGMENTATIONS,
        "Training augmentation of TFDS and in-memory data: imagenet "
        "(random-resized crop + flip; eval resize + centre crop), "
        "pad_crop_flip (small images), none; auto picks imagenet for images "
        "of 64 pixels or more. --train_files always use MLPerf's "
        "preprocessing.", **f)
    flags.DEFINE_integer(
        "shuffle_buffer", 10000, "Shuffle buffer of the TFDS and TFRecord "
        "pipelines (examples).", **f)
    flags.DEFINE_integer(
        "train_examples", 0, "Use only the first N training examples of "
        "an in-memory dataset (0: all). For quick runs and tests.", **f)
    flags.DEFINE_integer(
        "eval_examples", 0, "Use only the first N evaluation examples of "
        "an in-memory dataset (0: all).", **f)
    # Model.
    flags.DEFINE_enum(
        "model", "resnet50", MODEL_NAMES,
        "resnet50: ResNet-50 v1.5 (MLPerf's; keras-hub ResNetBackbone, "
        "stride 2 on the 3x3 convolutions); resnet50_v1: ResNet-50 v1 from "
        "keras.applications (stride 2 on the 1x1 convolutions); "
        "small_resnet: CIFAR-style ResNet of basic blocks.", **f)
    flags.DEFINE_boolean(
        "zero_init_residual", False, "resnet50, resnet50_v1: start the "
        "gamma of each residual block's last batch norm at 0 (Goyal et al.; "
        "not in MLPerf's reference). small_resnet always does.", **f)
    flags.DEFINE_list(
        "small_resnet_widths", ["16", "32", "64"],
        "Channels of each small_resnet stage.", **f)
    flags.DEFINE_integer(
        "small_resnet_blocks", 3, "Basic blocks per small_resnet stage (3 "
        "with widths 16,32,64 is ResNet-20).", **f)
    flags.DEFINE_integer(
        "stem_stride", 1, "Stride of the small_resnet stem convolution.", **f)
    flags.DEFINE_boolean(
        "sync_batchnorm", False, "small_resnet: BatchNorm statistics over "
        "the global batch (all replicas) instead of each replica's.", **f)
    # Training loop.
    flags.DEFINE_integer(
        "global_batch_size", 1024, "Examples per step over all replicas; "
        "must be divisible by the number of replicas.", **f)
    flags.DEFINE_integer(
        "eval_batch_size", 0, "Global evaluation batch (0: "
        "--global_batch_size).", **f)
    flags.DEFINE_float("epochs", 90.0, "Training epochs.", **f)
    flags.DEFINE_integer(
        "train_steps", 0, "Training steps; overrides --epochs when > 0.", **f)
    flags.DEFINE_integer(
        "steps_per_loop", 100, "Steps per compiled inner loop, and per "
        "progress line / TensorBoard summary.", **f)
    flags.DEFINE_float(
        "epochs_between_evals", 0.0, "Evaluate (and checkpoint) every this "
        "many epochs (MLPerf: 4); 0: only at the end.", **f)
    flags.DEFINE_alias("eval_every", "epochs_between_evals", **f)
    flags.DEFINE_float(
        "target_accuracy", 0.0, "Stop training at the first evaluation "
        "whose top-1 reaches this (MLPerf ResNet-50: 0.759); results.json "
        "records the epoch, step and wall time. 0: train to the end.", **f)
    flags.DEFINE_integer(
        "checkpoint_every", 0, "Checkpoint every this many steps (0: every "
        "epoch), and at the end.", **f)
    flags.DEFINE_float(
        "checkpoint_every_minutes", 30.0, "Also checkpoint at the first "
        "loop boundary this many minutes after the last checkpoint (0: not "
        "by time). On SIGTERM the run saves a checkpoint and exits with "
        "code 143.", **f)
    flags.DEFINE_boolean(
        "allow_changed_flags", False, "Resume a run in --model_dir even if "
        "flags that shape it (batch sizes, schedule, model, data, ...) "
        "differ from those of its first start.", **f)
    flags.DEFINE_string(
        "model_dir", None, "Checkpoints, TensorBoard logs and results.json. "
        "A run restarted with the same --model_dir resumes from the latest "
        "checkpoint at the exact batch.", **f)
    flags.DEFINE_integer("seed", 0, "Seed of weights, shuffling and "
                         "augmentation.", **f)
    flags.DEFINE_boolean(
        "deterministic", False, "Turn on TensorFlow op determinism "
        "(tf.config.experimental.enable_op_determinism) for bit-identical "
        "reruns and resumes.", **f)
    # Optimizer.
    flags.DEFINE_enum(
        "optimizer", "lars", OPTIMIZER_NAMES,
        "lars, lamb (keras_lamb), momentum, nesterov (SGD with L2 in the "
        "loss, Goyal et al.), adamw (Keras).", **f)
    flags.DEFINE_enum(
        "recipe", "none", RECIPE_NAMES,
        "Hyperparameters from keras_lamb.recipes: mlperf (LARS ResNet-50, "
        "MLPerf), goyal (momentum, linear scaling + warmup), lamb_paper "
        "(LAMB, You et al.); none: the flags below. Flags that are set "
        "explicitly override the recipe.", **f)
    flags.DEFINE_float(
        "learning_rate", None, "Peak learning rate (default: "
        "--base_learning_rate scaled from --base_batch_size to "
        "--global_batch_size by --lr_scaling).", **f)
    flags.DEFINE_float(
        "base_learning_rate", None, "Learning rate at --base_batch_size "
        "(default per optimizer: lars 0.2, momentum/nesterov 0.1, lamb "
        "2e-3, adamw 1e-3).", **f)
    flags.DEFINE_integer("base_batch_size", 256, "Batch size of "
                         "--base_learning_rate.", **f)
    flags.DEFINE_enum(
        "lr_scaling", None, SCALING_RULES, "Learning-rate scaling rule "
        "(default: linear for lars/momentum/nesterov, sqrt for "
        "lamb/adamw).", **f)
    flags.DEFINE_float("warmup_epochs", 5.0, "Linear warmup epochs.", **f)
    flags.DEFINE_enum(
        "decay", None, DECAY_NAMES, "Decay after the warmup (default: "
        "polynomial for lars/lamb, cosine otherwise).", **f)
    flags.DEFINE_float("decay_power", 2.0, "Power of the polynomial "
                       "decay (MLPerf LARS: 2).", **f)
    flags.DEFINE_float("end_learning_rate", 0.0, "Learning rate at the "
                       "last step.", **f)
    flags.DEFINE_float("momentum", 0.9, "Momentum of lars, momentum, "
                       "nesterov.", **f)
    flags.DEFINE_float("beta_1", 0.9, "beta_1 of lamb and adamw.", **f)
    flags.DEFINE_float("beta_2", 0.999, "beta_2 of lamb and adamw.", **f)
    flags.DEFINE_float("epsilon", None, "epsilon of lars, lamb, adamw "
                       "(default: the optimizer's).", **f)
    flags.DEFINE_float(
        "weight_decay", None, "Weight decay (default per optimizer: "
        "lars/momentum/nesterov 1e-4, lamb 0.01, adamw 0.05). SGD: L2 in "
        "the loss; lars/lamb: inside the trust ratio; adamw: decoupled.",
        **f)
    flags.DEFINE_float("trust_coefficient", 1e-3, "LARS trust coefficient "
                       "(eta).", **f)
    flags.DEFINE_boolean("clip_trust_ratio", False, "LARS: LARC clipping "
                         "of the trust ratio (--optimizer=lars only).", **f)
    flags.DEFINE_string(
        "exclude_from_weight_decay", RESNET_EXCLUDE, "Regular "
        "expression of variable paths without weight decay.", **f)
    flags.DEFINE_string(
        "exclude_from_layer_adaptation", RESNET_EXCLUDE, "Regular "
        "expression of variable paths with trust ratio 1 (lars, lamb).", **f)
    flags.DEFINE_float(
        "label_smoothing", None, "Label smoothing in [0, 1) (default: the "
        "recipe's, else 0).", **f)
    flags.DEFINE_boolean(
        "track_trust_ratios", True, "lars/lamb: record per-variable trust "
        "ratios and write them to TensorBoard.", **f)
    flags.DEFINE_string(
        "results_json", "", "Where to write results.json (empty: "
        "--model_dir/results.json, or ./results.json without --model_dir).",
        **f)


# ----------------------------------------------------------------------------
# The logic, importable and testable.


def build_inputs(flags_, global_batch_size, eval_batch_size, log=print):
    """`(train_input, eval_input, input_shape, num_classes)`; `eval_input`
    is `None` when there is nothing to evaluate on."""
    from tpu_scripts.resnet import data

    check_data_flags(flags_)
    if flags_.synthetic_data:
        return _synthetic_inputs(flags_, global_batch_size, eval_batch_size,
                                 log)
    if flags_.train_files:
        return _tfrecord_inputs(flags_, global_batch_size, eval_batch_size,
                                log)
    name = flags_.dataset
    if name == "fashion_mnist":
        data_dir = flags_.data_dir or data.SYSTEM_FASHION_MNIST_DIR
        if data.has_fashion_mnist(data_dir):
            log(f"Data: Fashion-MNIST IDX files in {data_dir}.")
            train = data.load_fashion_mnist(data_dir, "train")
            test = data.load_fashion_mnist(data_dir, "test")
            return _array_inputs(flags_, train, test, global_batch_size,
                                 eval_batch_size)
        log(f"Data: no Fashion-MNIST IDX files in {data_dir}; loading "
            "fashion_mnist from TFDS (needs network or a prepared "
            "--data_dir; offline: `apt-get install dataset-fashion-mnist`).")
    image_size = flags_.image_size or (
        224 if flags_.model in ("resnet50", "resnet50_v1") else None)
    builder = _tfds_builder(name, flags_.data_dir)
    if image_size is None:
        image_size = builder.info.features["image"].shape[0]
    eval_split = flags_.eval_split or (
        "validation" if "validation" in builder.info.splits else "test"
    )
    log(f"Data: TFDS {name} ({flags_.train_split} / {eval_split}) in "
        f"{builder.data_dir}.")
    common = dict(data_dir=flags_.data_dir, image_size=image_size,
                  augmentation=flags_.augmentation, seed=flags_.seed)
    train = data.TFDSInput(name, flags_.train_split, global_batch_size, True,
                           shuffle_buffer=flags_.shuffle_buffer, **common)
    evaluation = data.TFDSInput(name, eval_split, eval_batch_size, False,
                                **common)
    check_eval_batch(flags_, evaluation)
    shape = (image_size, image_size, train.channels)
    return train, evaluation, shape, train.num_classes


def _tfds_builder(name, data_dir):
    """The prepared TFDS builder of `--dataset`; what TFDS cannot load (no
    package, no such dataset, no network, a manual download missing) is a
    `run_state.DataError` naming the flags."""
    from tpu_scripts import run_state

    try:
        import tensorflow_datasets as tfds

        builder = tfds.builder(name, data_dir=data_dir)
        builder.download_and_prepare()
    except Exception as e:  # TFDS raises many kinds
        first = (str(e).strip().splitlines() or [""])[0]
        raise run_state.DataError(
            f"--dataset={name} (--data_dir={data_dir}) could not be loaded "
            f"from TFDS: {type(e).__name__}: {first}"
        ) from None
    return builder


def check_eval_batch(flags_, evaluation):
    """Raises `run_state.FlagError` when the evaluation batch is larger than
    the evaluation set (a batch of padding)."""
    from tpu_scripts import run_state

    if evaluation is None:
        return
    if evaluation.global_batch_size > evaluation.num_examples:
        name = ("eval_batch_size" if flags_.eval_batch_size
                else "global_batch_size")
        raise run_state.FlagError(
            f"--{name}={evaluation.global_batch_size} (the evaluation "
            f"batch) is larger than the evaluation set, which holds "
            f"{evaluation.num_examples} examples. Lower --eval_batch_size."
        )


def check_data_flags(flags_):
    """Raises `run_state.FlagError` naming the flag when the data flags
    disagree or are out of range (reads no data)."""
    from tpu_scripts import run_state

    if flags_.synthetic_data and (flags_.train_files or flags_.eval_files):
        raise run_state.FlagError(
            "--synthetic_data makes its own data; drop --train_files and "
            "--eval_files.")
    if flags_.eval_files and not flags_.train_files:
        raise run_state.FlagError(
            "--eval_files needs --train_files (TFDS data evaluates on "
            "--eval_split).")
    for name in ("num_train_examples", "num_eval_examples", "image_size"):
        if getattr(flags_, name) < 0:
            raise run_state.FlagError(
                f"--{name} must be >= 0. Received: {getattr(flags_, name)}.")
    if flags_.image_size > MAX_IMAGE_SIZE:
        raise run_state.FlagError(
            f"--image_size must be <= {MAX_IMAGE_SIZE} (0: the model's or "
            f"the dataset's own). Received: {flags_.image_size}.")
    if flags_.num_classes < 1:
        raise run_state.FlagError(
            f"--num_classes must be >= 1. Received: {flags_.num_classes}.")
    if flags_.train_files or flags_.eval_files:
        from tpu_scripts.resnet.imagenet_tfrecords import expand_globs

        expand_globs(flags_.train_files, "--train_files")
        if flags_.eval_files:
            expand_globs(flags_.eval_files, "--eval_files")
    uses_data_dir = not (flags_.synthetic_data or flags_.train_files)
    if uses_data_dir and flags_.data_dir:
        from tpu_scripts import fileio

        if not fileio.isdir(flags_.data_dir):
            hint = ("for a TFDS download, create it first, or leave "
                    "--data_dir out")
            if flags_.dataset == "fashion_mnist":
                hint = ("get the four Fashion-MNIST IDX .gz files with "
                        "`sudo apt-get install dataset-fashion-mnist` (they "
                        "go to /usr/share/datasets/fashion-mnist) or from "
                        "github.com/zalandoresearch/fashion-mnist (data/"
                        "fashion), or leave --data_dir out to download "
                        "them with TFDS")
            raise run_state.FlagError(
                f"--data_dir={flags_.data_dir} is not a directory (or does "
                f"not exist): {hint}.")


def _tfrecord_inputs(flags_, global_batch_size, eval_batch_size, log):
    from tpu_scripts.resnet import imagenet_tfrecords

    size = flags_.image_size or 224
    common = dict(image_size=size, num_classes=flags_.num_classes,
                  seed=flags_.seed, log=log)
    train = imagenet_tfrecords.TFRecordInput(
        flags_.train_files, global_batch_size, True,
        num_examples=flags_.num_train_examples,
        shuffle_buffer=flags_.shuffle_buffer, **common,
    )
    evaluation = None
    if flags_.eval_files:
        evaluation = imagenet_tfrecords.TFRecordInput(
            flags_.eval_files, eval_batch_size, False,
            num_examples=flags_.num_eval_examples,
            files_flag="--eval_files", count_flag="--num_eval_examples",
            **common,
        )
    check_eval_batch(flags_, evaluation)
    log(f"Data: ImageNet TFRecords, {train.num_examples} training examples "
        f"in {len(train.files)} files"
        + (f", {evaluation.num_examples} evaluation examples in "
           f"{len(evaluation.files)} files" if evaluation else
           ", no evaluation (no --eval_files)")
        + f"; {size}x{size}, {flags_.num_classes} classes.")
    return train, evaluation, (size, size, 3), flags_.num_classes


def _synthetic_inputs(flags_, global_batch_size, eval_batch_size, log):
    from tpu_scripts.resnet import imagenet_tfrecords

    size = flags_.image_size or 224
    common = dict(image_size=size, num_classes=flags_.num_classes,
                  seed=flags_.seed)
    train = imagenet_tfrecords.SyntheticInput(
        flags_.num_train_examples
        or imagenet_tfrecords.IMAGENET_TRAIN_EXAMPLES,
        global_batch_size, True, **common,
    )
    evaluation = None
    if flags_.num_eval_examples:
        evaluation = imagenet_tfrecords.SyntheticInput(
            flags_.num_eval_examples, eval_batch_size, False, **common
        )
    check_eval_batch(flags_, evaluation)
    log(f"Data: synthetic, made on the device: {size}x{size}x3 images, "
        f"{flags_.num_classes} classes, {train.num_examples} examples per "
        f"epoch, {flags_.num_eval_examples} evaluation examples.")
    return train, evaluation, (size, size, 3), flags_.num_classes


def _array_inputs(flags_, train, test, global_batch_size, eval_batch_size):
    from tpu_scripts import run_state
    from tpu_scripts.resnet import data

    (train_x, train_y), (test_x, test_y) = train, test
    for name, (x, _) in (("train_examples", train), ("eval_examples", test)):
        wanted = getattr(flags_, name)
        if wanted > len(x):
            raise run_state.DataError(
                f"--{name}={wanted}, but the "
                f"{'training' if name == 'train_examples' else 'evaluation'}"
                f" set in --data_dir={flags_.data_dir} holds only {len(x)} "
                f"examples. Lower --{name} (0: all).")
    if flags_.train_examples:
        train_x, train_y = (a[: flags_.train_examples] for a in train)
    if flags_.eval_examples:
        test_x, test_y = (a[: flags_.eval_examples] for a in test)
    image_size = flags_.image_size or train_x.shape[1]
    common = dict(image_size=image_size, augmentation=flags_.augmentation,
                  seed=flags_.seed)
    train_input = data.ArrayInput(train_x, train_y, global_batch_size, True,
                                  **common)
    eval_input = data.ArrayInput(test_x, test_y, eval_batch_size, False,
                                 **common)
    check_eval_batch(flags_, eval_input)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return (train_input, eval_input,
            (image_size, image_size, train_x.shape[-1]), num_classes)


def build_model_fn(flags_, input_shape, num_classes):
    from tpu_scripts.resnet import models

    def model_fn():
        if flags_.model in ("resnet50", "resnet50_v1"):
            return models.build_model(
                flags_.model, input_shape, num_classes,
                zero_init_residual=flags_.zero_init_residual,
            )
        return models.small_resnet(
            input_shape, num_classes,
            widths=[int(w) for w in flags_.small_resnet_widths],
            blocks_per_stage=flags_.small_resnet_blocks,
            stem_stride=flags_.stem_stride,
            sync_batchnorm=flags_.sync_batchnorm,
        )

    return model_fn


def _explicit(flags_, name):
    """Whether flag `name` was given (absl: on the command line; a plain
    namespace, as the tests and the sweep use: not None)."""
    if isinstance(flags_, flags.FlagValues):
        return flags_[name].present > 0
    return getattr(flags_, name, None) is not None


# Recipe -> the optimizers it is defined for (keras_lamb.recipes).
RECIPE_OPTIMIZERS = {
    "mlperf": ("lars",),
    "goyal": ("momentum", "nesterov"),
    "lamb_paper": ("lamb",),
}
# Flags that override a recipe optimizer's config entry of the same name.
CONFIG_FLAGS = ("momentum", "beta_1", "beta_2", "epsilon",
                "trust_coefficient", "clip_trust_ratio",
                "exclude_from_weight_decay", "exclude_from_layer_adaptation")
SCHEDULE_FLAGS = ("learning_rate", "base_learning_rate", "lr_scaling",
                  "warmup_epochs", "decay", "decay_power", "end_learning_rate")


def optimizer_plan(flags_, steps_per_epoch, train_steps, track_trust_ratios):
    """How the run optimizes: a dict with `optimizer_fn` (call it inside
    `strategy.scope()`), `settings` (every number, for logs and
    results.json), `l2_in_loss` and `label_smoothing`.

    `--recipe=none`: the flags, with `OPTIMIZER_DEFAULTS` for those left
    unset. Otherwise the recipe from `keras_lamb.recipes`, with every flag
    given explicitly overriding it.
    """
    if flags_.recipe != "none":
        return _recipe_plan(flags_, steps_per_epoch, train_steps,
                            track_trust_ratios)
    import keras

    from tpu_scripts.optimizers import (
        l2_in_loss,
        make_optimizer,
        make_schedule,
        scale_learning_rate,
    )

    defaults = OPTIMIZER_DEFAULTS[flags_.optimizer]

    def pick(name):
        value = getattr(flags_, name)
        return defaults[name] if value is None else value

    learning_rate = flags_.learning_rate
    if learning_rate is None:
        learning_rate = scale_learning_rate(
            pick("base_learning_rate"), flags_.base_batch_size,
            flags_.global_batch_size, pick("lr_scaling"),
        )
    settings = dict(
        recipe="none",
        optimizer=flags_.optimizer,
        peak_learning_rate=learning_rate,
        warmup_steps=_warmup_steps(flags_.warmup_epochs, steps_per_epoch,
                                   train_steps, flags_),
        total_steps=train_steps,
        decay=pick("decay"),
        decay_power=flags_.decay_power,
        end_learning_rate=flags_.end_learning_rate,
        momentum=flags_.momentum,
        beta_1=flags_.beta_1,
        beta_2=flags_.beta_2,
        epsilon=flags_.epsilon,
        weight_decay=pick("weight_decay"),
        trust_coefficient=flags_.trust_coefficient,
        clip_trust_ratio=flags_.clip_trust_ratio,
        exclude_from_weight_decay=flags_.exclude_from_weight_decay,
        exclude_from_layer_adaptation=flags_.exclude_from_layer_adaptation,
    )

    def optimizer_fn():
        schedule = make_schedule(
            learning_rate, train_steps, settings["warmup_steps"],
            decay=settings["decay"], power=settings["decay_power"],
            end_learning_rate=settings["end_learning_rate"],
        )
        optimizer = make_optimizer(
            flags_.optimizer, schedule,
            track_trust_ratios=track_trust_ratios,
            **{k: settings[k] for k in (
                "momentum", "beta_1", "beta_2", "epsilon", "weight_decay",
                "trust_coefficient", "clip_trust_ratio",
                "exclude_from_weight_decay", "exclude_from_layer_adaptation",
            )},
        )
        return _maybe_loss_scale(optimizer, flags_.mixed_precision, keras)

    return dict(
        optimizer_fn=optimizer_fn,
        settings=settings,
        l2_in_loss=l2_in_loss(flags_.optimizer, settings["weight_decay"]),
        label_smoothing=flags_.label_smoothing or 0.0,
    )


def _warmup_steps(warmup_epochs, steps_per_epoch, train_steps, flags_=None):
    """The warmup's steps; `run_state.FlagError` when they are as many as
    the run's (the run would be all warmup, its peak rate never used).
    `flags_` (optional) names the flags that set the numbers."""
    from tpu_scripts import run_state

    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if warmup_steps and warmup_steps >= train_steps:
        warmup, length = f"--warmup_epochs={warmup_epochs:g}", ""
        if flags_ is not None:
            if not _explicit(flags_, "warmup_epochs"):
                warmup += " (the default)"
            length = (f" (--train_steps={flags_.train_steps})"
                      if flags_.train_steps else
                      f" (--epochs={flags_.epochs:g})")
        raise run_state.FlagError(
            f"{warmup} is {warmup_steps} steps ({steps_per_epoch} per "
            f"epoch), not fewer than the run's {train_steps} steps{length}: "
            "the whole run would be warmup. Lower --warmup_epochs to below "
            f"{train_steps / steps_per_epoch:g}."
        )
    return warmup_steps


def _maybe_loss_scale(optimizer, mixed_precision, keras):
    if mixed_precision == "float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _recipe_plan(flags_, steps_per_epoch, train_steps, track_trust_ratios):
    from tpu_scripts import run_state

    # Imported here: the rest of the script works without the recipes.
    try:
        from keras_lamb import recipes
    except ImportError as e:
        raise run_state.FlagError(
            f"--recipe={flags_.recipe} needs keras_lamb.recipes, which this "
            f"keras_lamb does not have ({e}). Use --recipe=none."
        ) from None
    import keras

    from tpu_scripts.optimizers import make_schedule

    recipe, name = flags_.recipe, flags_.optimizer
    if name not in RECIPE_OPTIMIZERS[recipe]:
        raise run_state.FlagError(
            f"--recipe={recipe} is defined for --optimizer="
            f"{'|'.join(RECIPE_OPTIMIZERS[recipe])}, not --optimizer={name}."
        )
    batch, epochs = flags_.global_batch_size, train_steps / steps_per_epoch
    explicit = {n for n in CONFIG_FLAGS + SCHEDULE_FLAGS + ("weight_decay",)
                if _explicit(flags_, n)}
    l2, recipe_kwargs = 0.0, {}
    if recipe == "goyal":
        # Goyal et al. add weight_decay * w to the gradient (L2 in the loss);
        # the recipe's SGD decays decoupled, so, as its docstring advises,
        # decay goes into the loss instead (skipping the excluded paths).
        l2 = (flags_.weight_decay if "weight_decay" in explicit
              else recipes.GOYAL_SETTINGS["weight_decay"])
        recipe_kwargs = dict(weight_decay=0.0, nesterov=name == "nesterov")
    elif "weight_decay" in explicit:
        recipe_kwargs["weight_decay"] = flags_.weight_decay
    if recipe in ("mlperf", "lamb_paper"):
        recipe_kwargs["track_trust_ratios"] = track_trust_ratios
    if recipe == "mlperf" and "momentum" in explicit:
        recipe_kwargs["momentum"] = flags_.momentum
        explicit.discard("momentum")
    if recipe == "lamb_paper":
        # The LAMB paper's table is for BERT; its exclusions name LayerNorm.
        # A ResNet needs batch norm excluded: use the script's regexes.
        explicit |= {"exclude_from_weight_decay",
                     "exclude_from_layer_adaptation"}

    def call_recipe():
        if recipe == "mlperf":
            return recipes.lars_resnet50(batch, epochs, steps_per_epoch,
                                         **recipe_kwargs)
        if recipe == "goyal":
            return recipes.goyal_momentum(batch, epochs, steps_per_epoch,
                                          **recipe_kwargs)
        return recipes.lamb_bert(batch, total_steps=train_steps,
                                 **recipe_kwargs)

    _, _, notes = call_recipe()  # the numbers, for logs (outside the scope)
    settings = dict(recipe=recipe, optimizer=name, **notes)
    if l2:
        settings.update(weight_decay=l2, weight_decay_mode=(
            "L2 in the loss (coupled), as in Goyal et al."))
    overrides = {n: getattr(flags_, n) for n in CONFIG_FLAGS
                 if n in explicit}
    schedule_overrides = {n for n in SCHEDULE_FLAGS if n in explicit}
    if schedule_overrides:
        settings.update(
            peak_learning_rate=(flags_.learning_rate
                                if flags_.learning_rate is not None
                                else notes["peak_learning_rate"]),
            warmup_steps=(
                _warmup_steps(flags_.warmup_epochs, steps_per_epoch,
                              train_steps, flags_)
                if "warmup_epochs" in explicit else notes["warmup_steps"]),
            decay=flags_.decay or "polynomial",
            decay_power=(flags_.decay_power if "decay_power" in explicit
                         else notes.get("decay_power", 2.0)),
            end_learning_rate=(flags_.end_learning_rate
                               if "end_learning_rate" in explicit
                               else notes.get("end_learning_rate", 0.0)),
            schedule_overridden_by=sorted(schedule_overrides),
        )
    settings.update(overrides)

    def optimizer_fn():
        optimizer, schedule, _ = call_recipe()
        if schedule_overrides:
            schedule = make_schedule(
                settings["peak_learning_rate"], train_steps,
                settings["warmup_steps"], decay=settings["decay"],
                power=settings["decay_power"],
                end_learning_rate=settings["end_learning_rate"],
            )
        if overrides or schedule_overrides:
            config = optimizer.get_config()
            unknown = sorted(set(overrides) - set(config))
            if unknown:
                raise run_state.FlagError(
                    f"--{', --'.join(unknown)} do(es) not apply to "
                    f"--recipe={recipe}'s {type(optimizer).__name__}."
                )
            config.update(overrides, learning_rate=schedule)
            optimizer = type(optimizer).from_config(config)
        return _maybe_loss_scale(optimizer, flags_.mixed_precision, keras)

    label_smoothing = (flags_.label_smoothing
                       if flags_.label_smoothing is not None
                       else notes.get("label_smoothing", 0.0))
    return dict(optimizer_fn=optimizer_fn, settings=settings, l2_in_loss=l2,
                label_smoothing=label_smoothing)


def flag_values_dict(flags_):
    """Every flag `define_flags` defines and its value (for results.json)."""
    if isinstance(flags_, flags.FlagValues):
        return {name: flags_[name].value for name in sorted(SCRIPT_FLAGS)}
    return dict(vars(flags_))


# Flags that do not change what the run computes (where and how fast it
# runs, what it logs): everything else is the run's identity.
NOT_IDENTITY_FLAGS = (
    "strategy", "tpu", "num_cpu_devices", "collective", "jit_compile",
    "jax_num_processes", "jax_coordinator_address", "jax_process_id",
    "model_parallel",
    "eval_split", "eval_batch_size", "eval_examples", "steps_per_loop",
    "eval_every", "epochs_between_evals", "checkpoint_every",
    "checkpoint_every_minutes",
    "model_dir", "results_json", "deterministic", "track_trust_ratios",
    "allow_changed_flags",
)


def validate_flags(flags_):
    """Raises `run_state.FlagError` (a `ValueError`) naming the flag for
    any value out of range, non-finite or in conflict: everything that can
    be checked before any data is read or model built."""
    from tpu_scripts import run_state

    def check(name, ok, requirement):
        if not ok:
            raise run_state.FlagError(f"--{name} must be {requirement}. Received: "
                             f"{getattr(flags_, name)!r}.")

    for name, value in flag_values_dict(flags_).items():
        check(name, not isinstance(value, float) or math.isfinite(value),
              "a finite number")
    check("global_batch_size", flags_.global_batch_size > 0, "positive")
    for name in ("eval_batch_size", "train_steps", "epochs_between_evals",
                 "checkpoint_every", "checkpoint_every_minutes",
                 "train_examples", "eval_examples", "image_size",
                 "num_cpu_devices", "warmup_epochs", "decay_power",
                 "end_learning_rate"):
        check(name, getattr(flags_, name) >= 0, ">= 0")
    check("epochs", flags_.epochs > 0 or flags_.train_steps > 0,
          "positive (or set --train_steps)")
    for name in ("steps_per_loop", "shuffle_buffer", "base_batch_size",
                 "small_resnet_blocks", "stem_stride"):
        check(name, getattr(flags_, name) >= 1, ">= 1")
    check("small_resnet_widths", all(
        str(w).isdigit() and 0 < int(w) <= MAX_WIDTH
        for w in flags_.small_resnet_widths),
        f"a list of integers in [1, {MAX_WIDTH}]")
    for name in ("learning_rate", "base_learning_rate", "weight_decay",
                 "epsilon"):
        value = getattr(flags_, name)
        check(name, value is None or value >= 0, ">= 0")
    check("label_smoothing", flags_.label_smoothing is None
          or 0 <= flags_.label_smoothing < 1, "in [0, 1)")
    check("clip_trust_ratio", not flags_.clip_trust_ratio
          or flags_.optimizer == "lars", "false unless --optimizer=lars "
          f"(LARC clipping; --optimizer={flags_.optimizer} has no such "
          "option)")
    check_data_flags(flags_)
    if flags_.recipe != "none" and (
            flags_.optimizer not in RECIPE_OPTIMIZERS[flags_.recipe]):
        raise run_state.FlagError(
            f"--recipe={flags_.recipe} is defined for --optimizer="
            f"{'|'.join(RECIPE_OPTIMIZERS[flags_.recipe])}, not "
            f"--optimizer={flags_.optimizer}.")
    # Whether there will be an evaluation set is known from the flags.
    no_eval = ((flags_.synthetic_data and not flags_.num_eval_examples)
               or (flags_.train_files and not flags_.eval_files))
    check_target_flags(flags_, None if no_eval else True)


def run_identity(flags_):
    """The flags that shape the run (`run_state.RunRecord`)."""
    return {name: value for name, value in flag_values_dict(flags_).items()
            if name not in NOT_IDENTITY_FLAGS}


def results_path(flags_):
    return flags_.results_json or os.path.join(
        flags_.model_dir or ".", "results.json"
    )


class EvaluationLog:
    """The `stop_fn` of `Trainer.train`: records every evaluation and
    whether (and when) top-1 first reached `target` (0: no target)."""

    def __init__(self, target, current_step, steps_per_epoch, start_time):
        self.target = target
        self.current_step = current_step
        self.steps_per_epoch = steps_per_epoch
        self.start_time = start_time
        self.evaluations = []
        self.reached_at = None

    def __call__(self, eval_results):
        step = self.current_step()
        record = dict(
            step=step, epoch=step / self.steps_per_epoch,
            wall_seconds=time.time() - self.start_time, **eval_results,
        )
        self.evaluations.append(record)
        accuracy = eval_results.get("accuracy", 0.0)
        if self.target and self.reached_at is None and accuracy >= self.target:
            self.reached_at = record
        return self.reached_at is not None

    def results(self):
        return dict(
            target_accuracy=self.target or None,
            target_reached=(self.reached_at is not None) if self.target
            else None,
            target_reached_at=self.reached_at,
            evaluations=self.evaluations,
        )


def check_target_flags(flags_, eval_input):
    """Raises `run_state.FlagError` for a target the run cannot reach
    (`eval_input`: the evaluation input, `None` when there is none)."""
    from tpu_scripts import run_state

    if not 0.0 <= flags_.target_accuracy <= 1.0:
        raise run_state.FlagError(
            "--target_accuracy must be in [0, 1] (0: no target). Received: "
            f"{flags_.target_accuracy}."
        )
    if flags_.target_accuracy and eval_input is None:
        raise run_state.FlagError(
            "--target_accuracy needs an evaluation set: --eval_files (or "
            "--num_eval_examples with --synthetic_data)."
        )
    if flags_.epochs_between_evals < 0:
        raise run_state.FlagError(
            "--epochs_between_evals must be >= 0. Received: "
            f"{flags_.epochs_between_evals}."
        )


def build_task(flags_, input_shape, num_classes, plan):
    from tpu_scripts.tasks import ClassificationTask

    task = ClassificationTask(
        build_model_fn(flags_, input_shape, num_classes), num_classes,
        label_smoothing=plan["label_smoothing"],
        l2_weight_decay=plan["l2_in_loss"],
        l2_exclude=flags_.exclude_from_weight_decay,
    )
    if flags_.synthetic_data:
        from tpu_scripts.resnet.imagenet_tfrecords import SyntheticImagesTask

        task = SyntheticImagesTask(task, input_shape[0], seed=flags_.seed)
    return task


def run(flags_, log=print):
    """Trains and evaluates as the flags say; returns the results dict."""
    from tpu_scripts import run_state

    start = time.time()
    validate_flags(flags_)
    runtime = distribute.setup(flags_, deterministic=flags_.deterministic)
    distribute.set_random_seed(flags_.seed)
    log = log if runtime.is_chief else (lambda *a, **k: None)
    global_batch_size = flags_.global_batch_size
    distribute.per_replica_batch_size(global_batch_size, runtime.num_replicas)
    eval_batch_size = flags_.eval_batch_size or global_batch_size
    distribute.per_replica_batch_size(  # == the global batch if unset
        eval_batch_size, runtime.num_replicas, "eval_batch_size")
    record = run_state.RunRecord(
        flags_.model_dir, run_identity(flags_), results_path(flags_),
        flags_.allow_changed_flags, runtime.is_chief, log,
    )
    finished = record.start()
    if finished is not None:
        return finished
    log(f"Engine: {runtime.engine}; strategy {flags_.strategy} "
        f"({runtime.name}), {runtime.num_replicas} replicas; global batch "
        f"{global_batch_size}, "
        f"{global_batch_size // runtime.num_replicas} per replica.")
    train_input, eval_input, input_shape, num_classes = build_inputs(
        flags_, global_batch_size, eval_batch_size, log=log
    )
    check_target_flags(flags_, eval_input)
    steps_per_epoch = train_input.steps_per_epoch
    train_steps = flags_.train_steps or max(
        1, int(round(flags_.epochs * steps_per_epoch))
    )
    track = flags_.track_trust_ratios and flags_.optimizer in ("lars", "lamb")
    plan = optimizer_plan(flags_, steps_per_epoch, train_steps, track)
    settings = plan["settings"]
    log("Optimizer: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    record.check_plan(dict(
        settings, global_batch_size=global_batch_size,
        train_steps=train_steps, steps_per_epoch=steps_per_epoch,
        train_examples=getattr(train_input, "num_examples", None),
        label_smoothing=plan["label_smoothing"],
        # Only JAX runs name their engine, so the plans of runs made before
        # there were two engines still match; either engine refuses the
        # other's --model_dir (their checkpoints differ).
        **({"engine": "jax"} if runtime.engine == "jax" else {})))
    trainer = runtime.trainer(
        build_task(flags_, input_shape, num_classes, plan),
        plan["optimizer_fn"], global_batch_size,
        model_dir=flags_.model_dir, steps_per_loop=flags_.steps_per_loop,
        jit_compile=flags_.jit_compile, log=log,
    )
    evaluations = EvaluationLog(flags_.target_accuracy, trainer.current_step,
                                steps_per_epoch, start)
    eval_every_steps = 0
    if flags_.epochs_between_evals:
        eval_every_steps = max(
            1, int(round(flags_.epochs_between_evals * steps_per_epoch)))
    outcome = trainer.train(
        train_input, train_steps, eval_input=eval_input,
        eval_every_steps=eval_every_steps,
        checkpoint_every_steps=flags_.checkpoint_every or steps_per_epoch,
        checkpoint_every_seconds=60 * flags_.checkpoint_every_minutes,
        record=record, stop_fn=evaluations,
    )
    totals = record.totals(global_batch_size)
    results = {
        "top1": outcome["eval"].get("accuracy"),
        "eval_loss": outcome["eval"].get("loss"),
        "eval_examples": eval_input.num_examples if eval_input else 0,
        "train": outcome["train"],
        "steps": outcome["step"],
        "epochs": outcome["step"] / steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "train_steps": train_steps,
        "examples_seen": outcome["step"] * global_batch_size,
        "stopped_early": outcome["stopped_early"],
        **evaluations.results(),
        "wall_seconds": time.time() - start,
        # Over every segment of the run (restarts, preemptions).
        "train_seconds": totals["train_seconds"] if flags_.model_dir
        else outcome["train_seconds"],
        "images_per_second": totals["examples_per_second"]
        if flags_.model_dir else outcome["images_per_second"],
        # This process, without its first (compiling) loop.
        "steady_images_per_second": outcome["steady_images_per_second"],
        "num_replicas": runtime.num_replicas,
        "engine": runtime.engine,
        "model": flags_.model,
        "data": ("synthetic" if flags_.synthetic_data
                 else "tfrecords" if flags_.train_files else flags_.dataset),
        "optimizer_settings": settings,
        "flags": flag_values_dict(flags_),
    }
    results = record.finish(results, outcome["step"])
    log(_summary(results) + ".")
    return results


def _summary(results):
    top1 = ("no evaluation" if results["top1"] is None
            else f"top-1 {results['top1']:.4f}")
    line = (f"{top1} after {results['steps']} steps "
            f"({results['epochs']:.2f} epochs), "
            f"{results['images_per_second']:.3g} images/s")
    if results["target_accuracy"]:
        reached = results["target_reached_at"]
        line += (f"; target {results['target_accuracy']} reached at epoch "
                 f"{reached['epoch']:.2f} (step {reached['step']}) after "
                 f"{reached['wall_seconds']:.0f} s" if reached else
                 f"; target {results['target_accuracy']} not reached")
    return line


def main(argv):
    from tpu_scripts import records, run_state

    # A damaged record met while training ends as one `Error:` line too.
    run_state.run_script(records.data_errors_raised(run), argv)


if __name__ == "__main__":
    define_flags()
    app.run(main)
