"""Strategy plumbing shared by every script: one string picks the strategy.

`--strategy` takes one of `STRATEGY_NAMES`:

- `tpu`: `TPUStrategy` on the TPU named by `--tpu` (a Cloud TPU name, a
  `grpc://` address, or `local` on a TPU VM).
- `mirrored`: `MirroredStrategy` over all local GPUs; on a machine without
  GPUs, over all local (logical) CPU devices (see `configure_cpu_devices`).
- `multi_worker_mirrored`: `MultiWorkerMirroredStrategy`; the cluster comes
  from the `TF_CONFIG` environment variable.
- `one_device`: `OneDeviceStrategy` on the first GPU, else the CPU.
- `default`: TensorFlow's default (no-op) strategy.

The command line gives the *global* batch size; `per_replica_batch_size`
derives each replica's share from `strategy.num_replicas_in_sync`.

`define_flags` defines the flags that pick and shape the strategy
(`--strategy`, `--tpu`, `--num_cpu_devices`, `--collective`,
`--mixed_precision`, `--jit_compile`) once, for every script that trains.
"""

import json
import os
import tempfile

import tensorflow as tf

from tpu_scripts.run_state import FlagError

STRATEGY_NAMES = (
    "tpu",
    "mirrored",
    "multi_worker_mirrored",
    "one_device",
    "default",
)
MIXED_PRECISION_NAMES = ("none", "bfloat16", "float16")
COLLECTIVE_NAMES = ("auto", "ring", "nccl")
FLAG_NAMES = ("strategy", "tpu", "num_cpu_devices", "collective",
              "mixed_precision", "jit_compile")


def define_flags(flag_values=None):
    """Defines the distribution flags (`FLAG_NAMES`) on `flag_values`
    (default: absl's global `FLAGS`).

    The flags count as defined by the calling script (absl's key flags), so
    its `--help` lists them with its own flags.
    """
    from absl import flags

    flags.disclaim_key_flags()  # attribute the flags below to our caller
    flag_values = flags.FLAGS if flag_values is None else flag_values
    f = dict(flag_values=flag_values)
    flags.DEFINE_enum(
        "strategy", "default", STRATEGY_NAMES,
        "tf.distribute strategy: tpu (TPUStrategy on --tpu), mirrored (all "
        "local GPUs, else all logical CPUs), multi_worker_mirrored (cluster "
        "from TF_CONFIG), one_device (first GPU, else CPU), default.", **f)
    flags.DEFINE_string(
        "tpu", "", "TPUClusterResolver name or grpc:// address of the TPU "
        "(`local` on a TPU VM; empty: the TPU_NAME environment variable).",
        **f)
    flags.DEFINE_integer(
        "num_cpu_devices", 0, "Split the host CPU into this many logical "
        "devices before creating the strategy (runs multi-replica "
        "`mirrored` on a CPU-only machine). 0 or 1: no split.", **f)
    flags.DEFINE_enum(
        "collective", "auto", COLLECTIVE_NAMES,
        "All-reduce implementation of multi_worker_mirrored.", **f)
    flags.DEFINE_enum(
        "mixed_precision", "none", MIXED_PRECISION_NAMES,
        "Mixed precision policy: bfloat16 (TPU), float16 (GPU; the "
        "optimizer is wrapped in keras.optimizers.LossScaleOptimizer) or "
        "none (float32).", **f)
    flags.DEFINE_boolean(
        "jit_compile", False, "XLA-compile each replica's forward and "
        "backward pass (GPU/CPU; TPU always compiles).", **f)


def check_choice(flag, value, choices):
    """Raises `ValueError` naming the flag and the choices unless valid."""
    if value not in choices:
        raise FlagError(
            f"Unknown --{flag}={value!r}; expected one of: "
            f"{', '.join(choices)}."
        )
    return value


def configure_cpu_devices(count):
    """Splits the host CPU into `count` logical devices.

    Lets `mirrored` run several replicas on a CPU-only machine (tests, the
    multi-replica code path). Must run before TensorFlow initialises its
    devices, i.e. before any op or strategy is created in this process.
    """
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) == count:
        return  # already split (a second run in the same process)
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as e:
        raise RuntimeError(
            f"Cannot split the CPU into {count} logical devices: TensorFlow "
            "has already initialised its devices in this process. Configure "
            "them before creating any tensor or strategy."
        ) from e


def get_strategy(name, tpu="", collective="auto"):
    """The `tf.distribute.Strategy` called `name` (one of `STRATEGY_NAMES`).

    Args:
        name: the strategy name.
        tpu: for `tpu`, the `TPUClusterResolver` name or address (`""` reads
            the `TPU_NAME` environment variable; `local` on a TPU VM).
        collective: for `multi_worker_mirrored`, the all-reduce
            implementation, `auto`, `ring` (gRPC) or `nccl`.
    """
    check_choice("strategy", name, STRATEGY_NAMES)
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu or None
        )
        if tpu not in ("", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker_mirrored":
        implementation = {
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }[check_choice("collective", collective, COLLECTIVE_NAMES)]
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            )
        )
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(
            gpus[0].name if gpus else "/cpu:0"
        )
    return tf.distribute.get_strategy()


def per_replica_batch_size(global_batch_size, num_replicas,
                           flag="global_batch_size"):
    """`global_batch_size // num_replicas`, or `ValueError` naming `--flag`
    if it is not positive or not divisible."""
    if global_batch_size <= 0:
        raise FlagError(
            f"--{flag} must be positive. Received: {global_batch_size}."
        )
    if global_batch_size % num_replicas:
        raise FlagError(
            f"--{flag}={global_batch_size} is not divisible by the "
            f"{num_replicas} replicas of the strategy; use a multiple of "
            f"{num_replicas}."
        )
    return global_batch_size // num_replicas


def set_mixed_precision(name):
    """Sets Keras's global dtype policy from `none|bfloat16|float16`."""
    import keras

    check_choice("mixed_precision", name, MIXED_PRECISION_NAMES)
    keras.mixed_precision.set_global_policy(
        "float32" if name == "none" else f"mixed_{name}"
    )


def task_type_and_id(strategy):
    """`(task_type, task_id)` of this process (`(None, 0)` outside a
    cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None, 0
    return resolver.task_type, resolver.task_id or 0


def is_chief(strategy):
    """Whether this process writes summaries, results and the checkpoints
    that count (the chief, or worker 0 when the cluster has no chief)."""
    task_type, task_id = task_type_and_id(strategy)
    if task_type is None or task_type == "chief":
        return True
    if task_type == "worker" and task_id == 0:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get(
            "cluster", {}
        )
        return "chief" not in cluster
    return False


def writable_model_dir(model_dir, strategy):
    """Where this process writes checkpoints.

    Under `MultiWorkerMirroredStrategy` every worker must take part in a
    save (the variables may need collective reads), but only the chief's copy
    is kept: the others write to a throw-away directory, as the TensorFlow
    multi-worker guide prescribes.
    """
    if is_chief(strategy):
        return model_dir
    task_type, task_id = task_type_and_id(strategy)
    return os.path.join(
        tempfile.gettempdir(), "tpu_scripts_workers",
        f"{os.path.basename(os.path.normpath(model_dir))}_{task_type}_{task_id}",
    )
