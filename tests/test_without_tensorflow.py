"""The core install: keras_lamb on Keras's JAX backend without TensorFlow.

`pip install keras-lamb` pulls only keras and numpy. These tests run in a
process where `import tensorflow` fails as it does when TensorFlow is not
installed (`sys.modules["tensorflow"] = None` before anything is imported)
and Keras runs on JAX; `test_jax_backend.py` starts that process. Where
TensorFlow is not installed they run as they are, with `KERAS_BACKEND=jax`.
"""

import importlib
import importlib.util
import sys

import keras
import numpy as np
import pytest

from conftest import BACKEND

# None where TensorFlow is not installed, and where it is blocked.
TENSORFLOW_MISSING = importlib.util.find_spec("tensorflow") is None

pytestmark = pytest.mark.skipif(
    not (TENSORFLOW_MISSING and BACKEND == "jax"),
    reason="needs JAX with `import tensorflow` failing; run by "
    "test_jax_backend.py::test_core_without_tensorflow",
)


def loaded_tensorflow_modules():
    return sorted(
        name for name, module in sys.modules.items()
        if module is not None
        and (name == "tensorflow" or name.startswith("tensorflow."))
    )


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((5,)),
         keras.layers.Dense(4, activation="tanh", name="hidden"),
         keras.layers.LayerNormalization(name="norm"),
         keras.layers.Dense(2, name="out")],
        name="net",
    )


def make_data(n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 5)).astype("float32")
    return x, np.tanh(2 * x[:, :2]).astype("float32")


def make_optimizer(kind, **kwargs):
    import keras_lamb

    cls = keras_lamb.LARS if kind == "lars" else keras_lamb.LAMB
    return cls(0.1 if kind == "lars" else 0.01, weight_decay=0.01,
               exclude_from_weight_decay=["bias", "norm"],
               exclude_from_layer_adaptation="norm",
               track_trust_ratios=True, **kwargs)


def test_tensorflow_cannot_be_imported():
    with pytest.raises(ImportError):
        importlib.import_module("tensorflow")


def test_package_imports_and_builds_without_tensorflow():
    import keras_lamb
    from keras_lamb import LAMB, LARS, callbacks, plot, recipes, schedules

    assert callbacks.TrustRatioMonitor and plot.trust_ratios
    assert isinstance(LAMB(), keras.optimizers.Optimizer)
    assert isinstance(LARS(), keras.optimizers.Optimizer)
    warmup = schedules.WarmUp(
        keras.optimizers.schedules.PolynomialDecay(1e-3, 100, 0.0),
        warmup_steps=10,
    )
    # Halfway up to the decay's value at step 10, 1e-3 * (1 - 10 / 100).
    assert float(warmup(5)) == pytest.approx(0.5 * 9e-4)
    optimizer, schedule, _ = recipes.lamb_bert(global_batch_size=4096)
    assert isinstance(optimizer, keras_lamb.LAMB)
    assert optimizer.global_clipnorm == 1.0
    optimizer, _, _ = recipes.lars_resnet50(
        global_batch_size=4096, epochs=10, steps_per_epoch=10)
    assert isinstance(optimizer, keras_lamb.LARS)
    assert loaded_tensorflow_modules() == []


@pytest.mark.parametrize("kind, accumulation", [("lamb", None), ("lars", 2)])
def test_fit_with_trust_ratio_monitor(kind, accumulation):
    """History output, and the records are each step's values. On JAX, `fit`
    keeps the state off the variables during an epoch; the monitor
    re-attaches it (about 40 ms for 1,300 variables on 2 CPUs) only when a
    record may be due, not after every batch."""
    from keras_lamb.callbacks import TrustRatioMonitor

    model = make_model()
    optimizer = make_optimizer(kind, gradient_accumulation_steps=accumulation)
    model.compile(optimizer, loss="mse")
    monitor = TrustRatioMonitor(every_n_steps=4)
    syncs, in_monitor = [], []
    keras_sync, monitor_hook = model.jax_state_sync, monitor.on_train_batch_end

    def counting_sync():
        syncs.extend(in_monitor)
        return keras_sync()

    def hook(batch, logs=None):
        in_monitor.append(batch)
        monitor_hook(batch, logs)
        in_monitor.clear()

    model.jax_state_sync, monitor.on_train_batch_end = counting_sync, hook
    x, y = make_data(64)
    # 32 batches: 32 optimizer steps, or 16 with accumulation over 2.
    history = model.fit(x, y, batch_size=2, epochs=1, shuffle=False,
                        callbacks=[monitor], verbose=0)
    steps = range(4, 33 if accumulation is None else 17, 4)
    assert [step for step, _ in monitor.records] == [1, *steps]
    if accumulation is None:
        assert len(syncs) == len(monitor.records)
    else:
        # The step is read at most `accumulation` times per record, since
        # the phase of the accumulation is not known on the host.
        assert len(syncs) <= accumulation * len(monitor.records)
    assert monitor.records[-1][1] == optimizer.trust_ratio_stats()
    first, last = monitor.records[0][1], monitor.records[-1][1]
    assert first["net/hidden/kernel"] != last["net/hidden/kernel"]
    adapted = [s["trust_ratio"] for p, s in last.items() if "norm" not in p]
    logs = history.history
    assert logs["trust_ratio/min"] == [pytest.approx(min(adapted))]
    assert logs["trust_ratio/max"] == [pytest.approx(max(adapted))]
    assert logs["trust_ratio/median"] == [pytest.approx(np.median(adapted))]
    assert loaded_tensorflow_modules() == []


def test_tensorboard_output_without_tensorflow_is_a_clear_error(tmp_path):
    from keras_lamb.callbacks import TrustRatioMonitor

    with pytest.raises(ImportError, match=r"log_dir=.*TensorFlow, which is "
                       r"not installed.*`pip install tensorflow`"):
        TrustRatioMonitor(log_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())
