"""Times one optimizer step on the parameter shapes of BERT and ResNet-50.

For each backend, shape set and optimizer, one `apply` step is compiled,
warmed up and timed (median of `--reps` rounds; the optimizers of a backend
are interleaved round by round, so a slow moment of a shared machine hits them
alike). Each measurement is printed as one JSON line; a Markdown table
follows. Keras picks its backend at import, so each backend runs in its own
subprocess of this script.

    python benchmarks/optimizer_step.py                       # all backends
    python benchmarks/optimizer_step.py --backend jax --shapes bert-large
    python benchmarks/optimizer_step.py --smoke               # seconds

Floor accounting, bytes per float32 parameter that any implementation must
move (each value read or written once from memory):

- Adam, AdamW: read w, g, m, v and write w, m, v: 7 x 4 = 28 B.
- SGD with momentum: read w, g, m and write w, m: 5 x 4 = 20 B.
- LAMB: Adam's 28 B, plus the trust ratio's reduction pass: the norm of the
  whole update is needed before the first weight moves, so w, m and v (from
  which the update is recomputed) are read twice: 28 + 12 = 40 B.
- LARS: SGD-momentum's 20 B, plus a reduction pass over w and g for their
  norms before the step: 20 + 8 = 28 B.

The floor time is floor bytes x parameters / bandwidth, where the bandwidth is
measured in the same run by `y = x + 1` over as many float32 values as the
model has parameters (read 4 B, write 4 B per value). `gb_per_s` is the floor
bytes divided by the measured step time, so `x_floor = ms / floor_ms`.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from report import Report, run_record  # noqa: E402
from shapes import SHAPE_SETS, shape_set  # noqa: E402

FLOOR_BYTES = {
    "torch.AdamW": 28,
    "timm.Lamb": 40,
    "torch.SGD-momentum": 20,
    "timm.Lars": 28,
    "keras_lamb.LAMB": 40,
    "keras.Lamb": 40,
    "optax.lamb": 40,
    "keras.Adam": 28,
    "keras.AdamW": 28,
    "optax.adam": 28,
    "keras_lamb.LARS": 28,
    "optax.lars": 28,
    "keras.SGD-momentum": 20,
}
# What each optimizer's time is divided by in the `x_ref` column.
REFERENCE = {
    "torch.AdamW": "keras.Adam",
    "timm.Lamb": "keras.Adam",
    "torch.SGD-momentum": "keras.SGD-momentum",
    "timm.Lars": "keras.SGD-momentum",
    "keras_lamb.LAMB": "keras.Adam",
    "keras.Lamb": "keras.Adam",
    "keras.AdamW": "keras.Adam",
    "keras_lamb.LARS": "keras.SGD-momentum",
    "optax.lamb": "keras.Adam",
    "optax.adam": "keras.Adam",
    "optax.lars": "keras.SGD-momentum",
}
KERAS_OPTIMIZERS = [
    "keras_lamb.LAMB", "keras_lamb.LARS", "keras.Adam", "keras.AdamW",
    "keras.Lamb", "keras.SGD-momentum",
]
OPTAX_OPTIMIZERS = ["optax.lamb", "optax.lars", "optax.adam"]
# The torch backend's peers (always measured there): torch.optim with
# foreach, and timm's LAMB and LARS (foreach where timm has it).
TORCH_PEERS = ["torch.AdamW", "torch.SGD-momentum", "timm.Lamb", "timm.Lars"]
# Variants of keras_lamb's step, chosen by its private switches: the
# per-variable reference path (the code before the fast path), the
# backend-neutral step on torch (`neutral`), each way of
# computing the norms (the defaults depend on the backend and device), both
# norms in one reduction or in two, LAMB's update recomputed for its norm or
# stored, the variables stepped one after another (JAX), and no exclusions
# (every variable decayed and adapted). Variants combine with `+`:
# `keras_lamb.LAMB[adapt-all+joint]`.
VARIANTS = {
    "reference": {"_use_reference_path": True},
    # torch: the backend-neutral whole step instead of the grouped
    # torch._foreach_* one (keras_lamb.torch_step).
    "neutral": {"_torch_update": None},
    "reduce": {"_norm_method": "reduce"},
    "matvec": {"_norm_method": "matvec"},
    "rows": {"_norm_method": "rows"},
    "multi_output": {"_norm_method": "multi_output"},
    "joint": {"_joint_norms": True},
    "separate": {"_joint_norms": False},
    "recompute": {"_recompute_update": True},
    "store": {"_recompute_update": False},
    "in-order": {"_step_in_order": True},
    "adapt-all": {},  # handled in make_keras_optimizer
}
ALL_OPTIMIZERS = KERAS_OPTIMIZERS + OPTAX_OPTIMIZERS + [
    f"keras_lamb.{o}[{v}]" for o in ("LAMB", "LARS") for v in VARIANTS
]


def variants_of(name):
    """`"keras_lamb.LAMB[rows+joint]"` -> `["rows", "joint"]`."""
    if "[" not in name:
        return []
    return name[name.index("[") + 1:-1].split("+")


def known_optimizer(name):
    base = base_name(name)
    if base not in KERAS_OPTIMIZERS + OPTAX_OPTIMIZERS:
        return False
    variants = variants_of(name)
    if variants and not base.startswith("keras_lamb."):
        return False
    return all(v in VARIANTS for v in variants) and (
        not variants or name.endswith("]"))


def base_name(name):
    """`"keras_lamb.LAMB[reference]"` -> `"keras_lamb.LAMB"`."""
    return name.split("[")[0]


# Variables excluded from weight decay and from layer adaptation, per set.
EXCLUDE = {"resnet50": "bn|bias", "bert-base": "layer_norm|bias",
           "bert-large": "layer_norm|bias", "smoke": "layer_norm|bias"}
LEARNING_RATE = {"lamb": 1e-3, "adam": 1e-3, "lars": 0.1, "sgd": 0.1}


def define_flags():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend", choices=["tensorflow", "jax", "torch", "all"],
        default="all",
        help="Keras backend(s) to measure; each runs in a subprocess (all: "
        "tensorflow and jax; torch on request, with torch.optim's AdamW and "
        "SGD, and timm's Lamb and Lars when timm is installed, as peers).")
    parser.add_argument(
        "--shapes", default="bert-base,resnet50",
        help=f"comma-separated shape sets from {sorted(SHAPE_SETS)}.")
    parser.add_argument(
        "--optimizers", default=",".join(KERAS_OPTIMIZERS + OPTAX_OPTIMIZERS),
        help="comma-separated optimizers from " + ", ".join(ALL_OPTIMIZERS)
        + " (optax ones run on the JAX backend only; `[reference]` is the "
        "per-variable reference path of keras_lamb, `[reduce]`, `[matvec]`, "
        "`[rows]` and `[multi_output]` force a way of computing the norms, "
        "`[joint]` and `[separate]` reduce both norms in one pass or in two, "
        "`[recompute]` and `[store]` form LAMB's update again for its norm "
        "or keep it between the two, `[in-order]` steps the variables one "
        "after another (JAX; by default in the order XLA picks), "
        "`[adapt-all]` drops the exclusions; combine variants with `+`, "
        "e.g. `keras_lamb.LAMB[adapt-all+joint]`).")
    parser.add_argument(
        "--xla", choices=["on", "off", "both"], default="both",
        help="TensorFlow backend: compile the step with XLA or not.")
    parser.add_argument("--reps", type=int, default=10,
                        help="timed rounds; the median is reported.")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed rounds after compilation.")
    parser.add_argument(
        "--steps-per-sample", type=int, default=1,
        help="steps dispatched back to back per timed sample (JAX backend), "
        "waiting for the device only after the last: the step time of a "
        "training loop, where the host dispatches the next step while the "
        "device runs this one. 1 times each step from call to completion, "
        "host dispatch included.")
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny shapes, 1 round, no warm-up: checks that everything runs.")
    parser.add_argument(
        "--in-graph-loop", action="store_true",
        help="JAX backend: run the steps of a sample inside one compiled "
        "program (`jax.lax.fori_loop`), so that the time is the device's: "
        "the host dispatches one call per sample. Without it, each step is "
        "one call, whose host-side cost (flattening and donating every "
        "parameter and slot) can exceed the device time on a GPU.")
    parser.add_argument(
        "--dump-hlo", default=None,
        help="JAX backend: write each step's optimized HLO to this folder.")
    parser.add_argument("--jsonl", default=None,
                        help="also write the JSON lines to this file.")
    parser.add_argument("--markdown", default=None,
                        help="also write the Markdown table to this file.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.reps, args.warmup = "smoke", 1, 0
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    for name in args.shapes:
        shape_set(name)  # raises on an unknown name
    unknown = sorted(o for o in args.optimizers if not known_optimizer(o))
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from "
                     f"{ALL_OPTIMIZERS}")
    if args.reps < 1 or args.warmup < 0 or args.steps_per_sample < 1:
        parser.error("--reps and --steps-per-sample must be >= 1 and "
                     "--warmup >= 0")
    return args


# --------------------------------------------------------------------------
# Worker side: runs inside a process whose Keras backend is fixed.


def make_keras_optimizer(name, set_name):
    import keras

    import keras_lamb

    variants = variants_of(name)
    exclude = None if "adapt-all" in variants else EXCLUDE[set_name]
    if name.startswith("keras_lamb.LAMB"):
        opt = keras_lamb.LAMB(
            learning_rate=LEARNING_RATE["lamb"], weight_decay=0.01,
            exclude_from_weight_decay=exclude,
            exclude_from_layer_adaptation=exclude)
    elif name.startswith("keras_lamb.LARS"):
        opt = keras_lamb.LARS(
            learning_rate=LEARNING_RATE["lars"], momentum=0.9,
            weight_decay=1e-4, exclude_from_weight_decay=exclude,
            exclude_from_layer_adaptation=exclude)
    elif name == "keras.Adam":
        opt = keras.optimizers.Adam(LEARNING_RATE["adam"])
    elif name == "keras.AdamW":
        opt = keras.optimizers.AdamW(LEARNING_RATE["adam"], weight_decay=0.01)
        # Keras matches these against `variable.name`, the last path part.
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    elif name == "keras.Lamb":
        opt = keras.optimizers.Lamb(LEARNING_RATE["lamb"])
    elif name == "keras.SGD-momentum":
        opt = keras.optimizers.SGD(LEARNING_RATE["sgd"], momentum=0.9)
    else:
        raise ValueError(name)
    for variant in variants:
        for attribute, value in VARIANTS[variant].items():
            setattr(opt, attribute, value)
    return opt


def make_optax(name, shapes, set_name):
    import re

    import optax

    pattern = re.compile(EXCLUDE[set_name])
    keep = [pattern.search(path) is None for path, _ in shapes]
    if name == "optax.lamb":
        return optax.lamb(LEARNING_RATE["lamb"], eps=1e-6, weight_decay=0.01,
                          mask=keep)
    if name == "optax.lars":
        return optax.lars(LEARNING_RATE["lars"], weight_decay=1e-4,
                          weight_decay_mask=keep, trust_ratio_mask=keep,
                          momentum=0.9)
    if name == "optax.adam":
        return optax.adam(LEARNING_RATE["adam"])
    raise ValueError(name)


def random_values(shapes, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [0.02 * rng.standard_normal(shape, dtype="float32")
            for _, shape in shapes]


def make_keras_variables(shapes, values):
    """Keras variables whose `path` is the name in `shapes`."""
    import contextlib

    import keras

    variables = []
    for (path, _), value in zip(shapes, values):
        *scopes, leaf = path.split("/")
        with contextlib.ExitStack() as stack:
            for scope in scopes:
                stack.enter_context(keras.name_scope(scope))
            variables.append(keras.Variable(value, name=leaf))
    return variables


class Timer:
    """Interleaves the timed calls of several step functions.

    `steps` maps a name to a zero-argument callable that runs
    `steps_per_sample` steps and blocks until they are done. The first call
    of each includes its compilation.
    """

    def __init__(self, steps, reps, warmup, steps_per_sample=1):
        self.steps, self.reps, self.warmup = steps, reps, warmup
        self.steps_per_sample = steps_per_sample

    def run(self):
        first = {}
        for name, step in self.steps.items():
            start = time.perf_counter()
            step()
            first[name] = time.perf_counter() - start
        for _ in range(self.warmup):
            for step in self.steps.values():
                step()
        times = {name: [] for name in self.steps}
        cpu_times = {name: [] for name in self.steps}
        for _ in range(self.reps):
            for name, step in self.steps.items():
                cpu_start = time.process_time()
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        k = self.steps_per_sample
        return {
            name: {
                "ms": 1e3 * statistics.median(t) / k,
                "ms_min": 1e3 * min(t) / k,
                # CPU time of all the process's threads: less sensitive than
                # wall time to other processes competing for the cores.
                "cpu_ms": 1e3 * statistics.median(cpu_times[name]) / k,
                "first_call_ms": 1e3 * first[name],
                "compile_ms": 1e3 * max(first[name] - statistics.median(t),
                                        0.0),
            }
            for name, t in times.items()
        }


def hlo_kernel_count(hlo_text):
    """Kernel-like instructions in an optimized HLO module (approximate).

    Counts fusions, library calls (custom-call), copies and sorts in the
    entry computation, in while-loop bodies and in any other computation
    that is not the body of a fusion, a reduction's combiner or a loop
    condition: about one kernel launch each on GPU (a loop body counts once).
    """
    import re

    opcode = re.compile(r"(?<![%\w.])(fusion|custom-call|copy|sort)\(")
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
    count, counted = 0, False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation's header
            name = line.split()[0].lstrip("%")
            counted = line.startswith("ENTRY") or name in bodies or (
                not name.startswith(("fused", "wrapped", "region",
                                     "horizontally_fused")))
            continue
        if counted and " = " in line and opcode.search(
                line.split(" = ", 1)[1]):
            count += 1
    return count


def tf_worker(args, emit):
    import keras
    import tensorflow as tf

    # One tf.function per optimizer and mode is intended, not retracing.
    tf.get_logger().setLevel("ERROR")
    emit({"kind": "versions", "backend": "tensorflow",
          "tensorflow": tf.__version__, "keras": keras.__version__})
    for o in args.optimizers:
        if o.startswith("optax."):
            emit({"backend": "tensorflow", "optimizer": o,
                  "skipped": "optax runs on the JAX backend only"})
    for set_name in args.shapes:
        tf_measure_set(args, set_name, emit)
        keras.backend.clear_session()


def tf_measure_set(args, set_name, emit):
    import tensorflow as tf

    shapes, n_params = shape_set(set_name)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.xla]
    variables = make_keras_variables(shapes, random_values(shapes, 0))
    grads = [tf.constant(g) for g in random_values(shapes, 1)]
    copy_in = tf.Variable(tf.zeros([n_params]))
    copy_out = tf.Variable(tf.zeros([n_params]))

    @tf.function(jit_compile=True)
    def copy():
        copy_out.assign(copy_in + 1.0)
        return copy_out[0]

    def step_fn(opt, xla):
        def apply(grads):
            opt.apply(grads, variables)
            return opt.iterations

        fn = tf.function(apply, jit_compile=xla)
        return lambda: fn(grads).numpy()

    steps = {"copy": lambda: copy().numpy()}
    for opt_name in args.optimizers:
        if opt_name.startswith("optax."):
            continue
        for xla in modes:
            opt = make_keras_optimizer(opt_name, set_name)
            opt.build(variables)
            steps[(opt_name, xla)] = step_fn(opt, xla)
    results = Timer(steps, args.reps, args.warmup).run()
    copy_ms = results.pop("copy")["ms"]
    bandwidth = 8 * n_params / (copy_ms * 1e-3) / 1e9
    common = {"backend": "tensorflow",
              "device": tf.config.list_logical_devices()[-1].name,
              "shapes": set_name, "n_params": n_params,
              "n_tensors": len(shapes), "reps": args.reps}
    emit(dict(common, kind="bandwidth", ms=copy_ms, gb_per_s=bandwidth,
              what="y = x + 1, XLA"))
    for (opt_name, xla), r in results.items():
        emit(measurement(common, opt_name, r, n_params, bandwidth, xla=xla,
                         results=results, key=(opt_name, xla)))


def jax_worker(args, emit):
    import jax
    import keras

    have_optax = importlib.util.find_spec("optax") is not None
    versions = {"kind": "versions", "backend": "jax", "jax": jax.__version__,
                "keras": keras.__version__}
    if have_optax:
        import optax

        versions["optax"] = optax.__version__
    emit(versions)
    optimizers = list(args.optimizers)
    if not have_optax:
        for o in [o for o in optimizers if o.startswith("optax.")]:
            emit({"backend": "jax", "optimizer": o,
                  "skipped": "optax is not installed"})
        optimizers = [o for o in optimizers if not o.startswith("optax.")]
    for set_name in args.shapes:
        jax_measure_set(args, optimizers, set_name, emit)
        keras.backend.clear_session()


def jax_measure_set(args, optimizers, set_name, emit):
    """Every optimizer steps the same parameters in turn; parameters and
    optimizer states are donated, so each step updates them in place."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    # Keras variables (parameters and optimizer slots) stay on the host: the
    # steps run on device copies of their values, one set per optimizer.
    host = jax.devices("cpu")[0]
    shapes, n_params = shape_set(set_name)
    values = random_values(shapes, 0)
    with jax.default_device(host):
        variables = make_keras_variables(shapes, values)
    params = {"p": [jax.device_put(v, device) for v in values]}
    del values
    grads = [jax.device_put(g, device) for g in random_values(shapes, 1)]
    copy = {"x": jax.device_put(jnp.zeros([n_params], "float32"), device)}
    copy_fn = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    if args.in_graph_loop:
        copy_fn = jax.jit(lambda x: jax.lax.fori_loop(
            0, args.steps_per_sample, lambda _, y: y + 1.0, x),
            donate_argnums=0)

    def copy_step():
        for _ in range(1 if args.in_graph_loop else args.steps_per_sample):
            copy["x"] = copy_fn(copy["x"])
        copy["x"].block_until_ready()

    kernels, hlo = {}, {}
    k = args.steps_per_sample

    calls = 1 if args.in_graph_loop else k

    def in_graph_loop(update):
        """`update` run `k` times in one program (a `fori_loop`)."""
        def run(opt_state, p, grads):
            def body(_, carry):
                return update(carry[0], carry[1], grads)
            return jax.lax.fori_loop(0, k, body, (opt_state, p))
        return run

    def step_fn(update, state, name):
        if args.in_graph_loop:
            update = in_graph_loop(update)
        fn = jax.jit(update, donate_argnums=(0, 1))
        compiled = []

        def step():
            if not compiled:  # ahead of time, to read the optimized HLO
                compiled.append(
                    fn.lower(state["opt"], params["p"], grads).compile())
                hlo[name] = compiled[0].as_text()
                kernels[name] = hlo_kernel_count(hlo[name])
            for _ in range(calls):
                state["opt"], params["p"] = compiled[0](
                    state["opt"], params["p"], grads)
            jax.block_until_ready(params["p"])
        return step

    def keras_update(opt):
        def update(opt_values, train_values, grads):
            new_train, new_opt = opt.stateless_apply(
                opt_values, grads, train_values)
            return new_opt, new_train
        return update

    def optax_update(tx):
        import optax

        def update(opt_state, p, grads):
            updates, opt_state = tx.update(grads, opt_state, p)
            return opt_state, optax.apply_updates(p, updates)
        return update

    steps = {"copy": copy_step}
    for opt_name in optimizers:
        if opt_name.startswith("optax."):
            tx = make_optax(opt_name, shapes, set_name)
            state = {"opt": jax.device_put(tx.init(params["p"]), device)}
            steps[opt_name] = step_fn(optax_update(tx), state, opt_name)
        else:
            opt = make_keras_optimizer(opt_name, set_name)
            with jax.default_device(host):
                opt.build(variables)
            # Committed to the device like the parameters, so the second
            # call does not compile again for a different placement.
            state = {"opt": [jax.device_put(v.value, device)
                             for v in opt.variables]}
            steps[opt_name] = step_fn(keras_update(opt), state, opt_name)
    results = Timer(steps, args.reps, args.warmup, k).run()
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        for name, text in hlo.items():
            path = os.path.join(args.dump_hlo, f"{set_name}_{name}.hlo.txt")
            with open(path, "w") as f:
                f.write(text)
    copy_ms = results.pop("copy")["ms"]
    bandwidth = 8 * n_params / (copy_ms * 1e-3) / 1e9
    common = {"backend": "jax", "device": f"{device.platform}:"
              f"{getattr(device, 'device_kind', '')}",
              "shapes": set_name, "n_params": n_params,
              "n_tensors": len(shapes), "reps": args.reps,
              "steps_per_sample": k, "in_graph_loop": args.in_graph_loop}
    memory = device.memory_stats() or {}  # None on CPU
    emit(dict(common, kind="bandwidth", ms=copy_ms, gb_per_s=bandwidth,
              what="x = x + 1 in place, jax.jit",
              peak_device_bytes=memory.get("peak_bytes_in_use")))
    for opt_name, r in results.items():
        emit(dict(measurement(common, opt_name, r, n_params, bandwidth,
                              xla=True, results=results, key=opt_name),
                  hlo_kernels=kernels[opt_name]))


def measurement(common, opt_name, r, n_params, bandwidth, xla, results, key):
    floor_bytes = FLOOR_BYTES[base_name(opt_name)]
    floor_ms = floor_bytes * n_params / (bandwidth * 1e9) * 1e3
    record = dict(
        common, kind="step", optimizer=opt_name, xla=xla,
        ms=r["ms"], ms_min=r["ms_min"], cpu_ms=r["cpu_ms"],
        compile_ms=r["compile_ms"],
        first_call_ms=r["first_call_ms"],
        floor_bytes_per_param=floor_bytes,
        gb_per_s=floor_bytes * n_params / (r["ms"] * 1e-3) / 1e9,
        floor_ms=floor_ms, x_floor=r["ms"] / floor_ms,
    )
    ref = REFERENCE.get(base_name(opt_name))
    ref_key = (ref, xla) if isinstance(key, tuple) else ref
    if ref in results or ref_key in results:
        ref_r = results[ref_key]
        record.update(
            ref=ref, x_ref=r["ms"] / ref_r["ms"],
            x_ref_cpu=r["cpu_ms"] / ref_r["cpu_ms"],
            # (None where the reference compiles nothing: torch eager.)
            x_ref_compile=(r["compile_ms"] / ref_r["compile_ms"]
                           if ref_r["compile_ms"] >= 1.0 else None),
        )
    return record


def torch_peer(name, params, set_name):
    """A torch.optim or timm optimizer over `params` (torch tensors with
    gradients set), the same hyperparameters as the Keras ones."""
    import re

    import torch

    pattern = re.compile(EXCLUDE[set_name])
    if name == "torch.AdamW":
        return torch.optim.AdamW(params, LEARNING_RATE["adam"],
                                 weight_decay=0.01, foreach=True)
    if name == "torch.SGD-momentum":
        return torch.optim.SGD(params, LEARNING_RATE["sgd"], momentum=0.9,
                               foreach=True)
    from timm.optim import Lamb, Lars

    decay = [p for p, (path, _) in zip(params, SHAPE_PATHS[set_name])
             if not pattern.search(path)]
    rest = [p for p, (path, _) in zip(params, SHAPE_PATHS[set_name])
            if pattern.search(path)]
    if name == "timm.Lamb":
        # Groups without decay skip adaptation in timm (its always_adapt).
        return Lamb([dict(params=decay, weight_decay=0.01),
                     dict(params=rest, weight_decay=0.0)],
                    LEARNING_RATE["lamb"], max_grad_norm=None)
    return Lars([dict(params=decay, weight_decay=1e-4),
                 dict(params=rest, weight_decay=0.0)],
                LEARNING_RATE["lars"], momentum=0.9)


SHAPE_PATHS = {}


def torch_worker(args, emit):
    """Keras optimizers (eager, as `fit` steps them on torch) and torch.optim
    / timm peers, on CPU or the first GPU, each on its own copy of the
    parameters."""
    import keras
    import torch

    have_timm = importlib.util.find_spec("timm") is not None
    versions = {"kind": "versions", "backend": "torch",
                "torch": torch.__version__, "keras": keras.__version__}
    if have_timm:
        import timm

        versions["timm"] = timm.__version__
    emit(versions)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for set_name in args.shapes:
        shapes, n_params = shape_set(set_name)
        SHAPE_PATHS[set_name] = shapes
        values = random_values(shapes, 0)
        grads_np = random_values(shapes, 1)
        steps, k = {}, args.steps_per_sample
        copy_in = torch.zeros(n_params, device=device)
        copy_out = torch.zeros(n_params, device=device)

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        def copy():
            for _ in range(k):
                torch.add(copy_in, 1.0, out=copy_out)
            sync()

        steps["copy"] = copy
        for opt_name in args.optimizers:
            if opt_name.startswith("optax."):
                continue
            variables = make_keras_variables(shapes, values)
            grads = [torch.as_tensor(g, device=device) for g in grads_np]
            opt = make_keras_optimizer(opt_name, set_name)
            opt.build(variables)

            def step(opt=opt, variables=variables, grads=grads):
                for _ in range(k):
                    opt.apply(grads, variables)
                sync()

            steps[opt_name] = step
        for name in TORCH_PEERS:
            if name.startswith("timm.") and not have_timm:
                emit({"backend": "torch", "optimizer": name,
                      "skipped": "timm is not installed"})
                continue
            params = [torch.tensor(v, device=device, requires_grad=True)
                      for v in values]
            for p, g in zip(params, grads_np):
                p.grad = torch.as_tensor(g, device=device)
            peer = torch_peer(name, params, set_name)

            def peer_step(peer=peer):
                for _ in range(k):
                    peer.step()
                sync()

            steps[name] = peer_step
        results = Timer(steps, args.reps, args.warmup, k).run()
        copy_ms = results.pop("copy")["ms"]
        bandwidth = 8 * n_params / (copy_ms * 1e-3) / 1e9
        common = {"backend": "torch", "device": device, "shapes": set_name,
                  "n_params": n_params, "n_tensors": len(shapes),
                  "reps": args.reps}
        emit(dict(common, kind="bandwidth", ms=copy_ms, gb_per_s=bandwidth,
                  what="y = x + 1, torch"))
        for opt_name, r in results.items():
            emit(measurement(common, opt_name, r, n_params, bandwidth,
                             xla=False, results=results, key=opt_name))
        keras.backend.clear_session()


def worker_main(args):
    def emit(record):
        print(json.dumps(record), flush=True)

    if args.worker == "tensorflow":
        tf_worker(args, emit)
    elif args.worker == "torch":
        torch_worker(args, emit)
    else:
        jax_worker(args, emit)


# --------------------------------------------------------------------------
# Parent side: one subprocess per backend, then the table.


def run_backend(backend, args):
    """Runs the worker for `backend`; yields its JSON records."""
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[
        backend]
    if importlib.util.find_spec(module) is None:
        yield {"backend": backend, "skipped": f"{module} is not installed"}
        return
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, os.path.abspath(__file__),
               "--worker", backend, "--shapes", ",".join(args.shapes),
               "--optimizers", ",".join(args.optimizers),
               "--xla", args.xla, "--reps", str(args.reps),
               "--warmup", str(args.warmup),
               "--steps-per-sample", str(args.steps_per_sample)]
    if args.dump_hlo:
        command += ["--dump-hlo", os.path.abspath(args.dump_hlo)]
    if args.in_graph_loop:
        command.append("--in-graph-loop")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               text=True)
    for line in process.stdout:
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)
    if process.wait() != 0:
        yield {"backend": backend,
               "error": f"worker exited with status {process.returncode}"}


def markdown_table(records):
    """The step records as a Markdown table, then notes (bandwidth, skips)."""
    lines = [
        "| backend | XLA | shapes | optimizer | ms | x ref | ref | "
        "x ref (CPU time) | compile ms | x ref compile | floor B/param | "
        "GB/s | x floor | HLO kernels |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r.get("kind") != "step":
            continue
        has_ref = "x_ref" in r
        lines.append(
            f"| {r['backend']} | {'on' if r['xla'] else 'off'} | "
            f"{r['shapes']} | {r['optimizer']} | {r['ms']:.1f} | "
            + (f"{r['x_ref']:.2f} | {r['ref']} | {r['x_ref_cpu']:.2f} | "
               if has_ref else " | | | ")
            + f"{r['compile_ms']:.0f} | "
            + (f"{r['x_ref_compile']:.2f} | "
               if has_ref and r.get("x_ref_compile") is not None else " | ")
            + f"{r['floor_bytes_per_param']} | {r['gb_per_s']:.1f} | "
            f"{r['x_floor']:.2f} | {r.get('hlo_kernels', '')} |")
    notes = []
    for r in records:
        if r.get("kind") == "bandwidth":
            notes.append(
                f"- {r['backend']} {r['shapes']}: bandwidth "
                f"{r['gb_per_s']:.1f} GB/s ({r['what']}, {r['ms']:.1f} ms "
                f"over {r['n_params']:,} values; device {r['device']})")
        elif r.get("kind") == "versions":
            notes.append(f"- {r['backend']}: " + ", ".join(
                f"{k} {v}" for k, v in r.items() if k not in ("kind",
                                                             "backend")))
        elif "skipped" in r or "error" in r:
            notes.append(f"- {r.get('backend')} {r.get('optimizer', '')}: "
                         f"{r.get('skipped') or r.get('error')}")
    return "\n".join(lines + [""] + notes) + "\n"


def main():
    args = define_flags()
    if args.worker:
        worker_main(args)
        return
    backends = (["tensorflow", "jax"] if args.backend == "all"
                else [args.backend])
    report = Report(args.jsonl, args.markdown)
    report.emit(run_record(" ".join(["python"] + sys.argv),
                           python=platform.python_version()))
    failed = False
    for backend in backends:
        for record in run_backend(backend, args):
            report.emit(record)
            failed = failed or "error" in record
    report.finish(markdown_table(report.records))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
