"""The BERT scripts' command lines (tpu_scripts/bert/): `--help` of each, and
create_pretraining_data.py run as a script."""

import os
import runpy
import sys

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")
pytest.importorskip("tensorflow_text")

from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "tpu_scripts", "bert")
CORPUS = os.path.join(HERE, "fixtures", "tiny_corpus.txt")


def run_script(name, argv, monkeypatch):
    """Runs tpu_scripts/bert/`name` as `__main__` in this process (absl's
    app.run included); returns the SystemExit code. The flags it defines
    are removed afterwards, so every script can run in the same process."""
    app.define_help_flags()  # once per process: keep them
    before = set(flags.FLAGS)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(SCRIPTS, name), run_name="__main__")
    finally:
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)
        flags.FLAGS.unparse_flags()
    return exit_info.value.code


@pytest.mark.parametrize("script, expected", [
    ("create_pretraining_data.py",
     ["--input_files", "--vocab_file", "--max_predictions_per_seq",
      "--dupe_factor", "--random_seed"]),
    ("pretrain.py",
     ["--strategy", "--tpu", "--input_files", "--bert_config",
      "--global_batch_size", "--gradient_accumulation_steps", "--recipe",
      "--phase", "--init_checkpoint", "--mixed_precision", "--model_dir",
      "--steps_per_loop", "--jit_compile"]),
    ("finetune_squad.py",
     ["--strategy", "--train_file", "--predict_file", "--init_checkpoint",
      "--doc_stride", "--max_answer_length"]),
    ("sweep_batch_size.py",
     ["--text_file", "--batch_sizes", "--epochs", "--lamb_grid",
      "--tuned_exponents"]),
])
def test_help_lists_the_flags(script, expected, monkeypatch, capsys):
    code = run_script(script, ["--help"], monkeypatch)
    assert code in (0, 1)  # absl exits with 1 after printing the usage
    usage = capsys.readouterr().out
    for flag in expected:  # booleans print as --[no]name
        assert flag.lstrip("-") in usage, (script, flag)


def test_create_pretraining_data_command_line(tmp_path, monkeypatch):
    out = tmp_path / "records"
    code = run_script("create_pretraining_data.py", [
        f"--input_files={CORPUS}", f"--output_dir={out}",
        "--vocab_size=300", "--max_seq_length=32",
        "--max_predictions_per_seq=5", "--dupe_factor=1", "--num_shards=2",
    ], monkeypatch)
    assert code in (None, 0)
    # A dataset folder: CURRENT names the version holding the files.
    names = sorted(os.listdir(out))
    assert names[0] == "CURRENT" and len(names) == 2
    version = open(out / "CURRENT").read().strip()
    assert names[1] == version and version.startswith("data-")
    assert sorted(os.listdir(out / version)) == [
        "metadata.json", "pretrain-00000-of-00002.tfrecord",
        "pretrain-00001-of-00002.tfrecord", "vocab.txt"]
