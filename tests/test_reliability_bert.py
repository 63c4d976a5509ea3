"""The BERT half of the reliability issue: an atomic `--overwrite` of
create_pretraining_data (item 3), exact resume with dropout on (4), truncated
and corrupt records (5, 12), non-finite flags (6), broken SQuAD files (11) and
one-line errors that come before any expensive work (14).

Every user error is checked where the user meets it: the script's exit
status 1, one `Error:` line naming the flag, file or record, no traceback.
The gs://-style paths use TensorFlow's in-process `ram://` filesystem.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")
pytest.importorskip("tensorflow_text")

import keras  # noqa: E402
from absl import flags  # noqa: E402

from test_tpu_distributed import environment  # noqa: E402
from tpu_scripts import run_state  # noqa: E402
from tpu_scripts.bert import data as bert_data  # noqa: E402
from tpu_scripts.bert import pretrain as bert_pretrain  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("tpu_scripts need the TensorFlow backend",
                allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(ROOT, "tpu_scripts", "bert")
CORPUS = os.path.join(HERE, "fixtures", "tiny_corpus.txt")
SQUAD = os.path.join(HERE, "fixtures", "squad_tiny.json")
NANO = os.path.join(HERE, "fixtures", "bert_nano.json")
QUIET = dict(log=lambda *a, **k: None)
# Small records of the tiny corpus: sequence 32, 5 predictions.
RECORD_SETTINGS = dict(max_seq_length=32, max_predictions_per_seq=5,
                       dupe_factor=1, random_seed=1)


def parse(module, argv):
    values = flags.FlagValues()
    module.define_flags(values)
    values(["script"] + argv)
    return values


def run_script(name, argv, timeout=60):
    """Runs tpu_scripts/bert/`name` in a subprocess: `(status, output)`."""
    process = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *argv], cwd=ROOT,
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout)
    return process.returncode, process.stdout


def assert_one_error_line(status, output, *fragments):
    """Exit status 1, no traceback, an `Error:` line holding `fragments`."""
    assert status == 1, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines()
              if line.startswith("Error:")]
    assert len(errors) == 1, output[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Two shards of the tiny corpus with a learnt vocabulary."""
    out = str(tmp_path_factory.mktemp("bert_reliability") / "seq32")
    bert_data.create_pretraining_data(
        CORPUS, out, vocabulary_size=300, num_shards=2, **RECORD_SETTINGS,
        **QUIET)
    return dict(dir=out, vocab=os.path.join(out, "vocab.txt"),
                pattern=os.path.join(out, "*.tfrecord"))


def pretrain_args(records, **overrides):
    args = dict(
        input_files=records["pattern"], vocab_file=records["vocab"],
        bert_config=NANO, max_seq_length=32, max_predictions_per_seq=5,
        global_batch_size=4, train_steps=4, warmup_steps=1,
        learning_rate=1e-2, steps_per_loop=1, in_memory=True,
        track_trust_ratios=False)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items() if v is not None]


# ----------------------------------------------------------------------------
# Item 4: exact resume with dropout on.


def checkpoint_tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.endswith("VARIABLE_VALUE")}


def test_resume_with_dropout_is_bit_identical(records, tmp_path):
    # Dropout 0.1 (bert_nano's); checkpoints at steps 3 and 6.
    argv = pretrain_args(records, train_steps=6, save_checkpoints_steps=3,
                         model_dir=str(tmp_path / "whole"))
    whole = bert_pretrain.run(parse(bert_pretrain, argv), **QUIET)
    # The run stopped after its step-3 checkpoint, then restarted.
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(tmp_path / "whole", resumed_dir)
    for path in glob.glob(os.path.join(resumed_dir, "ckpt-6.*")) + [
            os.path.join(resumed_dir, "results.json")]:
        os.remove(path)
    tf.compat.v1.train.update_checkpoint_state(
        resumed_dir, os.path.join(resumed_dir, "ckpt-3"))
    argv = pretrain_args(records, train_steps=6, save_checkpoints_steps=3,
                         model_dir=resumed_dir)
    resumed = bert_pretrain.run(parse(bert_pretrain, argv), **QUIET)
    expected = checkpoint_tensors(os.path.join(tmp_path, "whole", "ckpt-6"))
    got = checkpoint_tensors(os.path.join(resumed_dir, "ckpt-6"))
    assert any(k.startswith("dropout_state/") for k in expected)
    assert sorted(got) == sorted(expected)
    differ = [k for k in expected if not np.array_equal(got[k], expected[k])]
    assert not differ, f"{len(differ)} of {len(expected)} differ: {differ[:5]}"
    assert resumed["train"]["loss"] == whole["train"]["loss"]
