"""The training scripts' JAX engine (`tpu_scripts.jax_trainer`).

Runs on Keras's JAX backend with 8 virtual CPU devices: `test_jax_backend.py`
starts this module in such a process (and once more with `import tensorflow`
failing, where the tests marked `no_tensorflow_needed` must pass too).

- `DataParallel` over 8 devices equals one device, for LARS and for LAMB with
  `global_clipnorm` and gradient accumulation (the trainer's own);
- the ResNet script on JAX: small ResNet on in-memory data, ResNet-50 v1.5 on
  synthetic data; kill -9 and SIGTERM, then a restart, end bit for bit where
  an uninterrupted run does; a damaged newest checkpoint falls back to the
  previous one; flags of the other engine are one error line.
"""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import jax_device_count, read_until, write_tiny_fashion_mnist
from conftest import small_run_flags as tiny_run_flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "tpu_scripts", "resnet", "train.py")
DEVICES = 8
TENSORFLOW_BLOCKED = "tensorflow" in sys.modules and (
    sys.modules["tensorflow"] is None)


pytestmark = pytest.mark.skipif(
    jax_device_count() < DEVICES,
    reason="needs the JAX backend with 8 devices; run by "
    "test_jax_backend.py::test_jax_engine",
)

# 8 devices against one, float32: the all-reduced gradient and the batch-norm
# moments are sums in another order; LARS's and LAMB's trust ratios divide
# by norms of those. Measured differences after 6 steps: below 2e-6.
DATA_PARALLEL_TOLERANCE = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def small_run_flags(data_dir, **overrides):
    return tiny_run_flags(data_dir, **{"track_trust_ratios": False,
                                       **overrides})


def run_script(argv, log=None):
    """The ResNet script's `run()` in this process."""
    from absl import flags

    from tpu_scripts.resnet import train

    values = flags.FlagValues()
    train.define_flags(values)
    values(["train"] + argv)
    lines = [] if log is None else log
    return train.run(values, log=lambda *a, **k: lines.append(str(a[0])))


def checkpoint_arrays(model_dir):
    """The newest checkpoint of the JAX engine in `model_dir`, flattened to
    `{path: numpy array}`."""
    import jax
    import orbax.checkpoint as ocp

    from tpu_scripts import run_state

    _, path = run_state.list_jax_checkpoints(model_dir)[-1]
    path = os.path.join(os.path.abspath(path), "default")
    checkpointer = ocp.StandardCheckpointer()
    # On this process's first device, whatever topology saved it.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree)
    tree = checkpointer.restore(path, target)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


# ----------------------------------------------------------------------------
# DataParallel(8) equals one device


def _train_library(distribution, optimizer, accumulation, data):
    """6 steps of a small ResNet with `JaxTrainer`; returns its weights."""
    from tpu_scripts.jax_trainer import JaxTrainer
    from tpu_scripts.resnet import data as resnet_data
    from tpu_scripts.resnet import models
    from tpu_scripts.tasks import ClassificationTask

    images, labels = data
    keras.utils.set_random_seed(3)
    task = ClassificationTask(
        lambda: models.small_resnet((8, 8, 1), 10, widths=[4, 8],
                                    blocks_per_stage=1), 10)
    trainer = JaxTrainer(task, optimizer, 32, distribution=distribution,
                         steps_per_loop=3, log=lambda *a, **k: None,
                         gradient_accumulation_steps=accumulation)
    train_input = resnet_data.ArrayInput(images, labels, 32, True,
                                         augmentation="pad_crop_flip")
    initial = [np.asarray(v.value) for v in trainer.model.weights]
    outcome = trainer.train(train_input, 6)
    return outcome, initial, [np.asarray(v.value) for v in
                              trainer.model.weights] + [
        np.asarray(v.value) for v in trainer.optimizer.variables]


@pytest.mark.parametrize("name", ["lars", "lamb_clipnorm_accumulation"])
def test_data_parallel_over_8_devices_equals_one_device(name):
    import jax

    import keras_lamb

    optimizers = {
        "lars": (lambda: keras_lamb.LARS(
            learning_rate=1.0, momentum=0.9, weight_decay=1e-4,
            exclude_from_weight_decay="bn|bias",
            exclude_from_layer_adaptation="bn|bias"), 1),
        "lamb_clipnorm_accumulation": (lambda: keras_lamb.LAMB(
            learning_rate=0.01, weight_decay=0.01, global_clipnorm=0.5,
            exclude_from_weight_decay="bn|bias"), 2),
    }
    optimizer, accumulation = optimizers[name]
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 256, (96, 8, 8, 1)).astype(np.uint8),
            rng.integers(0, 10, 96).astype(np.int32))
    one, initial, one_weights = _train_library(None, optimizer,
                                               accumulation, data)
    parallel = keras.distribution.DataParallel(devices=jax.devices())
    eight, _, eight_weights = _train_library(parallel, optimizer,
                                             accumulation, data)
    assert eight["step"] == one["step"] == 6
    worst = max(float(np.max(np.abs(a - b)))
                for a, b in zip(one_weights, eight_weights))
    print(f"{name}: 8 devices vs 1, largest difference {worst:.2e}")
    for a, b in zip(one_weights, eight_weights):
        np.testing.assert_allclose(b, a, **DATA_PARALLEL_TOLERANCE)
    # Negative control: training moved the weights far outside it.
    moved = max(float(np.max(np.abs(a - b)))
                for a, b in zip(initial, one_weights))
    assert moved > 100 * DATA_PARALLEL_TOLERANCE["atol"]


def test_accumulation_equals_the_whole_batch_without_batch_norm():
    """k micro-batches summed and applied once equal one step on the whole
    batch (a model without batch norm, whose statistics would differ)."""
    import keras_lamb
    from tpu_scripts.jax_trainer import JaxTrainer
    from tpu_scripts.resnet import data as resnet_data
    from tpu_scripts.tasks import ClassificationTask

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (64, 4, 4, 1)).astype(np.uint8)
    labels = rng.integers(0, 3, 64).astype(np.int32)

    def train(k):
        keras.utils.set_random_seed(5)
        task = ClassificationTask(lambda: keras.Sequential([
            keras.Input((4, 4, 1)), keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]),
            3)
        trainer = JaxTrainer(
            task, lambda: keras_lamb.LAMB(learning_rate=0.05,
                                          global_clipnorm=0.2),
            32, steps_per_loop=2, log=lambda *a, **k: None,
            gradient_accumulation_steps=k)
        trainer.train(resnet_data.ArrayInput(images, labels, 32, True), 4)
        return [np.asarray(v.value) for v in trainer.model.weights]

    whole, accumulated = train(1), train(4)
    for a, b in zip(whole, accumulated):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# The ResNet script on JAX


@pytest.mark.no_tensorflow_needed
def test_resnet_script_on_jax_in_memory_data(data_dir, tmp_path):
    lines = []
    results = run_script(small_run_flags(
        data_dir, strategy="data_parallel", model_dir=tmp_path / "run",
        augmentation="pad_crop_flip", track_trust_ratios=True), lines)
    assert results["complete"] and results["steps"] == 6
    assert results["engine"] == "jax" and results["num_replicas"] == DEVICES
    assert results["top1"] is not None and 0 <= results["top1"] <= 1
    assert any("Engine: jax" in line for line in lines), lines
    assert os.listdir(tmp_path / "run" / "train"), "no TensorBoard events"
    # A rerun of the finished run leaves it as it is.
    again = run_script(small_run_flags(
        data_dir, strategy="data_parallel", model_dir=tmp_path / "run",
        augmentation="pad_crop_flip", track_trust_ratios=True))
    assert again == results
    if TENSORFLOW_BLOCKED:
        assert "tensorflow" not in [m for m in sys.modules
                                    if sys.modules[m] is not None]


@pytest.mark.no_tensorflow_needed
def test_synthetic_data(tmp_path):
    results = run_script([
        "--synthetic_data", "--model=small_resnet", "--image_size=8",
        "--small_resnet_widths=4", "--small_resnet_blocks=1",
        "--num_classes=10", "--num_train_examples=64",
        "--num_eval_examples=24", "--global_batch_size=16",
        "--eval_batch_size=8", "--train_steps=4", "--warmup_epochs=0",
        "--strategy=data_parallel", f"--model_dir={tmp_path / 'run'}"])
    assert results["complete"] and results["steps"] == 4
    assert results["eval_examples"] == 24 and np.isfinite(results["eval_loss"])


def test_resnet50_v15_on_synthetic_data(tmp_path):
    results = run_script([
        "--synthetic_data", "--model=resnet50", "--image_size=32",
        "--num_classes=10", "--num_train_examples=64",
        "--num_eval_examples=16", "--global_batch_size=16",
        "--train_steps=2", "--steps_per_loop=2", "--warmup_epochs=0",
        "--optimizer=lars", "--strategy=data_parallel",
        f"--model_dir={tmp_path / 'r50'}"])
    assert results["complete"] and results["steps"] == 2
    assert results["data"] == "synthetic" and results["model"] == "resnet50"
    assert np.isfinite(results["eval_loss"])


@pytest.mark.parametrize("flag, message", [
    ("--strategy=mirrored", "--strategy=mirrored is TensorFlow's"),
    ("--jit_compile", "--jit_compile=True is a TensorFlow flag"),
    ("--tpu=local", "--tpu=local is a TensorFlow flag"),
    ("--collective=nccl", "--collective=nccl is a TensorFlow flag"),
    ("--jax_num_processes=2", "needs --jax_coordinator_address"),
])
def test_flags_of_the_other_engine_are_refused(data_dir, tmp_path, flag,
                                               message):
    from tpu_scripts import run_state

    with pytest.raises(run_state.FlagError, match=message):
        run_script(small_run_flags(data_dir, model_dir=tmp_path / "run")
                   + [flag])
    assert not os.path.exists(tmp_path / "run"), "refused after writing"


def test_a_refused_flag_is_one_error_line(data_dir):
    process = subprocess.run(
        [sys.executable, SCRIPT, *small_run_flags(data_dir),
         "--strategy=tpu"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT))
    assert process.returncode == 1, process.stdout + process.stderr
    errors = [line for line in process.stderr.splitlines()
              if line.startswith("Error:")]
    assert len(errors) == 1 and "--strategy=tpu is TensorFlow's" in (
        errors[0]), process.stderr[-2000:]
    assert "Traceback" not in process.stderr


# ----------------------------------------------------------------------------
# Kills, SIGTERM, damaged checkpoints


def _start(argv):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *argv], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT))


def _finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def _long_run_flags(data_dir, model_dir):
    # 24 steps, a checkpoint after every loop of 2.
    return small_run_flags(
        data_dir, model_dir=model_dir, train_steps=24, checkpoint_every=2,
        steps_per_loop=2, augmentation="pad_crop_flip")


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    results = run_script(_long_run_flags(data_dir, model_dir))
    return results, checkpoint_arrays(model_dir)


def _assert_same_run(model_dir, uninterrupted):
    results, arrays = uninterrupted
    with open(os.path.join(model_dir, "results.json")) as f:
        resumed = json.load(f)
    assert resumed["steps"] == results["steps"] == 24
    assert resumed["eval_loss"] == results["eval_loss"]
    assert resumed["top1"] == results["top1"]
    resumed_arrays = checkpoint_arrays(model_dir)
    assert resumed_arrays.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(resumed_arrays[key], value, err_msg=key)


def test_sigterm_kill_9_and_a_damaged_checkpoint_end_bit_for_bit(
        data_dir, tmp_path, uninterrupted):
    """SIGTERM at step 6 (exit 143), a restart, kill -9 at step 12, the
    newest checkpoint cut short, a restart: it falls back to the previous
    checkpoint, sets the damaged one aside and ends where an uninterrupted
    run does, every array bit for bit."""
    from tpu_scripts import run_state

    model_dir = str(tmp_path / "run")
    process = _start(_long_run_flags(data_dir, model_dir))
    read_until(process, "step 6/24")
    process.send_signal(signal.SIGTERM)
    rc, out = _finish(process)
    assert rc == 143, out[-3000:]
    assert "Preempted: saved a checkpoint at step" in out
    process = _start(_long_run_flags(data_dir, model_dir))
    lines = read_until(process, "step 12/24")
    assert any("Restored" in line for line in lines), lines
    process.kill()
    process.wait()
    (newest, path), = run_state.list_jax_checkpoints(model_dir)[-1:]
    for folder, _, files in os.walk(path):  # cut every array file short
        for name in files:
            if name not in ("_CHECKPOINT_METADATA", "_METADATA"):
                file = os.path.join(folder, name)
                with open(file, "r+b") as f:
                    f.truncate(max(0, os.path.getsize(file) // 3))
    rc, out = _finish(_start(_long_run_flags(data_dir, model_dir)))
    assert rc == 0, out[-3000:]
    assert f"instead of the damaged {path}" in out, out[-3000:]
    assert any(name.startswith(f"{newest}.damaged-") for name in
               os.listdir(os.path.dirname(path)))
    _assert_same_run(model_dir, uninterrupted)


# ----------------------------------------------------------------------------
# Several processes, as a TPU pod's hosts


def test_two_processes_run_one_data_parallel_job(data_dir, tmp_path):
    """Two processes on 127.0.0.1 (jax.distributed, CPU collectives over
    gloo), 2 devices each, train one data-parallel job into one model_dir
    (a sharded orbax checkpoint) and end where one device does."""
    from conftest import free_ports

    port, = free_ports(1)
    # Trust-ratio tracking on: its statistics start at a value JAX can
    # check is equal on every process (NaN is not equal to itself).
    common = small_run_flags(data_dir, strategy="data_parallel",
                             num_cpu_devices=2, track_trust_ratios=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(KERAS_BACKEND="jax", PYTHONPATH=ROOT)

    def start(*argv):
        return subprocess.Popen(
            [sys.executable, SCRIPT, *common, *argv], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)

    job = str(tmp_path / "job")
    processes = [start(f"--model_dir={job}", "--jax_num_processes=2",
                       f"--jax_coordinator_address=127.0.0.1:{port}",
                       f"--jax_process_id={i}") for i in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "DataParallel on 4 cpu devices, 2 process(es)" in outputs[0]
    # The reference: this process, one device (a data-parallel step
    # normalizes over the global batch, so any device count computes it).
    one = run_script(small_run_flags(
        data_dir, strategy="default", track_trust_ratios=True,
        model_dir=tmp_path / "single"))
    with open(os.path.join(job, "results.json")) as f:
        two = json.load(f)
    assert two["steps"] == one["steps"] == 6 and two["num_replicas"] == 4
    # Sums over two processes' devices against sums on one device.
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"],
                                                 rel=1e-5)
    saved = os.listdir(os.path.join(job, "checkpoints", "6", "default"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(saved), saved
    a, b = checkpoint_arrays(job), checkpoint_arrays(str(tmp_path / "single"))
    for key, value in b.items():
        np.testing.assert_allclose(a[key], value, rtol=1e-4, atol=1e-6,
                                   err_msg=key)


# Runs the script (argv[2:]) with the disk filled (a file at argv[1])
# before the checkpoint of step 20 is written.
FILL_DISK_AT_20 = """
import runpy, sys
from tpu_scripts import jax_trainer
filler, script = sys.argv[1], sys.argv[2]
save = jax_trainer.JaxTrainer.save
def filling_save(self):
    if self.current_step() == 20:
        with open(filler, "wb", buffering=0) as f:  # nothing left to flush
            try:
                while True:
                    f.write(b"\\0" * 65536)
            except OSError:
                pass
    return save(self)
jax_trainer.JaxTrainer.save = filling_save
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def test_a_full_disk_is_one_error_line_and_the_run_resumes(data_dir,
                                                          tmp_path):
    """A checkpoint that cannot be written (a full 4 MB tmpfs; skips where
    mounting is refused): one `Error:` line, exit 1; the previous
    checkpoint is intact and, once space is freed, the restart resumes from
    it and finishes."""
    from tpu_scripts import run_state

    mount = str(tmp_path / "disk")
    os.makedirs(mount)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                        mount], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    try:
        model_dir = os.path.join(mount, "run")
        argv = small_run_flags(data_dir, model_dir=model_dir, train_steps=60,
                               checkpoint_every=10, steps_per_loop=5)
        # The disk fills up just before the checkpoint at step 20 (the run
        # would outpace a filler started from here).
        filler = os.path.join(mount, "filler")
        victim = subprocess.Popen(
            [sys.executable, "-c", FILL_DISK_AT_20, filler, SCRIPT, *argv],
            cwd=ROOT, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT))
        rc, text = _finish(victim)
        assert rc == 1, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        errors = [line for line in text.splitlines()
                  if line.startswith("Error:")]
        assert len(errors) == 1, text[-3000:]
        assert "Could not write a checkpoint at step 20" in errors[0], errors
        saved = run_state.checkpoint_step(model_dir)
        assert saved == 10
        os.remove(filler)
        rc, text = _finish(_start(argv))
        assert rc == 0, text[-3000:]
        assert f"at step {saved}" in text
        with open(os.path.join(model_dir, "results.json")) as f:
            results = json.load(f)
        assert results["complete"] and results["steps"] == 60
    finally:
        subprocess.run(["umount", "-l", mount], capture_output=True)


def test_a_checkpoint_of_another_model_is_an_error_not_damage(data_dir,
                                                              tmp_path):
    from tpu_scripts import run_state

    model_dir = tmp_path / "run"
    run_script(small_run_flags(data_dir, model_dir=model_dir, train_steps=3))
    with pytest.raises(run_state.FlagError,
                       match="does not match the model.*of other shapes"):
        run_script(small_run_flags(
            data_dir, model_dir=model_dir, small_resnet_widths="4,16",
            allow_changed_flags=True))
    # Nothing was set aside as damaged.
    assert os.listdir(model_dir / "checkpoints") == ["3"]


@pytest.mark.no_tensorflow_needed
def test_file_layer_on_a_remote_filesystem_without_tensorflow():
    """`tpu_scripts.fileio` through fsspec (its in-memory filesystem stands
    in for gs://): atomic writes, listing, globbing, renames that refuse
    to overwrite, and the run's lock."""
    import uuid

    from tpu_scripts import fileio, run_state

    root = f"memory://run-{uuid.uuid4().hex[:8]}"
    run_state.write_json(f"{root}/results.json", {"top1": 0.5})
    assert run_state.read_json(f"{root}/results.json") == {"top1": 0.5}
    assert fileio.listdir(root) == ["results.json"]
    found = fileio.glob(f"{root}/*.json")  # paths the layer reads back
    assert [p.rsplit("/", 1)[-1] for p in found] == ["results.json"]
    assert run_state.read_json(found[0]) == {"top1": 0.5}
    with fileio.GFile(f"{root}/a.txt", "w") as f:
        f.write("a")
    with pytest.raises(FileExistsError):
        fileio.rename(f"{root}/a.txt", f"{root}/results.json")
    fileio.rename(f"{root}/a.txt", f"{root}/b.txt")
    assert sorted(fileio.listdir(root)) == ["b.txt", "results.json"]
    with pytest.raises(FileNotFoundError):
        fileio.GFile(f"{root}/missing.txt").read()
    lock = run_state.RunLock(root, log=lambda *a, **k: None).acquire()
    lock.release()
    assert not fileio.exists(f"{root}/{run_state.LOCK_FILENAME}")
    # A live holder on another host (fresh heartbeat) keeps it.
    run_state.write_json(f"{root}/{run_state.LOCK_FILENAME}", dict(
        host="another-host", pid=1, token="theirs", heartbeat=time.time(),
        started=time.time()))
    with pytest.raises(run_state.LockedError, match="another-host"):
        run_state.RunLock(root, log=lambda *a, **k: None).acquire()
    if TENSORFLOW_BLOCKED:
        assert sys.modules.get("tensorflow") is None
