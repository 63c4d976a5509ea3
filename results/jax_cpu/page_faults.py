"""JAX on CPU: minor page faults, temporary bytes and time of one jitted
optimizer step (`stateless_apply`, parameters and slots donated), as
`benchmarks/optimizer_step.py` runs it.

`python results/jax_cpu/page_faults.py bert-base 7` prints one JSON line:
median faults per step (getrusage around each call), XLA's temporary
allocation (`memory_analysis().temp_size_in_bytes`) and median ms, for Keras
Adam and SGD-momentum, keras_lamb LAMB and LARS, and LAMB as it ran before
(`[store+separate+reduce]`: the update stored, each norm a `sum`).
"""
import json
import os
import resource
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(REPO, "benchmarks"), REPO]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import optimizer_step as ob  # noqa: E402
from shapes import shape_set  # noqa: E402

NAMES = ["keras.Adam", "keras_lamb.LAMB",
         "keras_lamb.LAMB[store+separate+reduce]", "keras.SGD-momentum",
         "keras_lamb.LARS"]

set_name, reps = sys.argv[1], int(sys.argv[2])
shapes, _ = shape_set(set_name)
values = ob.random_values(shapes, 0)
variables = ob.make_keras_variables(shapes, values)
grads = [jnp.asarray(g) for g in ob.random_values(shapes, 1)]
steps, temporary = {}, {}
for name in NAMES:
    opt = ob.make_keras_optimizer(name, set_name)
    opt.build(variables)
    state = {"opt": [jnp.array(v.value) for v in opt.variables],
             "params": [jnp.array(v) for v in values]}

    def update(opt_values, train_values, grads, opt=opt):
        new_train, new_opt = opt.stateless_apply(
            opt_values, grads, train_values)
        return new_opt, new_train

    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
        state["opt"], state["params"], grads).compile()
    temporary[name] = compiled.memory_analysis().temp_size_in_bytes

    def step(compiled=compiled, state=state):
        state["opt"], state["params"] = compiled(
            state["opt"], state["params"], grads)
        jax.block_until_ready(state["params"])
    steps[name] = step

for step in steps.values():
    step()
    step()
faults = {name: [] for name in NAMES}
times = {name: [] for name in NAMES}
for _ in range(reps):
    for name, step in steps.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times[name].append(1e3 * (time.perf_counter() - start))
        faults[name].append(
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
ms = {k: round(statistics.median(v), 1) for k, v in times.items()}
print(json.dumps({
    "shapes": set_name, "load": round(os.getloadavg()[0], 2),
    "jax": jax.__version__, "ms": ms,
    "faults_per_step": {k: statistics.median(v) for k, v in faults.items()},
    "temporary_bytes": temporary,
    "lamb_x_adam": round(ms["keras_lamb.LAMB"] / ms["keras.Adam"], 3),
    "lamb_before_x_adam": round(
        ms["keras_lamb.LAMB[store+separate+reduce]"] / ms["keras.Adam"], 3),
    "lars_x_sgd": round(ms["keras_lamb.LARS"] / ms["keras.SGD-momentum"], 3),
}))
