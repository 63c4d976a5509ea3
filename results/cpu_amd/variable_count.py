"""LAMB/Adam and LARS/SGD-momentum on one large variable or many medium ones:
`python variable_count.py 3072,768 1 21`, `python variable_count.py 768,768 40 11`
(shape, variable count, rounds); TF, XLA on, interleaved rounds (issue 15)."""
import os, sys, time, statistics, json
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, keras, tensorflow as tf, keras_lamb
shape = tuple(int(d) for d in sys.argv[1].split(","))
n_vars = int(sys.argv[2])
rng = np.random.default_rng(0)
vs = [keras.Variable(rng.standard_normal(shape).astype("float32"), name=f"kernel{i}") for i in range(n_vars)]
gs = [tf.constant(1e-3 * rng.standard_normal(shape).astype("float32")) for _ in vs]
makers = {"lamb": lambda: keras_lamb.LAMB(weight_decay=0.01), "adam": lambda: keras.optimizers.Adam(),
          "lars": lambda: keras_lamb.LARS(), "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9)}
fns = {}
for k, m in makers.items():
    opt = m(); opt.build(vs)
    fns[k] = tf.function(lambda opt=opt: opt.apply(gs, vs) or opt.iterations, jit_compile=True)
    fns[k]()
t = {k: [] for k in fns}
for _ in range(int(sys.argv[3])):
    for k, f in fns.items():
        s = time.perf_counter(); f().numpy(); t[k].append(time.perf_counter() - s)
ms = {k: 1e3 * statistics.median(v) for k, v in t.items()}
print(json.dumps({"shape": shape, "n_vars": n_vars, "load": os.getloadavg(), "ms": ms,
  "lamb/adam": ms["lamb"] / ms["adam"], "lars/sgd": ms["lars"] / ms["sgd"]}))
