"""JAX on CPU: LAMB's step with its variables in XLA's order and one after
another, in plain JAX, on four sets of same-shaped tensors.

`python results/jax_cpu/step_order.py` prints one JSON line per tensor set:
the median ms of a jitted, donated step of Adam and LAMB (the equations of
`keras_lamb.LAMB`'s compiled path on a CPU: the update recomputed for its
norm, both sums of squares in one multi-output reduction over rows of 16),
each in XLA's order and in order (each variable's gradient selected by a
never-true predicate on the previous variable's new weights, as
`keras_lamb.jax_cpu.after` does), and each time divided by Adam's in XLA's
order (what Keras Adam runs).

The sets: BERT-base's FFN kernels (24 of 768 x 3072), its attention kernels
(4 x 24 of 768 x 768), 288 smaller kernels (256 x 768), and two word
embeddings (30522 x 768); about 50 M float32 values each.
"""
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

B1, B2, EPS, WD, LR = 0.9, 0.999, 1e-6, 0.01, 1e-3
SETS = {
    "768x3072 x24": [(768, 3072)] * 24,
    "768x768 x96": [(768, 768)] * 96,
    "256x768 x288": [(256, 768)] * 288,
    "30522x768 x2": [(30522, 768)] * 2,
}


def moments(g, m, v):
    return m + (1 - B1) * (g - m), v + (1 - B2) * (g * g - v)


def direction(w, m, v):
    return m / (jnp.sqrt(v) + EPS) + WD * w


def adam(w, g, m, v):
    m, v = moments(g, m, v)
    return w - LR * m / (jnp.sqrt(v) + EPS), m, v


def lamb(w, g, m, v):
    m, v = moments(g, m, v)
    # `abs(v)` keeps XLA from sharing the norm's copy of the update with
    # the weight update's (as keras_lamb does).
    squares = (jnp.square(w).reshape(-1, 16),
               jnp.square(direction(w, m, jnp.abs(v))).reshape(-1, 16))
    partial = lax.reduce(squares, (jnp.float32(0),) * 2,
                         lambda a, b: (a[0] + b[0], a[1] + b[1]), (1,))
    w_norm, u_norm = (jnp.sqrt(jnp.sum(p)) for p in partial)
    ratio = jnp.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
    return w - LR * ratio * direction(w, m, v), m, v


def after(x, previous):
    bits = lax.bitcast_convert_type(previous[0, 0], jnp.int32)
    never = (bits & 0x7F800000) == 0x7F800001
    return lax.select(jnp.broadcast_to(never, x.shape), jnp.zeros_like(x), x)


def whole_step(update, in_order):
    def step(ws, gs, ms, vs):
        out, previous = ([], [], []), None
        for w, g, m, v in zip(ws, gs, ms, vs):
            if in_order and previous is not None:
                g = after(g, previous)
            new = update(w, g, m, v)
            previous = new[0]
            for column, x in zip(out, new):
                column.append(x)
        return out
    return jax.jit(step, donate_argnums=(0, 2, 3))


def measure(shapes, reps=9):
    rng = np.random.default_rng(0)
    steps = {f"{name}, {order}": whole_step(fn, order == "in order")
             for name, fn in (("Adam", adam), ("LAMB", lamb))
             for order in ("XLA's order", "in order")}
    state = {}
    for key in steps:
        state[key] = [[jnp.asarray(rng.standard_normal(s, np.float32))
                       for s in shapes] for _ in range(2)]
        state[key] += [[jnp.zeros(s) for s in shapes] for _ in range(2)]
    times = {key: [] for key in steps}
    for i in range(reps + 2):  # interleaved, two warm-up rounds
        for key, step in steps.items():
            w, g, m, v = state[key]
            start = time.perf_counter()
            w, m, v = step(w, g, m, v)
            jax.block_until_ready(w)
            if i >= 2:
                times[key].append((time.perf_counter() - start) * 1e3)
            state[key] = [w, g, m, v]
    ms = {key: statistics.median(t) for key, t in times.items()}
    base = ms["Adam, XLA's order"]
    return {key: {"ms": round(t, 1), "x_adam": round(t / base, 2)}
            for key, t in ms.items()}


if __name__ == "__main__":
    for name in sys.argv[1:] or SETS:
        print(json.dumps({"set": name, **measure(SETS[name])}), flush=True)
