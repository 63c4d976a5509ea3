"""The TensorFlow and JAX engines train alike: the same task, the same
initial weights and the same batches in the same order (no dropout, no
augmentation, one replica) give the same losses, step by step.

A TensorFlow process (`tpu_scripts.trainer.Trainer`) saves its initial
weights and trains; a JAX process (`tpu_scripts.jax_trainer.JaxTrainer`)
starts from those weights; both report their losses and final weights. The
two runs are a background job (see conftest.py).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import BACKEND, background

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 6

pytestmark = [
    pytest.mark.skipif(BACKEND != "tensorflow",
                       reason="runs the TensorFlow engine here"),
    pytest.mark.skipif(importlib.util.find_spec("jax") is None
                       or importlib.util.find_spec("orbax") is None,
                       reason="needs jax and orbax-checkpoint"),
]

# What both processes build: a small ResNet (batch norm), its data, and the
# optimizer; `record_losses(trainer)` records each loop's training loss.
SETUP = """
import numpy as np
import keras
import keras_lamb
from tpu_scripts.resnet import data, models
from tpu_scripts.tasks import ClassificationTask

def make(name):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, 96).astype(np.int32)
    task = ClassificationTask(lambda: models.small_resnet(
        (8, 8, 1), 10, widths=[4, 8], blocks_per_stage=1), 10,
        label_smoothing=0.1)
    optimizer = {
        "lars": lambda: keras_lamb.LARS(
            learning_rate=1.0, momentum=0.9, weight_decay=1e-4,
            exclude_from_weight_decay="bn|bias",
            exclude_from_layer_adaptation="bn|bias"),
        "lamb": lambda: keras_lamb.LAMB(
            learning_rate=0.01, weight_decay=0.01, global_clipnorm=1.0,
            exclude_from_weight_decay="bn|bias"),
    }[name]
    return task, optimizer, data.ArrayInput(images, labels, 32, True)

def record_losses(trainer):
    losses = []
    run_loop = trainer._run_loop
    def recording(*args):
        results, seconds = run_loop(*args)
        losses.append(results["loss"])
        return results, seconds
    trainer._run_loop = recording
    return losses
"""

JAX_RUN = SETUP + """
import json, sys
from tpu_scripts.jax_trainer import JaxTrainer
name, weights_path, out_path = sys.argv[1:4]
task, optimizer, train_input = make(name)
trainer = JaxTrainer(task, optimizer, 32, steps_per_loop=1,
                     log=lambda *a, **k: None)
initial = np.load(weights_path)
for i, v in enumerate(trainer.model.weights):
    v.assign(initial[f"w{i}"])
losses = record_losses(trainer)
trainer.train(train_input, %d)
np.savez(out_path, **{f"w{i}": np.asarray(v.value)
                      for i, v in enumerate(trainer.model.weights)})
print(json.dumps(losses))
""" % STEPS


TENSORFLOW_RUN = SETUP + """
import json, sys
import tensorflow as tf
from tpu_scripts.trainer import Trainer
name, weights_path, out_path = sys.argv[1:4]
keras.utils.set_random_seed(7)
task, optimizer, train_input = make(name)
trainer = Trainer(tf.distribute.get_strategy(), task, optimizer, 32,
                  steps_per_loop=1, log=lambda *a, **k: None)
np.savez(weights_path, **{f"w{i}": v.numpy()
                          for i, v in enumerate(trainer.model.weights)})
losses = record_losses(trainer)
trainer.train(train_input, %d)
np.savez(out_path, **{f"w{i}": v.numpy()
                      for i, v in enumerate(trainer.model.weights)})
print(json.dumps(losses))
""" % STEPS


def run_engine(backend, program, *argv):
    """Runs `program` on Keras's `backend`; returns its printed losses."""
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    process = subprocess.run(
        [sys.executable, "-c", program, *argv],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def both_engines():
    """`{name: (tf_losses, jax_losses, tf_weights, jax_weights)}`."""
    root = tempfile.mkdtemp(prefix="keras_lamb_engines_")
    out = {}
    try:
        for name in ("lars", "lamb"):
            paths = [os.path.join(root, f"{name}_{what}.npz")
                     for what in ("initial", "tf", "jax")]
            tf_losses = run_engine("tensorflow", TENSORFLOW_RUN, name,
                                   paths[0], paths[1])
            jax_losses = run_engine("jax", JAX_RUN, name, paths[0], paths[2])
            out[name] = (tf_losses, jax_losses, dict(np.load(paths[1])),
                         dict(np.load(paths[2])))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


ENGINES = background("engines_agree", both_engines, seconds=40)


@pytest.mark.background("engines_agree")
@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_tensorflow_and_jax_engines_give_the_same_losses(name):
    tf_losses, jax_losses, tf_weights, jax_weights = ENGINES.result()[name]
    assert len(jax_losses) == len(tf_losses) == STEPS
    relative = np.abs(np.array(jax_losses) - tf_losses) / np.abs(tf_losses)
    print(f"{name}: losses TF {np.round(tf_losses, 6).tolist()}, largest "
          f"relative difference from JAX {relative.max():.1e}")
    # float32 convolutions and reductions of two compilers (TF's kernels,
    # XLA:CPU), through 6 steps of layer-wise ratios: measured 1e-7.
    np.testing.assert_allclose(jax_losses, tf_losses, rtol=1e-5)
    for key, value in tf_weights.items():
        np.testing.assert_allclose(jax_weights[key], value, rtol=1e-3,
                                   atol=1e-5)
    # Negative control: the losses move by far more than the tolerance
    # from one step to the next.
    assert np.abs(np.diff(tf_losses)).max() > 1e-3
