"""LAMB/Adam and LARS/SGD-momentum on one large variable or many medium ones:
`python variable_count.py 3072,768 1 21`, `python variable_count.py 768,768 40 11`
(shape, variable count, rounds); TF, XLA on, interleaved rounds (issue 15)."""
import json
import os
import sys

from common import compiled_step, median_ms, same_shape_variables

import keras  # noqa: E402
import keras_lamb  # noqa: E402

shape = tuple(int(d) for d in sys.argv[1].split(","))
n_vars = int(sys.argv[2])
vs, gs = same_shape_variables(shape, n_vars)
makers = {"lamb": lambda: keras_lamb.LAMB(weight_decay=0.01),
          "adam": lambda: keras.optimizers.Adam(),
          "lars": lambda: keras_lamb.LARS(),
          "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9)}
ms = median_ms({k: compiled_step(m(), vs) for k, m in makers.items()}, gs,
               int(sys.argv[3]))
print(json.dumps({"shape": shape, "n_vars": n_vars, "load": os.getloadavg(),
                  "ms": ms, "lamb/adam": ms["lamb"] / ms["adam"],
                  "lars/sgd": ms["lars"] / ms["sgd"]}))
