"""Times a compiled training step with LAMB/LARS against AdamW/SGD-momentum.

What a user pays end to end: one `fit` step (`jit_compile=True`) of

- `bert`: keras-hub BERT-base masked LM (built from its configuration, no
  preset download), sequence 128, batch 8, 20 masked positions per sequence;
  `keras_lamb.LAMB` against `keras.optimizers.AdamW`;
- `resnet`: ResNet-50 v1.5 (keras-hub `ResNetBackbone`, the configuration of
  `tpu_scripts/models.resnet50`), 224 pixels, batch 16, 1000 classes;
  `keras_lamb.LARS` against `keras.optimizers.SGD(momentum=0.9)`,

on synthetic data. For each model it builds one copy per optimizer (the same
initial weights), then interleaves, round by round, a `fit` of `--steps`
steps per optimizer (the time between consecutive batch ends, so the first
step of a call and `fit`'s set-up are not counted) and `--steps` compiled
optimizer steps alone on the same variables and random gradients (the
`benchmarks/optimizer_step.py` method). It reports the median step times,

- `x_ref`: the full step against the reference optimizer's, and
  `extra_percent = 100 * (x_ref - 1)`: what LAMB (LARS) costs per training
  step over AdamW (SGD-momentum), measured directly;
- `optimizer_share_percent`: the optimizer step alone over the full step.
  Inside `fit` XLA compiles the optimizer into the same program as the
  backward pass, so this is an estimate (it may fuse or overlap there), and
  the difference of full steps above is the number to quote.

One JSON line per measurement, then a Markdown table. On a shared machine
compare ratios from one run only.

    python benchmarks/train_step.py                      # BERT-base, ResNet-50
    python benchmarks/train_step.py --smoke              # tiny models, seconds
"""

import argparse
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from report import Report, run_record  # noqa: E402

# model -> (optimizer, reference optimizer)
PAIRS = {"bert": ("keras_lamb.LAMB", "keras.AdamW"),
         "resnet": ("keras_lamb.LARS", "keras.SGD-momentum")}
# Sizes of the full and the `--smoke` models.
BERT_SIZES = {
    "full": dict(num_layers=12, hidden_dim=768, num_heads=12,
                 intermediate_dim=3072, vocabulary_size=30522,
                 sequence_length=128, batch_size=8, masked=20),
    "smoke": dict(num_layers=1, hidden_dim=16, num_heads=2,
                  intermediate_dim=32, vocabulary_size=100,
                  sequence_length=8, batch_size=2, masked=2),
}
RESNET_SIZES = {
    "full": dict(filters=[64, 128, 256, 512], blocks=[3, 4, 6, 3],
                 image=224, batch_size=16, classes=1000),
    # keras-hub requires 64 filters in the first stack.
    "smoke": dict(filters=[64], blocks=[1], image=16, batch_size=2,
                  classes=5),
}


def define_flags(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default="bert,resnet",
        help=f"comma-separated models from {sorted(PAIRS)}.")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per round and optimizer (>= 1).")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; medians over all steps.")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, 1 round of 2 steps: checks that "
                        "everything runs.")
    parser.add_argument("--jsonl", default=None,
                        help="also write the JSON lines to this file.")
    parser.add_argument("--markdown", default=None,
                        help="also write the Markdown table to this file.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds = 2, 1
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(PAIRS))
    if unknown or not args.models:
        parser.error(f"--models: unknown or empty {unknown}; choose from "
                     f"{sorted(PAIRS)}")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    return args


# --------------------------------------------------------------------------
# Models and data


def bert_model(size):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=size["vocabulary_size"],
        num_layers=size["num_layers"], num_heads=size["num_heads"],
        hidden_dim=size["hidden_dim"],
        intermediate_dim=size["intermediate_dim"],
        max_sequence_length=max(512, size["sequence_length"]),
    )
    return keras_hub.models.BertMaskedLM(backbone, preprocessor=None)


def bert_data(size, count, seed=0):
    """`count` batches of masked-LM inputs and labels as NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, length = count * size["batch_size"], size["sequence_length"]
    x = {
        "token_ids": rng.integers(0, size["vocabulary_size"], (n, length),
                                  dtype="int32"),
        "segment_ids": np.zeros((n, length), "int32"),
        "padding_mask": np.ones((n, length), "bool"),
        "mask_positions": np.sort(np.stack([
            rng.choice(length, size["masked"], replace=False)
            for _ in range(n)
        ]), axis=1).astype("int32"),
    }
    y = rng.integers(0, size["vocabulary_size"], (n, size["masked"]),
                     dtype="int32")
    return x, y


def resnet_model(size):
    import keras
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=size["filters"],
        stackwise_num_blocks=size["blocks"],
        stackwise_num_strides=[1] + [2] * (len(size["blocks"]) - 1),
        block_type="bottleneck_block",
        use_pre_activation=False,
        image_shape=(size["image"], size["image"], 3),
    )
    x = keras.layers.GlobalAveragePooling2D()(backbone.output)
    logits = keras.layers.Dense(size["classes"], name="logits")(x)
    return keras.Model(backbone.input, logits)


def resnet_data(size, count, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = count * size["batch_size"]
    x = rng.standard_normal((n, size["image"], size["image"], 3),
                            dtype="float32")
    return x, rng.integers(0, size["classes"], (n,), dtype="int32")


def make_optimizer(name):
    import keras

    import keras_lamb
    from keras_lamb.recipes import BERT_EXCLUDE, RESNET_EXCLUDE

    if name == "keras_lamb.LAMB":
        return keras_lamb.LAMB(
            1e-4, weight_decay=0.01, exclude_from_weight_decay=BERT_EXCLUDE,
            exclude_from_layer_adaptation=BERT_EXCLUDE)
    if name == "keras.AdamW":
        optimizer = keras.optimizers.AdamW(1e-4, weight_decay=0.01,
                                           epsilon=1e-6)
        optimizer.exclude_from_weight_decay(var_names=["layer_norm", "bias"])
        return optimizer
    if name == "keras_lamb.LARS":
        return keras_lamb.LARS(
            0.1, weight_decay=1e-4, exclude_from_weight_decay=RESNET_EXCLUDE,
            exclude_from_layer_adaptation=RESNET_EXCLUDE)
    if name == "keras.SGD-momentum":
        return keras.optimizers.SGD(0.1, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}")


# --------------------------------------------------------------------------
# Timing


def step_timer():
    """A callback keeping, in `times`, the seconds between consecutive batch
    ends of `fit` (it waits for each step's loss, so each step is timed to
    completion)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.last = [], None

        def on_train_begin(self, logs=None):
            self.last = None

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # waits for the step
            now = time.perf_counter()
            if self.last is not None:
                self.times.append(now - self.last)
            self.last = now

    return StepTimer()


def fit_runner(model, data, steps, batch_size):
    """`(run, times)`: `run` fits `steps + 1` batches, adding `steps` step
    times to `times`."""
    x, y = data
    timer = step_timer()

    def run():
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False,
                  steps_per_epoch=steps + 1, callbacks=[timer], verbose=0)

    return run, timer.times


def optimizer_runner(name, variables, steps, seed=1):
    """`steps` compiled optimizer steps alone on `variables`, random
    gradients; returns `(run, times)`."""
    import keras
    import numpy as np

    optimizer = make_optimizer(name)
    optimizer.build(variables)
    rng = np.random.default_rng(seed)
    grads = [keras.ops.convert_to_tensor(
        1e-3 * rng.standard_normal(tuple(v.shape)), v.dtype)
        for v in variables]
    times = []
    if keras.backend.backend() == "jax":
        import jax

        # Copies: the steps donate their buffers, which `fit` still uses.
        state = {"t": [jax.numpy.array(v.value) for v in variables],
                 "o": [jax.numpy.array(v.value) for v in optimizer.variables]}
        apply = jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))

        def step():
            state["t"], state["o"] = apply(state["o"], grads, state["t"])
            jax.block_until_ready(state["t"])
    else:
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def apply():
            optimizer.apply(grads, variables)
            return optimizer.iterations

        def step():
            apply().numpy()

    def run():
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)

    return run, times


def measure_model(args, model_name, emit):
    import keras

    size_key = "smoke" if args.smoke else "full"
    build, data_fn, size, loss = {
        "bert": (bert_model, bert_data, BERT_SIZES[size_key],
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        "resnet": (resnet_model, resnet_data, RESNET_SIZES[size_key],
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    }[model_name]
    data = data_fn(size, args.steps + 1)
    runners, n_params = {}, 0
    for opt_name in PAIRS[model_name]:
        keras.utils.set_random_seed(0)  # the same initial weights
        model = build(size)
        model.compile(optimizer=make_optimizer(opt_name), loss=loss,
                      jit_compile=True)
        n_params = sum(math.prod(v.shape) for v in model.trainable_variables)
        start = time.perf_counter()
        fit_runner(model, data, 1, size["batch_size"])[0]()  # compiles
        compile_s = time.perf_counter() - start
        runners[(opt_name, "step")] = fit_runner(
            model, data, args.steps, size["batch_size"])
        runners[(opt_name, "optimizer")] = optimizer_runner(
            opt_name, model.trainable_variables, args.steps)
        runners[(opt_name, "optimizer")][0]()  # compiles
        runners[(opt_name, "optimizer")][1].clear()
        emit({"kind": "compile", "model": model_name, "optimizer": opt_name,
              "first_fit_s": compile_s})
    for _ in range(args.rounds):
        for run, _ in runners.values():
            run()
    ms = {key: 1e3 * statistics.median(times)
          for key, (_, times) in runners.items()}
    adaptive, reference = PAIRS[model_name]
    common = {"kind": "train_step", "backend": keras.backend.backend(),
              "model": model_name, "size": size_key, "n_params": n_params,
              "batch_size": size["batch_size"], "steps": args.steps,
              "rounds": args.rounds, "ref": reference,
              "load_average": list(os.getloadavg())}
    for opt_name in (reference, adaptive):
        step, alone = ms[(opt_name, "step")], ms[(opt_name, "optimizer")]
        x_ref = step / ms[(reference, "step")]
        emit(dict(common, optimizer=opt_name, step_ms=step,
                  optimizer_ms=alone,
                  optimizer_share_percent=100 * alone / step,
                  x_ref=x_ref, extra_percent=100 * (x_ref - 1)))


def markdown_table(records):
    lines = [
        "| backend | model | optimizer | step ms | x ref | extra % | "
        "optimizer alone ms | optimizer share % |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['backend']} | {r['model']} ({r['size']}) | "
            f"{r['optimizer']} | {r['step_ms']:.1f} | {r['x_ref']:.3f} | "
            f"{r['extra_percent']:+.1f} | {r['optimizer_ms']:.1f} | "
            f"{r['optimizer_share_percent']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = define_flags(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    report = Report(args.jsonl, args.markdown)
    report.emit(run_record(
        " ".join(["python", "benchmarks/train_step.py"] + sys.argv[1:]),
        keras=keras.__version__, backend=keras.backend.backend()))
    for model_name in args.models:
        measure_model(args, model_name, report.emit)
        keras.backend.clear_session()
    report.finish(markdown_table(
        [r for r in report.records if r.get("kind") == "train_step"]))

if __name__ == "__main__":
    main()
