"""The ResNet script's own code path under several replicas and workers.

Every run happens in a subprocess: logical CPU devices must be configured
before TensorFlow initialises its devices, and a second MirroredStrategy in
one process fails its collectives ("Shape mismatch in the collective
instance"), so each process creates at most one.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from conftest import (  # noqa: E402
    background, free_ports, small_run_flags,
    write_tiny_fashion_mnist)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tpu_scripts", "resnet", "train.py")
TIMEOUT = 240  # seconds per process; the runs take ~10 s on an idle core

# Mirrored vs one device: float32 sums in a different order (two half-batch
# gradients all-reduced, BatchNorm moments from all-reduced sums) over 6
# steps of LARS, whose trust ratio divides by gradient norms.
MIRRORED_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def write_data(path):
    return write_tiny_fashion_mnist(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp("fashion_mnist")))


def scratch_dir(name):
    """A fresh folder with the tiny data set in `data/`, for a background
    job (fixtures are not available there)."""
    root = tempfile.mkdtemp(prefix=f"keras_lamb_{name}_")
    os.makedirs(os.path.join(root, "data"))
    return root, write_data(os.path.join(root, "data"))


def environment(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def start(args, **env):
    return subprocess.Popen(
        [sys.executable] + args, cwd=ROOT, env=environment(**env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(processes, timeout=TIMEOUT):
    """Waits for all; kills all and fails on a timeout or an error."""
    deadline, outputs = time.time() + timeout, []
    try:
        for p in processes:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail(f"a run took longer than {timeout} s")
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def checkpoint_values(model_dir):
    """Every variable of the latest checkpoint in `model_dir`."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.endswith("VARIABLE_VALUE")}


# Runs `run()` of the script in this process for each argv list given as
# JSON on the command line (so one process can hold several strategies).
RUNNER = """
import json, sys
from absl import flags
from tpu_scripts.resnet import train as resnet_train
for argv in json.loads(sys.argv[1]):
    values = flags.FlagValues()
    resnet_train.define_flags(values)
    values(["resnet_train"] + argv)
    resnet_train.run(values)
"""


def mirrored_runs():
    tmp_path, data_dir = scratch_dir("mirrored")
    common = small_run_flags(data_dir, num_cpu_devices=2)
    runs = {name: os.path.join(tmp_path, name)
            for name in ("one", "two", "control")}
    one_then_two = [
        common + ["--strategy=one_device", "--sync_batchnorm",
                  f"--model_dir={runs['one']}"],
        common + ["--strategy=mirrored", "--sync_batchnorm",
                  f"--model_dir={runs['two']}"],
    ]
    # Negative control: per-replica BatchNorm statistics (8 examples each)
    # change the model's function, so the weights must differ.
    control = [common + ["--strategy=mirrored", "--nosync_batchnorm",
                         f"--model_dir={runs['control']}"]]
    outputs = finish([
        start(["-c", RUNNER, json.dumps(one_then_two)]),
        start(["-c", RUNNER, json.dumps(control)]),
    ])
    return tmp_path, runs, outputs


MIRRORED = background("tpu_mirrored", mirrored_runs, seconds=37)


@pytest.mark.background("tpu_mirrored")
def test_two_replicas_match_one_replica_with_the_same_global_batch():
    tmp_path, runs, outputs = MIRRORED.result()
    assert "2 replicas; global batch 16, 8 per replica" in outputs[0]
    one, two, other = (checkpoint_values(runs[n])
                       for n in ("one", "two", "control"))
    assert one.keys() == two.keys() and len(one) > 20
    moved = 0
    for key in one:
        np.testing.assert_allclose(two[key], one[key], err_msg=key,
                                   **MIRRORED_TOLERANCE)
        moved += not np.array_equal(one[key], other[key])
    assert moved > 0
    assert any(not np.allclose(one[k], other[k], **MIRRORED_TOLERANCE)
               for k in one)
    for name in ("one", "two"):
        with open(os.path.join(runs[name], "results.json")) as f:
            assert json.load(f)["steps"] == 6
    shutil.rmtree(tmp_path, ignore_errors=True)


def worker_runs():
    tmp_path, data_dir = scratch_dir("workers")
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    model_dir = os.path.join(tmp_path, "model")
    scratch = [os.path.join(tmp_path, f"tmp{i}") for i in range(2)]
    processes = []
    for index in range(2):
        os.makedirs(scratch[index])
        tf_config = json.dumps({"cluster": {"worker": workers},
                                "task": {"type": "worker", "index": index}})
        processes.append(start(
            # Synchronized BatchNorm: otherwise each worker's moving
            # statistics come from its own shard (only the weights and the
            # optimizer state are then shared).
            [SCRIPT] + small_run_flags(
                data_dir, strategy="multi_worker_mirrored",
                model_dir=model_dir, checkpoint_every=3,
                sync_batchnorm=True),
            TF_CONFIG=tf_config, TMPDIR=scratch[index],
        ))
    return tmp_path, model_dir, scratch, finish(processes)


WORKERS = background("tpu_workers", worker_runs, seconds=27)


@pytest.mark.background("tpu_workers")
def test_two_workers_on_loopback_agree():
    tmp_path, model_dir, scratch, outputs = WORKERS.result()
    assert "multi_worker_mirrored (CollectiveAllReduceStrategy), 2 replicas" in (
        outputs[0])
    assert "top-1" in outputs[0] and "top-1" not in outputs[1]  # chief only
    chief = checkpoint_values(model_dir)
    # The other worker saved to its throw-away directory.
    other_dir = os.path.join(scratch[1], "tpu_scripts_workers",
                             "model_worker_1")
    other = checkpoint_values(other_dir)
    assert chief.keys() == other.keys()
    for key in chief:
        np.testing.assert_array_equal(chief[key], other[key], err_msg=key)
    assert int(chief["global_step/.ATTRIBUTES/VARIABLE_VALUE"]) == 6
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_killed_run_resumes_to_the_same_weights(data_dir, tmp_path):
    # 4 steps per epoch, 6 epochs, a checkpoint every 3 steps: the run is
    # killed as soon as the first checkpoint (step 3, mid-epoch) appears.
    argv = small_run_flags(
        data_dir, train_steps=24, checkpoint_every=3, steps_per_loop=1,
        deterministic=True, augmentation="pad_crop_flip",
        track_trust_ratios=False,  # 24 loops of per-variable summaries: slow
    )
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    uninterrupted = start([SCRIPT] + argv + [f"--model_dir={straight}"])
    victim = start([SCRIPT] + argv + [f"--model_dir={killed}"])
    deadline = time.time() + TIMEOUT
    while tf.train.latest_checkpoint(killed) is None:
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    saved_step = int(checkpoint_values(killed)[
        "global_step/.ATTRIBUTES/VARIABLE_VALUE"])
    assert victim.returncode == -signal.SIGKILL and saved_step < 24
    resumed = start([SCRIPT] + argv + [f"--model_dir={killed}"])
    outputs = finish([uninterrupted, resumed])
    assert f"at step {saved_step}." in outputs[1]  # "Restored ... at step N."
    a, b = checkpoint_values(straight), checkpoint_values(killed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
