r"""Scaled-down LAMB-vs-AdamW batch-size sweep for BERT pre-training on a CPU.

The LAMB paper's claim, shrunk to a laptop: with a fixed number of training
*examples* (epochs), LAMB with square-root learning-rate scaling keeps its
accuracy as the batch grows, where AdamW with the usual scaling rules loses
it; and the control of Nado et al. (2021): does AdamW catch up when its rate
is tuned at every batch size?

    python -m tpu_scripts.bert.sweep_batch_size \
      --text_file=../shared/data/tinyshakespeare/input.txt

What it does (every number is a flag):

1. Splits the text into training and held-out documents (the last
   `--heldout_fraction` of the file), learns a WordPiece vocabulary on the
   training part and makes masked-LM/NSP records with
   `bert_data.create_pretraining_data` (cached in `--work_dir`). The
   training set is cut to `--train_examples` (a multiple of the largest
   batch, so every batch size sees exactly the same examples per epoch); the
   held-out records are split into a validation half (used to pick learning
   rates) and a test half (reported).
2. Trains a tiny BERT (keras-hub `BertBackbone`, `--num_layers` etc.) with
   the shared trainer for `--epochs` epochs at every batch size in
   `--batch_sizes`; batches above `--max_micro_batch` are reached by exact
   gradient accumulation. Schedule for every run: linear warmup over
   `--warmup_ratio` of the updates, then linear decay to 0 at the last
   update; weight decay `--weight_decay`, gradient clipping at global norm 1,
   LayerNorm/bias excluded (as in `keras_lamb.recipes.lamb_bert`).
3. Methods and tuning budget:
   - base tuning at `--base_batch_size`: LAMB and AdamW each try the same
     number of peak rates (`--lamb_grid`, `--adamw_grid`) and keep the best
     on validation MLM accuracy;
   - `lamb_sqrt`: LAMB, rate scaled by sqrt(B / base) (the paper's rule);
   - `adamw_linear`, `adamw_sqrt`: AdamW from its tuned base rate, scaled
     linearly / by the square root;
   - `adamw_tuned`, `lamb_tuned`: the control of Nado et al., each
     optimizer with the best (on validation) of the rates
     `base * (B / base) ** p` for p in `--tuned_exponents` at every batch
     size: the same number of trials per batch size for both (3 by default:
     no scaling, fourth root, square root; the square-root trial is the
     `*_sqrt` run).
   So every method gets the same 3 trials at the base batch; the two tuned
   methods get 3 trials at every other batch size too, the rules none.
4. Writes `runs.csv` (every run), `results.md` / `results.csv` (test MLM
   accuracy per method and batch size), `mlm_accuracy_vs_batch.png`,
   `config.json` and, last, `command.txt` to `--output_dir` (empty: a fresh
   `runs/bert_sweep-<UTC time>/`), once every run has finished. Runs are
   appended to `runs.jsonl` as they finish, so an interrupted sweep resumes
   (give its `--output_dir`). A folder under the repository's `results/`
   (the committed results) is refused unless `--allow_results_dir`.
"""

import csv
import io
import json
import math
import os
import shlex
import sys
import time

if __package__ in (None, ""):  # run as a file: make `tpu_scripts` importable
    sys.path.insert(0, os.path.abspath(
        os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

from absl import app, flags, logging  # noqa: E402

METHODS = ("lamb_sqrt", "lamb_tuned", "adamw_linear", "adamw_sqrt",
           "adamw_tuned")
METHOD_LABELS = {
    "lamb_sqrt": "LAMB, sqrt scaling",
    "lamb_tuned": "LAMB, tuned per batch size",
    "adamw_linear": "AdamW, linear scaling",
    "adamw_sqrt": "AdamW, sqrt scaling",
    "adamw_tuned": "AdamW, tuned per batch size",
}

FLAG_NAMES = set()


def define_flags(flag_values=None):
    flag_values = flags.FLAGS if flag_values is None else flag_values
    before = set(flag_values)
    f = dict(flag_values=flag_values)
    flags.DEFINE_string("text_file", None, "Plain-text corpus (blank lines "
                        "separate documents).", **f)
    flags.DEFINE_string("work_dir", "/tmp/bert_sweep_data", "Cache of the "
                        "generated records (not committed).", **f)
    flags.DEFINE_string("output_dir", "", "Where the tables, plot and "
                        "logs go (empty: a fresh runs/bert_sweep-<UTC "
                        "time>; the same folder again resumes a sweep).",
                        **f)
    flags.DEFINE_boolean("allow_results_dir", False, "Allow an "
                         "--output_dir under the repository's results/ (the "
                         "committed results; only to regenerate them).",
                         **f)
    flags.DEFINE_list("batch_sizes", ["32", "256", "1024", "4096"],
                      "Global batch sizes (sequences per update).", **f)
    flags.DEFINE_integer("base_batch_size", 32, "Batch size at which the "
                         "base learning rates are tuned.", **f)
    flags.DEFINE_float("epochs", 8.0, "Epochs over --train_examples for "
                       "every run (the fixed example budget).", **f)
    flags.DEFINE_integer("train_examples", 8192, "Training sequences (a "
                         "multiple of the largest batch).", **f)
    flags.DEFINE_integer("heldout_examples", 2048, "Held-out sequences "
                         "(half validation, half test).", **f)
    flags.DEFINE_float("heldout_fraction", 0.1, "Fraction of the text's "
                       "lines (at its end) held out.", **f)
    flags.DEFINE_integer("vocab_size", 1024, "WordPiece vocabulary size.",
                         **f)
    flags.DEFINE_integer("max_seq_length", 32, "Sequence length.", **f)
    flags.DEFINE_integer("max_predictions_per_seq", 5, "Masked positions.",
                         **f)
    flags.DEFINE_integer("dupe_factor", 2, "Maskings of the text.", **f)
    flags.DEFINE_integer("num_layers", 2, "Transformer layers.", **f)
    flags.DEFINE_integer("hidden_dim", 32, "Hidden size.", **f)
    flags.DEFINE_integer("num_heads", 2, "Attention heads.", **f)
    flags.DEFINE_integer("intermediate_dim", 128, "Feed-forward size.", **f)
    flags.DEFINE_float("dropout", 0.1, "Dropout.", **f)
    flags.DEFINE_integer("max_micro_batch", 1024, "Largest batch run in one "
                         "step; larger batches accumulate gradients.", **f)
    flags.DEFINE_list("lamb_grid", ["1e-2", "3e-2", "1e-1"], "LAMB base "
                      "rates tried at --base_batch_size.", **f)
    flags.DEFINE_list("adamw_grid", ["1e-3", "3e-3", "1e-2"], "AdamW base "
                      "rates tried at --base_batch_size.", **f)
    flags.DEFINE_list("tuned_exponents", ["0", "0.25", "0.5"], "The tuned "
                      "methods try base * (B / base) ** p for these p at "
                      "every batch size B.", **f)
    flags.DEFINE_float("warmup_ratio", 0.1, "Warmup fraction of updates.",
                       **f)
    flags.DEFINE_float("weight_decay", 0.01, "Weight decay (LAMB, AdamW).",
                       **f)
    flags.DEFINE_integer("steps_per_loop", 64, "Updates per compiled loop.",
                         **f)
    flags.DEFINE_integer("seed", 0, "Seed of data, weights, order.", **f)
    flags.DEFINE_string("corpus_name", None, "Name of the corpus in the "
                        "plot title (default: the file name).", **f)
    FLAG_NAMES.update(set(flag_values) - before)


# ----------------------------------------------------------------------------
# Data


def split_text(text_file, work_dir, heldout_fraction):
    """Writes `train.txt` and `heldout.txt` (split at a blank line); any
    `tf.io.gfile` paths (`gs://` included)."""
    import tensorflow as tf

    from tpu_scripts import run_state

    with tf.io.gfile.GFile(text_file, "rb") as f:
        lines = f.read().decode("utf-8").splitlines()
    cut = int(len(lines) * (1 - heldout_fraction))
    while cut < len(lines) and lines[cut].strip():
        cut += 1
    paths = {}
    for name, part in (("train", lines[:cut]), ("heldout", lines[cut:])):
        paths[name] = os.path.join(work_dir, f"{name}.txt")
        run_state.write_text(paths[name], "\n".join(part) + "\n")
    return paths


def prepare_data(cfg, log=print):
    """`(train, validation, test)` feature dicts and the data settings."""
    import numpy as np

    from tpu_scripts import run_state
    from tpu_scripts.bert import data as bert_data

    settings = dict(
        text_file=_absolute(cfg.text_file),
        heldout_fraction=cfg.heldout_fraction, vocab_size=cfg.vocab_size,
        max_seq_length=cfg.max_seq_length,
        max_predictions_per_seq=cfg.max_predictions_per_seq,
        dupe_factor=cfg.dupe_factor, seed=cfg.seed,
    )
    stamp = os.path.join(cfg.work_dir, "settings.json")
    cached = run_state.read_json(stamp) == settings
    if not cached:
        paths = split_text(cfg.text_file, cfg.work_dir, cfg.heldout_fraction)
        common = dict(
            max_seq_length=cfg.max_seq_length,
            max_predictions_per_seq=cfg.max_predictions_per_seq,
            dupe_factor=cfg.dupe_factor, overwrite=True, log=log,
        )
        bert_data.create_pretraining_data(
            paths["train"], os.path.join(cfg.work_dir, "train"),
            vocabulary_size=cfg.vocab_size, random_seed=cfg.seed, **common,
        )
        bert_data.create_pretraining_data(
            paths["heldout"], os.path.join(cfg.work_dir, "heldout"),
            vocab_file=os.path.join(cfg.work_dir, "train", "vocab.txt"),
            random_seed=cfg.seed + 1, **common,
        )
        run_state.write_json(stamp, settings)

    def load(name):
        return bert_data.load_records(
            os.path.join(cfg.work_dir, name, "*.tfrecord"),
            cfg.max_seq_length, cfg.max_predictions_per_seq,
        )

    def take(features, start, stop):
        return {k: v[start:stop] for k, v in features.items()}

    train, heldout = load("train"), load("heldout")
    if len(train["input_ids"]) < cfg.train_examples:
        raise ValueError(
            f"{cfg.text_file} gives {len(train['input_ids'])} training "
            f"sequences, fewer than --train_examples={cfg.train_examples}."
        )
    half = min(cfg.heldout_examples, len(heldout["input_ids"])) // 2
    vocabulary = bert_data.load_vocabulary(
        os.path.join(cfg.work_dir, "train", "vocab.txt")
    )
    data = dict(
        train=take(train, 0, cfg.train_examples),
        validation=take(heldout, 0, half),
        test=take(heldout, half, 2 * half),
    )
    # Baseline: always predict the most frequent masked token of training.
    train = data["train"]
    ids = train["masked_lm_ids"][train["masked_lm_weights"] > 0]
    top = np.bincount(ids).argmax()
    test = data["test"]
    mask = test["masked_lm_weights"] > 0
    settings.update(
        vocabulary_size=len(vocabulary),
        train_examples=cfg.train_examples, validation_examples=half,
        test_examples=half,
        unigram_baseline_token=vocabulary[top],
        unigram_baseline_test_accuracy=float(
            np.mean(test["masked_lm_ids"][mask] == top)
        ),
    )
    return data, settings


# ----------------------------------------------------------------------------
# One run


def train_once(cfg, data, optimizer, learning_rate, batch_size, log=print):
    """Trains one model; returns its validation/test metrics and timing."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tpu_scripts import trainer
    from tpu_scripts.bert import (data as bert_data, models as bert_models,
                                  pretrain as bert_pretrain)

    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    micro = min(batch_size, cfg.max_micro_batch)
    k = batch_size // micro
    updates = int(round(cfg.epochs * cfg.train_examples / batch_size))
    plan = dict(
        optimizer=optimizer, learning_rate=learning_rate,
        train_steps=updates,
        warmup_steps=max(1, round(cfg.warmup_ratio * updates)),
        decay_power=1.0, end_learning_rate=0.0,
        weight_decay=cfg.weight_decay, beta_1=0.9, beta_2=0.999,
        epsilon=1e-6, clipnorm=1.0, gradient_accumulation_steps=k,
    )
    config = bert_models.BertConfig(
        num_layers=cfg.num_layers, hidden_dim=cfg.hidden_dim,
        num_heads=cfg.num_heads, intermediate_dim=cfg.intermediate_dim,
        vocabulary_size=int(data["vocabulary_size"]),
        max_sequence_length=cfg.max_seq_length, dropout=cfg.dropout,
    )
    loop = trainer.Trainer(
        tf.distribute.get_strategy(),
        bert_pretrain.BertPretrainingTask(
            lambda: bert_models.BertPretrainer(
                bert_models.build_backbone(config)
            )
        ),
        lambda: bert_pretrain.make_training_optimizer(plan),
        batch_size, steps_per_loop=max(1, cfg.steps_per_loop // k),
        log=lambda *a, **kw: None, gradient_accumulation_steps=k,
        unit="sequences",
    )
    start = time.time()
    outcome = loop.train(
        bert_data.ArrayInput(data["train"], batch_size, training=True,
                             seed=cfg.seed),
        updates,
    )
    results = dict(
        optimizer=optimizer, learning_rate=learning_rate,
        batch_size=batch_size, micro_batch_size=micro,
        accumulation_steps=k, updates=updates,
        train_loss=outcome["train"]["loss"],
        train_mlm_accuracy=outcome["train"]["mlm_accuracy"],
        train_seconds=outcome["train_seconds"],
    )
    for split in ("validation", "test"):
        metrics = loop.evaluate(
            bert_data.ArrayInput(data[split], min(micro, 512),
                                 training=False)
        )
        results[f"{split}_mlm_accuracy"] = metrics["mlm_accuracy"]
        results[f"{split}_loss"] = metrics["loss"]
    results["diverged"] = not all(
        np.isfinite(results[key]) for key in ("train_loss", "test_loss")
    )
    results["wall_seconds"] = time.time() - start
    log(f"{optimizer} lr={learning_rate:.4g} B={batch_size} ({updates} "
        f"updates, {k}x{micro}): val MLM acc "
        f"{results['validation_mlm_accuracy']:.4f}, test "
        f"{results['test_mlm_accuracy']:.4f}, loss "
        f"{results['test_loss']:.3f}, {results['wall_seconds']:.0f} s",
        flush=True)
    return results


# ----------------------------------------------------------------------------
# The sweep


def _score(run):
    value = run["validation_mlm_accuracy"]
    return -1.0 if run["diverged"] or not math.isfinite(value) else value


# Every flag that changes one run's result besides its optimizer, rate and
# batch size: finished runs are reused only when all of them match.
SETTING_FLAGS = (
    "text_file", "heldout_fraction", "vocab_size", "max_seq_length",
    "max_predictions_per_seq", "dupe_factor", "train_examples",
    "heldout_examples", "epochs", "num_layers", "hidden_dim", "num_heads",
    "intermediate_dim", "dropout", "max_micro_batch", "warmup_ratio",
    "weight_decay", "seed",
)


def _absolute(path):
    return path if "://" in path else os.path.abspath(path)


def run_settings(cfg):
    """`{flag: value}` of `SETTING_FLAGS`."""
    settings = {name: getattr(cfg, name) for name in SETTING_FLAGS}
    settings["text_file"] = _absolute(cfg.text_file)
    return settings


class RunLog:
    """Runs keyed by (settings, optimizer, rate, batch), persisted to
    runs.jsonl (rewritten atomically after every run; any `tf.io.gfile`
    path). Runs made with other settings stay in the file but are never
    reused."""

    def __init__(self, path, settings):
        import tensorflow as tf

        self.path = path
        self.settings = json.loads(json.dumps(settings))
        self.all_runs = []
        self.runs = {}
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                self.all_runs = [json.loads(line) for line in f if line.strip()]
        for run in self.all_runs:
            if run.get("settings") == self.settings:
                self.runs[self.key(run["optimizer"], run["learning_rate"],
                                   run["batch_size"])] = run

    @staticmethod
    def key(optimizer, learning_rate, batch_size):
        return (optimizer, f"{learning_rate:.6g}", int(batch_size))

    def get_or_run(self, cfg, data, optimizer, learning_rate, batch_size,
                   log):
        from tpu_scripts import run_state

        key = self.key(optimizer, learning_rate, batch_size)
        if key not in self.runs:
            run = train_once(cfg, data, optimizer, learning_rate, batch_size,
                             log)
            run["settings"] = self.settings
            self.runs[key] = run
            self.all_runs.append(run)
            run_state.write_text(self.path, "".join(
                json.dumps(r) + "\n" for r in self.all_runs))
        return self.runs[key]


def sweep(cfg, data, run_log, log=print):
    """Runs the methods of the module doc; returns `{method: {B: run}}`."""
    from keras_lamb.recipes import scale_learning_rate

    base = cfg.base_batch_size
    batch_sizes = sorted(int(b) for b in cfg.batch_sizes)
    grids = {"lamb": [float(x) for x in cfg.lamb_grid],
             "adamw": [float(x) for x in cfg.adamw_grid]}
    best_base = {}
    for optimizer, grid in grids.items():
        runs = [run_log.get_or_run(cfg, data, optimizer, lr, base, log)
                for lr in grid]
        best_base[optimizer] = max(runs, key=_score)["learning_rate"]
        log(f"Base rate of {optimizer} at B={base}: "
            f"{best_base[optimizer]:.4g}")
    table = {method: {} for method in METHODS}
    for batch in batch_sizes:
        def scaled(optimizer, rule):
            return scale_learning_rate(best_base[optimizer], base, batch,
                                       rule=rule)

        table["lamb_sqrt"][batch] = run_log.get_or_run(
            cfg, data, "lamb", scaled("lamb", "sqrt"), batch, log)
        table["adamw_linear"][batch] = run_log.get_or_run(
            cfg, data, "adamw", scaled("adamw", "linear"), batch, log)
        table["adamw_sqrt"][batch] = run_log.get_or_run(
            cfg, data, "adamw", scaled("adamw", "sqrt"), batch, log)
        for optimizer in ("lamb", "adamw"):
            trials = [
                run_log.get_or_run(
                    cfg, data, optimizer,
                    best_base[optimizer] * (batch / base) ** float(p), batch,
                    log)
                for p in cfg.tuned_exponents
            ] if batch != base else [
                run_log.get_or_run(cfg, data, optimizer, lr, base, log)
                for lr in grids[optimizer]
            ]
            table[f"{optimizer}_tuned"][batch] = max(trials, key=_score)
    return table, best_base


# ----------------------------------------------------------------------------
# Outputs


def write_outputs(cfg, table, best_base, settings, run_log, seconds,
                  argv):
    from tpu_scripts import run_state

    out = cfg.output_dir
    batch_sizes = sorted(int(b) for b in cfg.batch_sizes)
    fields = ["optimizer", "learning_rate", "batch_size", "micro_batch_size",
              "accumulation_steps", "updates", "train_loss",
              "train_mlm_accuracy", "validation_mlm_accuracy",
              "validation_loss", "test_mlm_accuracy", "test_loss",
              "diverged", "train_seconds", "wall_seconds"]
    runs = sorted(run_log.runs.values(),
                  key=lambda r: (r["optimizer"], r["batch_size"],
                                 r["learning_rate"]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(runs)
    run_state.write_text(os.path.join(out, "runs.csv"), text.getvalue())
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["method", "batch_size", "updates", "learning_rate",
                     "test_mlm_accuracy", "test_loss", "diverged"])
    for method in METHODS:
        for batch in batch_sizes:
            run = table[method][batch]
            writer.writerow([
                method, batch, run["updates"],
                f"{run['learning_rate']:.6g}",
                f"{run['test_mlm_accuracy']:.4f}",
                f"{run['test_loss']:.4f}", run["diverged"],
            ])
    run_state.write_text(os.path.join(out, "results.csv"), text.getvalue())
    lines = [
        "Test MLM accuracy (held-out masked tokens) after "
        f"{cfg.epochs:g} epochs of {cfg.train_examples} sequences; peak "
        "learning rate in brackets; `*` = diverged (non-finite loss).",
        "",
        "Settings of every run shown: " + ", ".join(
            f"{k}={v}" for k, v in sorted(run_log.settings.items())) + ".",
        "",
        "| method | " + " | ".join(f"B={b}" for b in batch_sizes) + " |",
        "|---|" + "---|" * len(batch_sizes),
    ]
    for method in METHODS:
        cells = []
        for batch in batch_sizes:
            run = table[method][batch]
            mark = "*" if run["diverged"] else ""
            cells.append(f"{run['test_mlm_accuracy']:.4f}{mark} "
                         f"({run['learning_rate']:.3g})")
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells)
                     + " |")
    lines += [
        "| updates per run | " + " | ".join(
            str(table["lamb_sqrt"][b]["updates"]) for b in batch_sizes
        ) + " |",
        "",
        f"Unigram baseline (always `{settings['unigram_baseline_token']}`):"
        f" {settings['unigram_baseline_test_accuracy']:.4f}. Tuned base "
        f"rates at B={cfg.base_batch_size}: LAMB {best_base['lamb']:.3g}, "
        f"AdamW {best_base['adamw']:.3g}. {len(run_log.runs)} runs "
        f"(`runs.csv`), {run_minutes(run_log):.1f} min of training and "
        "evaluation in all; this invocation took "
        f"{seconds / 60:.1f} min.",
    ]
    run_state.write_text(os.path.join(out, "results.md"),
                         "\n".join(lines) + "\n")
    plot(cfg, table, settings, os.path.join(out, "mlm_accuracy_vs_batch.png"))
    config = {n: getattr(cfg, n) for n in sorted(FLAG_NAMES)}
    run_state.write_json(os.path.join(out, "config.json"), dict(
        flags=config, data=settings, run_settings=run_log.settings,
        base_learning_rates=best_base, run_minutes=run_minutes(run_log),
        invocation_minutes=seconds / 60))
    run_state.write_text(os.path.join(out, "command.txt"),
                         " ".join(shlex.quote(a) for a in argv) + "\n")
    return "\n".join(lines)


def run_minutes(run_log):
    return sum(r["wall_seconds"] for r in run_log.runs.values()) / 60


def plot(cfg, table, settings, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = sorted(int(b) for b in cfg.batch_sizes)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = {"lamb_sqrt": ("C3", "o", "--"), "lamb_tuned": ("C3", "D", "-"),
              "adamw_linear": ("C0", "s", ":"),
              "adamw_sqrt": ("C0", "^", "--"),
              "adamw_tuned": ("C0", "D", "-")}
    for i, method in enumerate(METHODS):
        color, marker, line = styles[method]
        values = [table[method][b]["test_mlm_accuracy"] for b in batch_sizes]
        # Equal results would hide each other: offset the methods slightly.
        shift = 2 ** (0.06 * (i - (len(METHODS) - 1) / 2))
        ax.plot([b * shift for b in batch_sizes], values, color=color,
                marker=marker, linestyle=line, label=METHOD_LABELS[method],
                alpha=0.9)
    ax.axhline(settings["unigram_baseline_test_accuracy"], color="grey",
               linewidth=0.8, linestyle="-.",
               label=f"always '{settings['unigram_baseline_token']}'")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes)
    ax.set_xticklabels([str(b) for b in batch_sizes])
    ax.set_xlabel("global batch size (sequences per update; methods "
                  "offset slightly)")
    ax.set_ylabel("held-out masked-LM accuracy")
    ax.set_title(
        f"Tiny BERT ({cfg.num_layers} layers x {cfg.hidden_dim}) on "
        f"{cfg.corpus_name or os.path.basename(cfg.text_file)}: "
        f"{cfg.epochs:g} epochs of {cfg.train_examples} sequences "
        f"of {cfg.max_seq_length} tokens", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from tpu_scripts import run_state

    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    run_state.write_text(path, image.getvalue(), mode="wb")


def validate_flags(cfg):
    """Raises `run_state.FlagError` naming the flag for a bad value."""
    from tpu_scripts import run_state

    def check(name, ok, requirement):
        if not ok:
            raise run_state.FlagError(
                f"--{name} must be {requirement}. Received: "
                f"{getattr(cfg, name)!r}.")

    def positive(values, kind):
        try:
            return bool(values) and all(
                0 < kind(v) < math.inf for v in values)
        except ValueError:
            return False

    for name in ("epochs", "heldout_fraction", "warmup_ratio",
                 "weight_decay", "dropout"):
        check(name, math.isfinite(getattr(cfg, name)), "a finite number")

    check("text_file", bool(cfg.text_file), "given")
    check("batch_sizes", positive(cfg.batch_sizes, int), "positive integers")
    for name in ("lamb_grid", "adamw_grid"):
        check(name, positive(getattr(cfg, name), float), "positive numbers")
    try:
        exponents = [float(p) for p in cfg.tuned_exponents]
    except ValueError:
        exponents = []
    check("tuned_exponents", bool(exponents) and all(
        math.isfinite(p) for p in exponents), "finite numbers")
    for name in ("base_batch_size", "train_examples", "heldout_examples",
                 "vocab_size", "max_predictions_per_seq", "dupe_factor",
                 "num_layers", "hidden_dim", "num_heads", "intermediate_dim",
                 "max_micro_batch", "steps_per_loop"):
        check(name, getattr(cfg, name) >= 1, ">= 1")
    check("max_seq_length", cfg.max_seq_length >= 5, ">= 5")
    check("epochs", cfg.epochs > 0, "positive")
    for name in ("heldout_fraction", "warmup_ratio", "dropout"):
        check(name, 0 <= getattr(cfg, name) < 1, "in [0, 1)")
    check("weight_decay", cfg.weight_decay >= 0, ">= 0")
    largest = max(int(b) for b in cfg.batch_sizes)
    if cfg.train_examples % largest:
        raise run_state.FlagError(
            f"--train_examples={cfg.train_examples} must be a multiple of "
            f"the largest batch size {largest}."
        )


def run(cfg, argv=(), log=print):
    from tpu_scripts.resnet.sweep_batch_size import sweep_output_dir

    start = time.time()
    validate_flags(cfg)
    # Resolved once (a fresh folder by default); the outputs go there.
    cfg.output_dir = sweep_output_dir(cfg.output_dir, "bert_sweep",
                                      cfg.allow_results_dir)
    log(f"Output: {cfg.output_dir}/")
    data, settings = prepare_data(cfg, log)
    data["vocabulary_size"] = settings["vocabulary_size"]
    log(f"Data: {json.dumps(settings)}")
    run_log = RunLog(os.path.join(cfg.output_dir, "runs.jsonl"),
                     run_settings(cfg))
    table, best_base = sweep(cfg, data, run_log, log)
    seconds = time.time() - start
    summary = write_outputs(cfg, table, best_base, settings, run_log,
                            seconds, argv)
    log(summary)
    return table


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from tpu_scripts import run_state

    run_state.exit_on_flag_error(
        run, flags.FLAGS,
        argv=["python", "-m", "tpu_scripts.bert.sweep_batch_size",
              *sys.argv[1:]],
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
