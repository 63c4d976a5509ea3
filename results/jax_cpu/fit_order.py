"""JAX on CPU: a whole training step with LAMB's variables in XLA's order and
one after another (`_step_in_order`), against Keras Adam.

`python results/jax_cpu/fit_order.py` prints one JSON line per model: the
median ms per step of Keras `fit` (`jit_compile=True`, 20 steps per call,
5 interleaved rounds) and of a jitted, donated training step written with
the stateless API (as tpu_scripts' JAX engine runs it), and that step's
temporary memory (`compiled.memory_analysis()`), for Keras Adam, LAMB (in
XLA's order, the default) and LAMB in order. Models: multi-layer perceptrons
of `layers` x Dense(2048) on 1024 inputs, 10 classes, at `batch`.
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lamb  # noqa: E402

CONFIGS = [(6, 4), (6, 32), (12, 4)]  # (layers, batch)
STEPS, ROUNDS = 20, 5


def make_model(layers):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((1024,))
    x = inputs
    for _ in range(layers):
        x = keras.layers.Dense(2048, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def make_optimizer(name):
    if name == "Adam":
        return keras.optimizers.Adam(1e-3)
    optimizer = keras_lamb.LAMB(1e-3, weight_decay=0.01)
    optimizer._step_in_order = name == "LAMB in order"
    return optimizer


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def stateless_step(model, optimizer):
    """A jitted, donated training step of `model`, and its state."""
    optimizer.build(model.trainable_variables)

    def step(trainable, non_trainable, opt_vars, x, y):
        def loss_fn(trainable):
            logits, non_trainable_new = model.stateless_call(
                trainable, non_trainable, x)
            return LOSS(y, logits), non_trainable_new

        (loss, non_trainable), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(trainable)
        trainable, opt_vars = optimizer.stateless_apply(
            opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars, loss

    state = [[v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables]]
    return jax.jit(step, donate_argnums=(0, 1, 2)), state


def measure(layers, batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * STEPS, 1024)).astype("float32")
    y = rng.integers(0, 10, size=len(x))
    names = ["Adam", "LAMB", "LAMB in order"]
    fits, steps, temps = {}, {}, {}
    for name in names:
        model = make_model(layers)
        model.compile(make_optimizer(name), LOSS, jit_compile=True)
        model.fit(x[:2 * batch], y[:2 * batch], batch_size=batch, verbose=0)
        fits[name] = model
        step, state = stateless_step(make_model(layers), make_optimizer(name))
        compiled = step.lower(*state, x[:batch], y[:batch]).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
        steps[name] = [compiled, state]
    times = {(kind, name): [] for kind in ("fit", "step") for name in names}
    for _ in range(ROUNDS):  # interleaved
        for name in names:
            start = time.perf_counter()
            fits[name].fit(x, y, batch_size=batch, verbose=0, shuffle=False)
            times["fit", name].append((time.perf_counter() - start) / STEPS)
            compiled, state = steps[name]
            start = time.perf_counter()
            for i in range(STEPS):
                *state, loss = compiled(*state, x[i * batch:(i + 1) * batch],
                                        y[i * batch:(i + 1) * batch])
            jax.block_until_ready(loss)
            times["step", name].append((time.perf_counter() - start) / STEPS)
            steps[name][1] = state
    record = {"layers": layers, "batch": batch}
    for name in names:
        record[name] = {
            "fit_ms": round(1e3 * statistics.median(times["fit", name]), 1),
            "step_ms": round(1e3 * statistics.median(times["step", name]), 1),
            "step_temp_mb": round(temps[name] / 2**20, 1),
        }
    return record


if __name__ == "__main__":
    for layers, batch in CONFIGS:
        print(json.dumps(measure(layers, batch)), flush=True)
