"""Page faults and time of one optimizer step, TF with XLA, per allocator
setting (issue 15): `python page_faults.py bert-base 8` under each of
no setting, `TF_CPU_ALLOCATOR_USE_BFC=true`, and
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. Minor faults are counted with
getrusage around each step; one JSON line per run."""
import json
import os
import resource
import statistics
import sys

from common import Timer, compiled_step

import tensorflow as tf  # noqa: E402
import optimizer_step as ob  # noqa: E402
from shapes import shape_set  # noqa: E402

set_name, reps = sys.argv[1], int(sys.argv[2])
names = ["keras.Adam", "keras_lamb.LAMB", "keras_lamb.LAMB[store]",
         "keras.SGD-momentum", "keras_lamb.LARS"]
shapes, n = shape_set(set_name)
variables = ob.make_keras_variables(shapes, ob.random_values(shapes, 0))
grads = [tf.constant(g) for g in ob.random_values(shapes, 1)]
faults = {name: [] for name in names}


def counted(name):
    """The compiled step of `name`, recording the page faults of each call."""
    step = compiled_step(ob.make_keras_optimizer(name, set_name), variables)

    def run():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(grads).numpy()
        faults[name].append(
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return run


results = Timer({name: counted(name) for name in names}, reps,
                warmup=1).run()
ms = {k: round(r["ms"], 1) for k, r in results.items()}
print(json.dumps({
    "shapes": set_name, "load": os.getloadavg()[0],
    "env": {k: v for k, v in os.environ.items()
            if k in ("TF_CPU_ALLOCATOR_USE_BFC", "GLIBC_TUNABLES")},
    "ms": ms,
    # Over the timed calls, the last `reps` of each step.
    "faults_per_step": {k: statistics.median(v[-reps:])
                        for k, v in faults.items()},
    "lamb_x_adam": round(ms["keras_lamb.LAMB"] / ms["keras.Adam"], 3),
    "lamb_store_x_adam": round(ms["keras_lamb.LAMB[store]"]
                               / ms["keras.Adam"], 3),
    "lars_x_sgd": round(ms["keras_lamb.LARS"] / ms["keras.SGD-momentum"], 3),
}))
