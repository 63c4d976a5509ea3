"""Times the ways `keras_lamb` can compute a sum of squares, per backend.

The trust ratio needs `||w||` and `||u||` of every variable. What is fastest
differs by compiler: TensorFlow's XLA:CPU emits a reduction to a scalar as a
serial loop but a matrix-vector product as a vectorised kernel, while JAX's
newer XLA:CPU and the GPU compilers emit fast reductions. This script times
`keras_lamb.trust_ratio.sum_of_squares` for each method on one tensor of
BERT-base's word-embedding shape (23 M values), the backend chosen as in
`optimizer_step.py`, and prints one JSON line per measurement.

    python benchmarks/norm_methods.py --backend all
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))



def define_flags():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["tensorflow", "jax", "all"],
                        default="all", help="backend(s), one subprocess each")
    parser.add_argument("--shape", default="30522,768",
                        help="comma-separated shape of the tensor")
    parser.add_argument("--reps", type=int, default=9,
                        help="timed rounds; the median is reported")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def worker(args):
    import numpy as np

    from keras_lamb.trust_ratio import SUM_OF_SQUARES_METHODS as METHODS
    from keras_lamb.trust_ratio import sum_of_squares

    shape = tuple(int(d) for d in args.shape.split(","))
    x = np.random.default_rng(0).standard_normal(shape, dtype="float32")
    expected = float(np.sum(x.astype("float64") ** 2))
    if args.worker == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(x)
        modes = {"xla": True, "no xla": False}
        compiled = {
            (method, mode): tf.function(
                lambda method=method: sum_of_squares(
                    tf.convert_to_tensor(x), method),
                jit_compile=jit)
            for method in METHODS for mode, jit in modes.items()
        }
        run = {key: (lambda f=f: float(f())) for key, f in compiled.items()}
    else:
        import jax

        x = jax.device_put(x)
        run = {(method, "jax.jit"): (lambda f=jax.jit(
            lambda v, method=method: sum_of_squares(v, method)): float(f(x)))
            for method in METHODS}
    for (method, mode), fn in run.items():
        print(json.dumps({
            "backend": args.worker, "mode": mode, "method": method,
            "values": int(np.prod(shape)), "ms": median_ms(fn, args.reps),
            "relative_error": abs(fn() - expected) / expected,
        }), flush=True)


def main():
    args = define_flags()
    if args.worker:
        worker(args)
        return
    backends = ["tensorflow", "jax"] if args.backend == "all" else [
        args.backend]
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend,
                   TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run([sys.executable, os.path.abspath(__file__),
                        "--worker", backend, "--shape", args.shape,
                        "--reps", str(args.reps)], env=env, check=False)


if __name__ == "__main__":
    main()
