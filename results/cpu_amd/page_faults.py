"""Page faults and time of one optimizer step, TF with XLA, per allocator
setting (issue 15): `python page_faults.py bert-base 8` under each of
no setting, `TF_CPU_ALLOCATOR_USE_BFC=true`, and
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. Minor faults are counted with
getrusage around each step; one JSON line per run."""
import json, os, resource, statistics, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(REPO, "benchmarks"), REPO]
import tensorflow as tf  # noqa: E402
import optimizer_step as ob  # noqa: E402
from shapes import shape_set  # noqa: E402

set_name, reps = sys.argv[1], int(sys.argv[2])
names = ["keras.Adam", "keras_lamb.LAMB", "keras_lamb.LAMB[store]",
         "keras.SGD-momentum", "keras_lamb.LARS"]
shapes, n = shape_set(set_name)
variables = ob.make_keras_variables(shapes, ob.random_values(shapes, 0))
grads = [tf.constant(g) for g in ob.random_values(shapes, 1)]
fns = {}
for name in names:
    opt = ob.make_keras_optimizer(name, set_name)
    opt.build(variables)
    f = tf.function(lambda g, opt=opt: (opt.apply(g, variables),
                                        opt.iterations)[1], jit_compile=True)
    f(grads).numpy(); f(grads).numpy()
    fns[name] = f
times = {k: [] for k in fns}
faults = {k: [] for k in fns}
for _ in range(reps):
    for k, f in fns.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        f(grads).numpy()
        times[k].append(time.perf_counter() - start)
        faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                         - before)
ms = {k: round(1e3 * statistics.median(v), 1) for k, v in times.items()}
print(json.dumps({
    "shapes": set_name, "load": os.getloadavg()[0],
    "env": {k: v for k, v in os.environ.items()
            if k in ("TF_CPU_ALLOCATOR_USE_BFC", "GLIBC_TUNABLES")},
    "ms": ms, "faults_per_step": {k: statistics.median(v)
                                  for k, v in faults.items()},
    "lamb_x_adam": round(ms["keras_lamb.LAMB"] / ms["keras.Adam"], 3),
    "lamb_store_x_adam": round(ms["keras_lamb.LAMB[store]"]
                               / ms["keras.Adam"], 3),
    "lars_x_sgd": round(ms["keras_lamb.LARS"] / ms["keras.SGD-momentum"], 3),
}))
