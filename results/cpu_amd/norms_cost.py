"""LAMB with and without its norms, and with other norm forms, against Keras
Adam: `python norms_cost.py 768,768 40 9` (shape, variable count, rounds);
TF, XLA on, interleaved rounds (issue 15)."""
import os, sys, time, statistics, json
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, keras, tensorflow as tf, keras_lamb
shape = tuple(int(d) for d in sys.argv[1].split(","))
n_vars = int(sys.argv[2])
rng = np.random.default_rng(0)
vs = [keras.Variable(rng.standard_normal(shape).astype("float32"), name=f"kernel{i}") for i in range(n_vars)]
gs = [tf.constant(1e-3 * rng.standard_normal(shape).astype("float32")) for _ in vs]
def lamb(**attrs):
    def make():
        o = keras_lamb.LAMB(weight_decay=0.01, exclude_from_layer_adaptation=attrs.pop("exclude", None))
        for k, v in attrs.items(): setattr(o, k, v)
        return o
    return make
makers = {"adam": lambda: keras.optimizers.Adam(), "lamb": lamb(), "lamb_noadapt": lamb(exclude="kernel"),
          "lamb_joint": lamb(_joint_norms=True), "lamb_rows": lamb(_norm_method="rows")}
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
  "x_adam": {k: v / ms["adam"] for k, v in ms.items()}}))
