"""Strategy plumbing shared by every script: one string picks the strategy.

The engine follows Keras's backend (`KERAS_BACKEND`): `tensorflow` trains
with `tf.distribute` (`tpu_scripts.trainer`), `jax` with
`keras.distribution` (`tpu_scripts.jax_trainer`). `setup(flags)` configures
either and returns a `Runtime` that makes the engine's trainer.

On TensorFlow, `--strategy` takes one of `STRATEGY_NAMES`:

- `tpu`: `TPUStrategy` on the TPU named by `--tpu` (a Cloud TPU name, a
  `grpc://` address, or `local` on a TPU VM).
- `mirrored`: `MirroredStrategy` over all local GPUs; on a machine without
  GPUs, over all local (logical) CPU devices (see `configure_cpu_devices`).
- `multi_worker_mirrored`: `MultiWorkerMirroredStrategy`; the cluster comes
  from the `TF_CONFIG` environment variable.
- `one_device`: `OneDeviceStrategy` on the first GPU, else the CPU.
- `default`: TensorFlow's default (no-op) strategy.

On JAX it takes one of `JAX_STRATEGY_NAMES`:

- `data_parallel`: `keras.distribution.DataParallel` over every device
  (all local ones; on several hosts, every host's after
  `keras.distribution.initialize()`, which `--jax_num_processes` asks for);
- `one_device`, `default`: the first device.

The TensorFlow-only values and flags (`tpu`, `mirrored`,
`multi_worker_mirrored`, `--tpu`, `--collective`, `--jit_compile`) are
refused on JAX, and `data_parallel` and the `--jax_*` flags on TensorFlow,
each with one error naming the flag.

The command line gives the *global* batch size; `per_replica_batch_size`
derives each replica's share from `strategy.num_replicas_in_sync`.

`define_flags` defines the flags that pick and shape the strategy
(`--strategy`, `--tpu`, `--num_cpu_devices`, `--collective`,
`--mixed_precision`, `--jit_compile`, `--jax_*`) once, for every script that
trains.
"""

import json
import os
import sys
import tempfile

from tpu_scripts.run_state import FlagError

STRATEGY_NAMES = (
    "tpu",
    "mirrored",
    "multi_worker_mirrored",
    "one_device",
    "default",
)
JAX_STRATEGY_NAMES = ("data_parallel", "one_device", "default")
ENGINES = ("tensorflow", "jax")
MIXED_PRECISION_NAMES = ("none", "bfloat16", "float16")
COLLECTIVE_NAMES = ("auto", "ring", "nccl")
FLAG_NAMES = ("strategy", "tpu", "num_cpu_devices", "collective",
              "mixed_precision", "jit_compile", "jax_coordinator_address",
              "jax_num_processes", "jax_process_id", "model_parallel")


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
        "strategy", "default", STRATEGY_NAMES + ("data_parallel",),
        "TensorFlow (tf.distribute): tpu (TPUStrategy on --tpu), mirrored "
        "(all local GPUs, else all logical CPUs), multi_worker_mirrored "
        "(cluster from TF_CONFIG), one_device (first GPU, else CPU), "
        "default. JAX (KERAS_BACKEND=jax, keras.distribution): "
        "data_parallel (every device of every host), one_device, default "
        "(both: the first device).", **f)
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
        "jit_compile", False, "TensorFlow: XLA-compile each replica's "
        "forward and backward pass (GPU/CPU; TPU always compiles). JAX "
        "always compiles.", **f)
    flags.DEFINE_integer(
        "jax_num_processes", 1, "JAX: processes of the job (one per host). "
        "1: this process alone; 0: found by jax.distributed (Cloud TPU pods, "
        "SLURM, ...); >1: with --jax_coordinator_address and "
        "--jax_process_id. Calls keras.distribution.initialize() unless 1.",
        **f)
    flags.DEFINE_integer(
        "model_parallel", 1, "JAX, with --strategy=data_parallel: split "
        "the devices into a (batch, model) mesh with this many devices on "
        "the model axis, and shard the model's large kernels over it "
        "(keras.distribution.ModelParallel with the script's LayoutMap; "
        "BERT). 1: data parallel only.", **f)
    flags.DEFINE_string(
        "jax_coordinator_address", "", "JAX: host:port of process 0, for "
        "--jax_num_processes > 1.", **f)
    flags.DEFINE_integer(
        "jax_process_id", 0, "JAX: this process's index in [0, "
        "--jax_num_processes).", **f)


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
    import tensorflow as tf
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
    import tensorflow as tf
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


# ----------------------------------------------------------------------------
# Both engines


def engine():
    """`"tensorflow"` or `"jax"`: Keras's backend, or an error naming it."""
    import keras

    backend = keras.backend.backend()
    if backend not in ENGINES:
        raise FlagError(
            f"The training scripts run on Keras's tensorflow or jax backend; "
            f"this process uses {backend!r}. Set KERAS_BACKEND=tensorflow or "
            "KERAS_BACKEND=jax.")
    return backend


def check_engine_flags(flags_, engine_name):
    """Raises `FlagError` for a distribution flag the engine does not
    have (reads no data, creates no device)."""
    if engine_name == "jax":
        if flags_.strategy not in JAX_STRATEGY_NAMES:
            raise FlagError(
                f"--strategy={flags_.strategy} is TensorFlow's; on JAX "
                "(KERAS_BACKEND=jax) use one of: "
                f"{', '.join(JAX_STRATEGY_NAMES)} (data_parallel spans every "
                "TPU/GPU of every host).")
        for name, default, why in (
                ("tpu", "", "JAX finds a TPU VM's chips itself"),
                ("collective", "auto", "XLA picks the all-reduce"),
                ("jit_compile", False, "JAX always compiles")):
            if getattr(flags_, name) != default:
                raise FlagError(
                    f"--{name}={getattr(flags_, name)} is a TensorFlow flag "
                    f"({why}); drop it on JAX.")
        if flags_.model_parallel < 1:
            raise FlagError("--model_parallel must be >= 1. Received: "
                            f"{flags_.model_parallel}.")
        if flags_.model_parallel > 1 and flags_.strategy != "data_parallel":
            raise FlagError(
                f"--model_parallel={flags_.model_parallel} splits the "
                "devices of --strategy=data_parallel; add it.")
        if flags_.jax_num_processes < 0:
            raise FlagError("--jax_num_processes must be >= 0. Received: "
                            f"{flags_.jax_num_processes}.")
        if flags_.jax_num_processes > 1:
            if not flags_.jax_coordinator_address:
                raise FlagError(
                    f"--jax_num_processes={flags_.jax_num_processes} needs "
                    "--jax_coordinator_address (host:port of process 0).")
            if not 0 <= flags_.jax_process_id < flags_.jax_num_processes:
                raise FlagError(
                    f"--jax_process_id must be in [0, "
                    f"{flags_.jax_num_processes}). Received: "
                    f"{flags_.jax_process_id}.")
        return
    if flags_.strategy not in STRATEGY_NAMES:
        raise FlagError(
            f"--strategy={flags_.strategy} is the JAX engine's; run with "
            "KERAS_BACKEND=jax, or on TensorFlow use one of: "
            f"{', '.join(STRATEGY_NAMES)}.")
    for name, default in (("jax_num_processes", 1),
                          ("jax_coordinator_address", ""),
                          ("jax_process_id", 0), ("model_parallel", 1)):
        if getattr(flags_, name) != default:
            raise FlagError(
                f"--{name} is a JAX flag; on TensorFlow a cluster comes from "
                "TF_CONFIG (--strategy=multi_worker_mirrored) or --tpu.")


def tensorflow_for_input_only():
    """TensorFlow, loaded for `tf.data` on the host beside JAX, with its
    GPUs hidden from it (it would otherwise take memory on every GPU that
    JAX trains on); TPUs are left to JAX as well."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # devices initialised already
        pass
    return tf


def configure_jax_cpu_devices(count):
    """Splits the host CPU into `count` JAX devices (before JAX creates
    its backends)."""
    if count <= 1:
        return
    import jax

    if jax.config.jax_num_cpu_devices == count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:
        raise RuntimeError(
            f"Cannot split the CPU into {count} JAX devices: JAX has already "
            "created its backends in this process. Set --num_cpu_devices "
            "before any JAX array is made (or XLA_FLAGS="
            "--xla_force_host_platform_device_count).") from e


class Runtime:
    """What a script needs of its engine: the number of replicas (data
    shards), whether this process is the chief, a description, and
    `trainer(...)`, which builds the engine's trainer.

    Attributes:
        engine: `"tensorflow"` or `"jax"`.
        strategy: the `tf.distribute.Strategy` (TensorFlow), else `None`.
        distribution: the `keras.distribution.Distribution` (JAX; `None` for
            one device).
    """

    def __init__(self, engine_name, strategy=None, distribution=None):
        self.engine = engine_name
        self.strategy = strategy
        self.distribution = distribution
        if engine_name == "tensorflow":
            self.num_replicas = strategy.num_replicas_in_sync
            self.is_chief = is_chief(strategy)
            self.name = type(strategy).__name__
        else:
            import jax

            from tpu_scripts import jax_trainer

            self.num_replicas = jax_trainer.num_data_shards(distribution)
            self.is_chief = jax.process_index() == 0
            mesh = getattr(distribution, "device_mesh", None)
            shape = "x".join(map(str, mesh.shape)) if mesh is not None \
                and len(mesh.shape) > 1 else ""
            self.name = (f"{type(distribution).__name__} on "
                         f"{jax.device_count()} {jax.devices()[0].platform} "
                         f"devices{f' ({shape} mesh)' if shape else ''}, "
                         f"{jax.process_count()} process(es)"
                         if distribution is not None else
                         f"one {jax.devices()[0].platform} device")

    def trainer(self, task, optimizer_fn, global_batch_size, jit_compile=False,
                **kwargs):
        """The engine's trainer (`Trainer` or `JaxTrainer`); `kwargs` are
        the arguments both take."""
        if self.engine == "tensorflow":
            from tpu_scripts.trainer import Trainer

            return Trainer(self.strategy, task, optimizer_fn,
                           global_batch_size, jit_compile=jit_compile,
                           **kwargs)
        from tpu_scripts.jax_trainer import JaxTrainer

        return JaxTrainer(task, optimizer_fn, global_batch_size,
                          distribution=self.distribution, **kwargs)


def setup(flags_, deterministic=False, layout_map=None):
    """Configures the engine of Keras's backend from the distribution flags
    (devices, strategy or distribution, mixed precision, determinism) and
    returns its `Runtime`. Call before any tensor is made.

    `layout_map`: for `--model_parallel` on JAX, a function of a
    `keras.distribution.DeviceMesh` (axes "batch" and "model") returning the
    model's `keras.distribution.LayoutMap`; a script without one refuses the
    flag.
    """
    engine_name = engine()
    check_engine_flags(flags_, engine_name)
    if engine_name == "tensorflow":
        configure_cpu_devices(flags_.num_cpu_devices)  # before all
        if deterministic:
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        strategy = get_strategy(flags_.strategy, flags_.tpu,
                                flags_.collective)
        set_mixed_precision(flags_.mixed_precision)
        return Runtime("tensorflow", strategy=strategy)
    import keras

    if sys.modules.get("tensorflow") is not None:  # the input's (BERT)
        tensorflow_for_input_only()
    configure_jax_cpu_devices(flags_.num_cpu_devices)
    if deterministic:  # XLA:GPU's atomics-free kernels (CPU and TPU are)
        os.environ["XLA_FLAGS"] = " ".join(filter(None, (
            os.environ.get("XLA_FLAGS"),
            "--xla_gpu_deterministic_ops=true")))
    if flags_.jax_num_processes != 1:
        import jax

        # CPU devices of several processes all-reduce over gloo (TPUs and
        # GPUs use their own interconnect; this setting is CPU-only).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize(
            job_addresses=flags_.jax_coordinator_address or None,
            num_processes=flags_.jax_num_processes or None,
            process_id=flags_.jax_process_id
            if flags_.jax_num_processes else None)
    set_mixed_precision(flags_.mixed_precision)
    distribution = None
    if flags_.strategy == "data_parallel":
        import jax

        devices = jax.devices()
        model = flags_.model_parallel
        if model == 1:
            distribution = keras.distribution.DataParallel(devices=devices)
        elif layout_map is None:
            raise FlagError(
                f"--model_parallel={model}: this script has no layout for "
                "its model (BERT's pre-training has); use 1.")
        elif len(devices) % model:
            raise FlagError(
                f"--model_parallel={model} does not divide the "
                f"{len(devices)} devices.")
        else:
            mesh = keras.distribution.DeviceMesh(
                (len(devices) // model, model), ["batch", "model"], devices)
            distribution = keras.distribution.ModelParallel(
                layout_map=layout_map(mesh), batch_dim_name="batch")
    return Runtime("jax", distribution=distribution)


def set_random_seed(seed):
    """`keras.utils.set_random_seed`, without importing TensorFlow on JAX.

    Keras seeds TensorFlow too whenever it is installed, which imports it
    (seconds, and its memory) into a JAX process that has no use for it; the
    scripts' `tf.data` pipelines use stateless seeds of their own. So on JAX
    without TensorFlow loaded, the same global state is set here: Python's
    and NumPy's generators and Keras's global seed.
    """
    import keras

    if keras.backend.backend() != "jax" or sys.modules.get("tensorflow"):
        keras.utils.set_random_seed(seed)
        return
    import random

    import numpy as np

    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
        from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED
    except ImportError:  # a Keras that moved them: let it import TensorFlow
        keras.utils.set_random_seed(seed)
        return
    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(
        seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
