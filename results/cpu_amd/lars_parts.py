"""Where LARS's time goes, TF with XLA (issue 15): SGD-momentum, LARS,
LARS with no variable adapted (no norms, same weight decay), and the two
norm passes alone (sums of squares of every w and g by `matvec`),
interleaved: `python lars_parts.py bert-base 10`. One JSON line."""
import json
import os
import sys

from common import compiled_step, median_ms

import tensorflow as tf  # noqa: E402
import keras_lamb  # noqa: E402
import optimizer_step as ob  # noqa: E402
from keras_lamb.trust_ratio import sum_of_squares  # noqa: E402
from shapes import shape_set  # noqa: E402

set_name, reps = sys.argv[1], int(sys.argv[2])
shapes, n = shape_set(set_name)
variables = ob.make_keras_variables(shapes, ob.random_values(shapes, 0))
grads = [tf.constant(g) for g in ob.random_values(shapes, 1)]


def norms(g):
    return tf.add_n([
        sum_of_squares(tf.convert_to_tensor(v.value), "matvec")
        + sum_of_squares(x, "matvec") for v, x in zip(variables, g)])


fns = {
    "sgd_momentum": compiled_step(
        ob.make_keras_optimizer("keras.SGD-momentum", set_name), variables),
    "lars": compiled_step(
        ob.make_keras_optimizer("keras_lamb.LARS", set_name), variables),
    "lars_no_norms": compiled_step(keras_lamb.LARS(
        0.1, momentum=0.9, weight_decay=1e-4,
        exclude_from_weight_decay=ob.EXCLUDE[set_name],
        exclude_from_layer_adaptation=".*"), variables),
    "norms_of_w_and_g": tf.function(norms, jit_compile=True),
}
ms = {k: round(v, 1) for k, v in median_ms(fns, grads, reps).items()}
sgd = ms["sgd_momentum"]
print(json.dumps({
    "shapes": set_name, "load": os.getloadavg()[0], "ms": ms,
    "x_sgd_momentum": {k: round(v / sgd, 3) for k, v in ms.items()},
    "norm_read_gb_per_s": round(8 * n / ms["norms_of_w_and_g"] / 1e6, 1),
}))
