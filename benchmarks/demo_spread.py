r"""The demo's numbers over several seeds: the spread to publish instead of
one run's digits.

    python benchmarks/demo_spread.py --seeds=0,1,2,3,4 --output=results/demo_spread.md

runs `python -m tpu_scripts.demo` once per seed (the seed picks the
train/test split, the initial weights and the batch order) and writes a
Markdown table: for each optimizer, the test accuracy at the small batch, at
the full batch with the kept rate, and at every full-batch rate multiplier,
as min / median / max over the seeds, with the machine, versions and time.
A rerun on the same machine and versions prints the same numbers (op
determinism); on another CPU the float sums run in another order, so the
digits differ within about the spread.
"""

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.report import cpu_name  # noqa: E402
from tpu_scripts import demo  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds of the demo.")
flags.DEFINE_string("output", "", "Markdown file to write (empty: print "
                    "only).")
flags.DEFINE_list("demo_flags", [], "Extra demo flags, e.g. "
                  "--demo_flags=--epochs=1 (for a quick check).")


def spread(values):
    values = 100 * np.asarray(values)
    return (f"{values.min():.1f} / {np.median(values):.1f} / "
            f"{values.max():.1f}")


def table(runs, seeds):
    """Markdown rows from `runs`: `{seed: (results, tried)}`."""
    names = list(dict.fromkeys(r["optimizer"] for r in runs[seeds[0]][0]))
    multipliers = [r["multiplier"] for r in runs[seeds[0]][1][names[0]]]
    head = ("| optimizer | small batch | full batch, kept rate | "
            + " | ".join(f"full batch, rule x {m:g}" for m in multipliers)
            + " |")
    rows = [head, "|---|" + "---:|" * (2 + len(multipliers))]
    for name in names:
        small = [next(r for r in runs[s][0] if r["optimizer"] == name
                      and r["batch_size"] == min(
                          x["batch_size"] for x in runs[s][0]))
                 ["test_accuracy"] for s in seeds]
        kept = [next(r for r in runs[s][0] if r["optimizer"] == name
                     and r["batch_size"] == max(
                         x["batch_size"] for x in runs[s][0]))
                ["test_accuracy"] for s in seeds]
        grid = [spread([runs[s][1][name][i]["test_accuracy"] for s in seeds])
                for i in range(len(multipliers))]
        rows.append(f"| {name} | {spread(small)} | {spread(kept)} | "
                    + " | ".join(grid) + " |")
    return "\n".join(rows)


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    seeds = [int(s) for s in FLAGS.seeds]
    runs, seconds = {}, []
    for seed in seeds:
        values = flags.FlagValues()
        demo.define_flags(values)
        values(["demo", f"--seed={seed}", "--plot="] + list(FLAGS.demo_flags))
        start = time.time()
        runs[seed] = demo.run_with_grid(values, log=lambda *a: None)
        seconds.append(time.time() - start)
        print(f"seed {seed}: {seconds[-1]:.0f} s", flush=True)
    text = "\n".join([
        "# The demo over several seeds",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()} "
        f"({os.cpu_count()} CPUs, {platform.system()}), TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}; "
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), one demo each "
        f"({min(seconds):.0f}-{max(seconds):.0f} s per demo).",
        "",
        "Command: `python benchmarks/demo_spread.py "
        f"--seeds={','.join(map(str, seeds))}"
        + (f" --demo_flags={','.join(FLAGS.demo_flags)}"
           if FLAGS.demo_flags else "") + "`.",
        "",
        "Test accuracy in %, min / median / max over the seeds (360 test "
        "images: one image is 0.28 %):",
        "",
        table(runs, seeds),
        "",
    ])
    print(text)
    if FLAGS.output:
        from tpu_scripts.run_state import write_text

        write_text(FLAGS.output, text)


if __name__ == "__main__":
    app.run(main)
