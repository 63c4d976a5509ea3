"""Interleaved timing of sum-of-squares forms under TF XLA:CPU (issue 15):
`python norm_forms.py 3072,768 15`, `python norm_forms.py 30522,768 9`
(shape, rounds)."""
import json, os, statistics, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf

shape = tuple(int(d) for d in sys.argv[1].split(","))
reps = int(sys.argv[2])
x = tf.Variable(np.random.default_rng(0).standard_normal(shape, dtype="float32"))
n = int(np.prod(shape))
cols = 768 if n % 768 == 0 else shape[-1]
rows = n // cols
ones = tf.ones((cols,))
forms = {
    "reduce": lambda v: tf.reduce_sum(tf.square(v)),
    "matvec": lambda v: tf.reduce_sum(tf.linalg.matvec(tf.reshape(tf.square(v), (rows, cols)), ones)),
    "rows": lambda v: tf.reduce_sum(tf.reduce_sum(tf.reshape(tf.square(v), (rows, cols)), -1)),
    "cols": lambda v: tf.reduce_sum(tf.reduce_sum(tf.reshape(tf.square(v), (rows, cols)), 0)),
    "dot": lambda v: tf.tensordot(tf.reshape(v, (-1,)), tf.reshape(v, (-1,)), 1),
    "rowdot": lambda v: tf.reduce_sum(tf.einsum("ij,ij->i", tf.reshape(v, (rows, cols)), tf.reshape(v, (rows, cols)))),
    "copy": lambda v: v + 1.0,
}
fns = {k: tf.function(lambda f=f: f(tf.convert_to_tensor(x)), jit_compile=True) for k, f in forms.items()}
expected = float(np.sum(x.numpy().astype("float64") ** 2))
errors = {}
for k, f in fns.items():
    r = f().numpy()
    if k != "copy":
        errors[k] = abs(float(r) - expected) / expected
times = {k: [] for k in fns}
for _ in range(reps):
    for k, f in fns.items():
        s = time.perf_counter(); f().numpy(); times[k].append(time.perf_counter() - s)
med = {k: 1e3 * statistics.median(t) for k, t in times.items()}
print(json.dumps({"shape": shape, "load": os.getloadavg(), "ms": med,
                  "rel_error": errors, "x_matvec": {k: v / med["matvec"] for k, v in med.items()}}))
