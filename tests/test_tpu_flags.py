"""Flags and strategy plumbing of tpu_scripts: clear errors, full --help."""

import os
import re
import subprocess
import sys
import types

import pytest

pytest.importorskip("tensorflow")
flags = pytest.importorskip("absl.flags")

from tpu_scripts import distribute  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def resnet_train():
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        pytest.skip("the scripts run on the TensorFlow backend")
    from tpu_scripts.resnet import train as resnet_train

    return resnet_train


def parse(module, argv):
    values = flags.FlagValues()
    module.define_flags(values)
    values(["script"] + argv)
    return values


@pytest.mark.parametrize("flag, value, choices", [
    ("strategy", "horovod", "tpu|mirrored|multi_worker_mirrored"),
    ("optimizer", "sgd", "lars|lamb|momentum|nesterov|adamw"),
    ("recipe", "bert", "none|mlperf|goyal|lamb_paper"),
    ("mixed_precision", "int8", "none|bfloat16|float16"),
])
def test_unknown_choice_is_a_clear_error(resnet_train, flag, value,
                                         choices):
    with pytest.raises(flags.IllegalFlagValueError,
                       match=f"--{flag}={value}.*{re.escape(choices)}"):
        parse(resnet_train, [f"--{flag}={value}"])


def test_strategy_and_batch_errors():
    with pytest.raises(ValueError, match=r"Unknown --strategy='gpu'; "
                       "expected one of: tpu, mirrored"):
        distribute.get_strategy("gpu")
    with pytest.raises(ValueError, match="--global_batch_size=10 is not "
                       "divisible by the 4 replicas"):
        distribute.per_replica_batch_size(10, 4)
    assert distribute.per_replica_batch_size(32, 4) == 8
    with pytest.raises(ValueError, match="--mixed_precision"):
        distribute.set_mixed_precision("fp8")


@pytest.mark.parametrize("flag, message", [
    ("--strategy=data_parallel", "--strategy=data_parallel is the JAX "
     "engine's; run with KERAS_BACKEND=jax"),
    ("--jax_num_processes=2", "--jax_num_processes is a JAX flag"),
    ("--jax_coordinator_address=h:1", "--jax_coordinator_address is a JAX"),
])
def test_jax_flags_are_refused_on_tensorflow(resnet_train, flag, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distribute.check_engine_flags(parse(resnet_train, [flag]),
                                      "tensorflow")
    distribute.check_engine_flags(parse(resnet_train, []), "tensorflow")


def test_recipe_must_fit_the_optimizer(resnet_train):
    values = parse(resnet_train, ["--optimizer=lamb", "--recipe=mlperf"])
    with pytest.raises(ValueError, match="--recipe=mlperf is defined for "
                       "--optimizer=lars, not --optimizer=lamb"):
        resnet_train.optimizer_plan(values, 100, 1000, False)


def test_recipe_with_overrides(resnet_train):
    values = parse(resnet_train, [
        "--optimizer=lars", "--recipe=mlperf", "--global_batch_size=32768",
        "--momentum=0.95", "--trust_coefficient=0.002",
        "--label_smoothing=0.0",
    ])
    plan = resnet_train.optimizer_plan(values, 39, 39 * 44, True)
    settings = plan["settings"]
    assert settings["peak_learning_rate"] == 31.2  # the MLPerf table at 32k
    assert settings["momentum"] == 0.95
    assert settings["trust_coefficient"] == 0.002
    assert plan["label_smoothing"] == 0.0 and plan["l2_in_loss"] == 0.0
    optimizer = plan["optimizer_fn"]()
    assert (optimizer.momentum, optimizer.trust_coefficient) == (0.95, 0.002)
    assert optimizer.track_trust_ratios


def test_goyal_recipe_puts_weight_decay_in_the_loss(resnet_train):
    values = parse(resnet_train, [
        "--optimizer=nesterov", "--recipe=goyal", "--global_batch_size=8192",
    ])
    plan = resnet_train.optimizer_plan(values, 156, 156 * 90, False)
    assert plan["l2_in_loss"] == 1e-4
    assert plan["settings"]["peak_learning_rate"] == pytest.approx(3.2)
    optimizer = plan["optimizer_fn"]()
    assert optimizer.nesterov and not optimizer.weight_decay


def test_recipe_none_defaults_and_scaling(resnet_train):
    values = parse(resnet_train, ["--optimizer=lamb",
                                     "--global_batch_size=1024"])
    settings = resnet_train.optimizer_plan(values, 10, 100, False)[
        "settings"]
    assert settings["peak_learning_rate"] == pytest.approx(4e-3)  # sqrt
    assert settings["warmup_steps"] == 50 and settings["decay"] == "polynomial"
    namespace = types.SimpleNamespace(**{
        name: values[name].value for name in resnet_train.SCRIPT_FLAGS})
    assert resnet_train.flag_values_dict(namespace)["optimizer"] == "lamb"


def run_help(path):
    """`python tpu_scripts/<path> --help`, as a user runs a file: without
    PYTHONPATH, so the script must make `tpu_scripts` importable itself."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_BACKEND="tensorflow")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tpu_scripts", path), "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    # absl prints the help and exits with status 1.
    assert result.returncode in (0, 1), result.stderr[-2000:]
    assert "Try --helpfull" in result.stdout, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("script", ["resnet.train", "resnet.sweep_batch_size",
                                    "demo"])
def test_help_lists_every_flag_with_its_help(script):
    import importlib

    module = importlib.import_module(f"tpu_scripts.{script}")
    values = flags.FlagValues()
    module.define_flags(values)
    names = [n for n in values if values[n].help]
    assert len(names) == len(list(values))  # every flag has help text
    text = " ".join(run_help(script.replace(".", "/") + ".py").split())
    for name in names:
        assert f"--{name}" in text or f"--[no]{name}" in text, name
        first_words = " ".join(values[name].help.split()[:4])
        assert first_words in text, (name, first_words)


# Every entry point, and whether it trains (takes the distribution flags).
ENTRY_POINTS = {
    "tpu_scripts.demo": False,
    "tpu_scripts.resnet.train": True,
    "tpu_scripts.resnet.sweep_batch_size": False,
    "tpu_scripts.bert.pretrain": True,
    "tpu_scripts.bert.finetune_squad": True,
    "tpu_scripts.bert.create_pretraining_data": False,
    "tpu_scripts.bert.sweep_batch_size": False,
}


def skip_without_bert_extras(module):
    if ".bert." in module:
        pytest.importorskip("keras_hub")
        pytest.importorskip("tensorflow_text")


def run_module_help(module, monkeypatch, capsys):
    """`python -m <module> --help`, in this process: runpy runs the module as
    `__main__` as `-m` does; the flags it defines are removed afterwards."""
    import runpy

    from absl import app

    app.define_help_flags()  # once per process: keep them
    for name in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL"):  # scripts set them
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    before = set(flags.FLAGS)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)
        flags.FLAGS.unparse_flags()
    assert exit_info.value.code in (0, 1)  # absl exits 1 after the usage
    return capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:.*found in sys.modules")  # imported
@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_every_entry_point_runs_as_a_module(module, monkeypatch, capsys):
    skip_without_bert_extras(module)
    usage = run_module_help(module, monkeypatch, capsys)
    assert "Try --helpfull" in usage
    for name in distribute.FLAG_NAMES:  # listed with the script's own flags
        assert (f"--{name}" in usage or f"--[no]{name}" in usage) == (
            ENTRY_POINTS[module]), (module, name)


def test_distribution_flags_are_defined_once():
    pattern = re.compile(r"DEFINE_\w+\(\s*[\"'](" + "|".join(
        distribute.FLAG_NAMES) + r")[\"']")
    defining = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "tpu_scripts")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                if pattern.search(open(path).read()):
                    defining.add(os.path.relpath(path, ROOT))
    assert defining == {os.path.join("tpu_scripts", "distribute.py")}


@pytest.mark.parametrize("module", sorted(
    m for m, trains in ENTRY_POINTS.items() if trains))
def test_training_scripts_take_the_shared_distribution_flags(module):
    import importlib

    skip_without_bert_extras(module)
    shared = flags.FlagValues()
    distribute.define_flags(shared)
    values = flags.FlagValues()
    importlib.import_module(module).define_flags(values)
    for name in distribute.FLAG_NAMES:
        ours, theirs = values[name], shared[name]
        assert (type(ours), ours.default, ours.help) == (
            type(theirs), theirs.default, theirs.help), name
        assert getattr(ours.parser, "enum_values", None) == getattr(
            theirs.parser, "enum_values", None), name


def test_adamw_excludes_weight_decay_by_path(resnet_train):
    import keras
    import numpy as np

    from tpu_scripts.resnet.models import small_resnet
    from tpu_scripts.optimizers import make_optimizer

    model = small_resnet((8, 8, 1), 10, widths=(4,), blocks_per_stage=1)
    optimizer = make_optimizer("adamw", 0.1, weight_decay=0.5,
                               exclude_from_weight_decay="bn|bias")
    before = {v.path: keras.ops.convert_to_numpy(v)
              for v in model.trainable_variables}
    # Zero gradients: Adam's step is 0, so only weight decay moves weights.
    optimizer.apply([keras.ops.zeros_like(v) for v in
                     model.trainable_variables], model.trainable_variables)
    for v in model.trainable_variables:
        moved = not np.allclose(keras.ops.convert_to_numpy(v),
                                before[v.path])
        # (BatchNorm's beta starts at 0: decay cannot move it either way.)
        if "bn" in v.path or "bias" in v.path:
            assert not moved, v.path
        elif np.any(before[v.path]):
            assert moved, v.path
