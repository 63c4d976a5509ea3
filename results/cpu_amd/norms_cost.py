"""LAMB with and without its norms, and with other norm forms, against Keras
Adam: `python norms_cost.py 768,768 40 9` (shape, variable count, rounds);
TF, XLA on, interleaved rounds (issue 15). Run before issue 15's fix, when
LAMB stored its update: add `_recompute_update=False` to `lamb(...)` to
measure that form again."""
import json
import os
import sys

from common import compiled_step, median_ms, same_shape_variables

import keras  # noqa: E402
import keras_lamb  # noqa: E402

shape = tuple(int(d) for d in sys.argv[1].split(","))
n_vars = int(sys.argv[2])
vs, gs = same_shape_variables(shape, n_vars)


def lamb(exclude=None, **attrs):
    def make():
        o = keras_lamb.LAMB(weight_decay=0.01,
                            exclude_from_layer_adaptation=exclude)
        for k, v in attrs.items():
            setattr(o, k, v)
        return o
    return make


makers = {"adam": keras.optimizers.Adam, "lamb": lamb(),
          "lamb_noadapt": lamb(exclude="kernel"),
          "lamb_joint": lamb(_joint_norms=True),
          "lamb_rows": lamb(_norm_method="rows")}
ms = median_ms({k: compiled_step(m(), vs) for k, m in makers.items()}, gs,
               int(sys.argv[3]))
print(json.dumps({"shape": shape, "n_vars": n_vars, "load": os.getloadavg(),
                  "ms": ms, "x_adam": {k: v / ms["adam"]
                                       for k, v in ms.items()}}))
