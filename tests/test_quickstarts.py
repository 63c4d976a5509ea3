"""The quick-start commands of the READMEs run as written, on a small slice.

Each `python -m tpu_scripts...` command of a quick-start block is read from
the page itself (so an edit of the page is what is tested), its data folder
replaced by a tiny data set made here, and run in a subprocess: it must exit 0 and write its results.
"""

import os
import re
import shlex
import tempfile

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from conftest import BACKEND, background  # noqa: E402
from test_tpu_distributed import finish, start  # noqa: E402
from tpu_scripts.resnet import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(BACKEND != "tensorflow",
                                reason="the scripts need TensorFlow")


def quick_start_commands(page):
    """The `python -m tpu_scripts.*` commands (continuations joined) of the
    bash block that follows the line starting with "Quick start" in
    `page`."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    match = re.search(r"^Quick start.*?\n```bash\n(.*?)```", text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"no quick-start block in {page}"
    joined = match.group(1).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("python -m tpu_scripts."):
            commands.append(shlex.split(line))
    return commands


def with_small_data(argv, data_dir, model_dir):
    """`argv` with the data folder replaced by a small one made here (the
    slice) and the model folder by a temporary one."""
    out = []
    for arg in argv:
        if arg.startswith("--data_dir="):
            arg = f"--data_dir={data_dir}"
        elif arg.startswith("--model_dir="):
            arg = f"--model_dir={model_dir}"
        out.append(arg)
    return out


def run_quick_starts():
    root = tempfile.mkdtemp(prefix="keras_lamb_quickstart_")
    rng = np.random.default_rng(0)
    idx = os.path.join(root, "fashion-mnist")
    data.write_fashion_mnist(
        idx, (rng.integers(0, 256, (1024, 28, 28)), rng.integers(0, 10, 1024)),
        (rng.integers(0, 256, (512, 28, 28)), rng.integers(0, 10, 512)))
    commands = quick_start_commands("tpu_scripts/README.md")
    runs = []
    for i, argv in enumerate(commands):
        module = argv[2]
        model_dir = os.path.join(root, f"run{i}")
        if module == "tpu_scripts.demo":
            args = argv[1:] + ["--epochs=1", "--full_batch_lr_multipliers=1",
                               f"--plot={root}/demo.png"]
        else:
            args = with_small_data(argv[1:], idx, model_dir)
        runs.append((module, model_dir, start(args)))
    outputs = finish([p for _, _, p in runs])
    return root, [(m, d, out) for (m, d, _), out in zip(runs, outputs)]


QUICK = background("quick_starts", run_quick_starts, seconds=45)


@pytest.mark.background("quick_starts")
def test_the_tpu_scripts_quick_start_runs_as_written():
    root, runs = QUICK.result()
    modules = [m for m, _, _ in runs]
    assert modules == ["tpu_scripts.demo", "tpu_scripts.resnet.train"]
    for module, model_dir, out in runs:
        assert "Traceback" not in out and "Error:" not in out, out[-3000:]
    assert os.path.exists(os.path.join(root, "demo.png"))
    resnet_dir = runs[1][1]
    assert os.path.exists(os.path.join(resnet_dir, "results.json"))
    assert "top-1" in runs[1][2]


def test_the_quick_start_reader_finds_the_commands():
    commands = quick_start_commands("tpu_scripts/README.md")
    assert [c[2] for c in commands] == ["tpu_scripts.demo",
                                       "tpu_scripts.resnet.train"]
    resnet = commands[1]
    assert "--data_dir=/usr/share/datasets/fashion-mnist" in resnet
    assert with_small_data(resnet, "/d", "/m")[-1] == "--model_dir=/m"
