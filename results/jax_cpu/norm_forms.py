"""JAX on CPU: the ways of forming LAMB's sums of squares, on the shape of
BERT's word embedding (30522 x 768), and one thread against two.

`python results/jax_cpu/norm_forms.py` prints one JSON line of median ms:
`sum(w**2)` and `sum(u**2)` with `u = m / (sqrt(v) + eps) + wd * w` formed
inside it (XLA:CPU hands both to YNNPACK), two independent `sum`s in one
program, both sums in one multi-output reduction (`jax.lax.reduce` of two
operands) over rows of 8, 16 and 32 values, and an in-place `x * k + 1`
(read and write 4 B per value). Run it again under `taskset -c 0` to compare
with one core.
"""
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

SHAPE = (30522, 768)
w, m, v = (jax.random.normal(k, SHAPE)
           for k in jax.random.split(jax.random.PRNGKey(0), 3))
v = v * v
eps, wd = jnp.float32(1e-6), jnp.float32(0.01)


def update(w, m, v):
    return m / (jnp.sqrt(v) + eps) + wd * w


def multi_output(row):
    def sums(w, m, v):
        squares = (jnp.square(w).reshape(-1, row),
                   jnp.square(update(w, m, v)).reshape(-1, row))
        partial = jax.lax.reduce(
            squares, (jnp.float32(0),) * 2,
            lambda a, b: (a[0] + b[0], a[1] + b[1]), (1,))
        return [jnp.sum(p) for p in partial]
    return sums


FORMS = {
    "sum(w**2)": lambda w, m, v: jnp.sum(w * w),
    "sum(u**2)": lambda w, m, v: jnp.sum(jnp.square(update(w, m, v))),
    "sum(w**2), sum(m**2)": lambda w, m, v: (jnp.sum(w * w),
                                             jnp.sum(m * m)),
    "sum(w**2), sum(u**2)": lambda w, m, v: (
        jnp.sum(w * w), jnp.sum(jnp.square(update(w, m, v)))),
    **{f"multi-output rows of {r}": multi_output(r) for r in (8, 16, 32)},
}


def median_ms(run, reps=15):
    run()
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 2)


results = {}
for name, form in FORMS.items():
    compiled = jax.jit(form).lower(w, m, v).compile()
    results[name] = median_ms(
        lambda: jax.block_until_ready(compiled(w, m, v)))
in_place = jax.jit(lambda x: x * 1.0001 + 1.0, donate_argnums=0)
state = [jnp.array(w)]


def step():
    state[0] = in_place(state[0])
    state[0].block_until_ready()


results["x * k + 1 in place"] = median_ms(step)
print(json.dumps({"cpus": len(os.sched_getaffinity(0)),
                  "load": round(os.getloadavg()[0], 2), "ms": results}))
