"""LAMB and LARS under `keras.distribution` on JAX: sharded runs equal one
device.

`DataParallel` over 8 devices and `ModelParallel` over a 2x4 ("batch",
"model") mesh, with the Embedding and Dense kernels split on "model", take
the same steps as one device: weights, slots and trust-ratio statistics
agree to `TOL` after several `fit` steps. Needs the JAX backend and 8
devices: `test_jax_backend.py` runs this module in a process with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (8 virtual CPU devices).
"""

import contextlib
import re

import keras
import numpy as np
import pytest

import keras_lamb
from conftest import jax_device_count

DEVICES = 8
# Sharded against one device, float32: XLA sums partial norms across devices
# in another order than one device does.
TOL = dict(rtol=1e-6, atol=1e-6)


pytestmark = pytest.mark.skipif(
    jax_device_count() < DEVICES,
    reason="needs the JAX backend with 8 devices; run by "
    "test_jax_backend.py::test_keras_distribution_on_jax_backend",
)

VOCAB, SEQUENCE, BATCH = 16, 4, 16
# Different variables for the two rules: biases and LayerNorm skip weight
# decay, only LayerNorm skips layer adaptation.
EXCLUSIONS = dict(exclude_from_weight_decay=["bias", "norm"],
                  exclude_from_layer_adaptation="norm")
# Both clip at global norm 0.1 (the gradients' is about 1: the clip is active
# at every step). LAMB accumulates over 2 batches, as the BERT recipes do;
# LARS applies every batch. Compiling a step takes seconds on CPU, so each
# optimizer gets one of the two paths.
OPTIMIZERS = {
    "lamb": lambda **kw: keras_lamb.LAMB(**{
        "learning_rate": 0.02, "weight_decay": 0.01, **EXCLUSIONS,
        "global_clipnorm": 0.1, "gradient_accumulation_steps": 2,
        "track_trust_ratios": True, **kw}),
    "lars": lambda **kw: keras_lamb.LARS(**{
        "learning_rate": 0.5, "weight_decay": 0.01, "momentum": 0.9,
        **EXCLUSIONS, "global_clipnorm": 0.1, "track_trust_ratios": True,
        **kw}),
}
# 7 batches: LARS takes 7 steps; LAMB 3, with a fourth half accumulated.
STEPS = 7
SHARDED = {"embed/embeddings", "hidden/kernel", "out/kernel"}


def make_model():
    # Zeros, then `set_weights` from numpy: random initializers would be
    # compiled, per shape and per layout, on every build (seconds each).
    return keras.Sequential(
        [keras.Input((SEQUENCE,), dtype="int32"),
         keras.layers.Embedding(VOCAB, 8, embeddings_initializer="zeros",
                                name="embed"),
         keras.layers.LayerNormalization(name="norm"),
         keras.layers.Flatten(),
         keras.layers.Dense(8, activation="tanh", kernel_initializer="zeros",
                            name="hidden"),
         keras.layers.Dense(4, kernel_initializer="zeros", name="out")],
        name="net",
    )


def unscoped(path):
    # A loaded Sequential's variables lose the model's name from their paths
    # (Keras 3.15): "net/out/bias" comes back as "out/bias", and its
    # accumulator "lamb/net_out_bias_gradient_accumulator" as
    # "lamb/out_bias_gradient_accumulator".
    return re.sub(r"\bnet[/_]", "", path)


def initial_weights(model):
    """Nonzero weights, biases and LayerNorm offsets, so that every
    variable has a proper trust ratio."""
    rng = np.random.default_rng(1)
    return [
        (1.0 if v.path.endswith("gamma") else 0.0)
        + 0.3 * rng.standard_normal(v.shape).astype("float32")
        for v in model.weights
    ]


def make_data(n):
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (n, SEQUENCE)).astype("int32")
    y = rng.standard_normal((n, 4)).astype("float32")
    return x, y


def make_distribution(kind):
    from keras import distribution

    devices = distribution.list_devices()[:DEVICES]
    if kind == "data_parallel":
        return distribution.DataParallel(devices=devices)
    mesh = distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = distribution.LayoutMap(mesh)
    # Not anchored on the model's name, which loading drops.
    layout_map[".*embed/embeddings"] = (None, "model")
    layout_map[".*(hidden|out)/kernel"] = (None, "model")
    return distribution.ModelParallel(layout_map=layout_map,
                                      batch_dim_name="batch")


def scope(distribution):
    return distribution.scope() if distribution else contextlib.nullcontext()


def train(distribution, make_optimizer, steps=STEPS):
    """A model built, compiled and fit for `steps` batches of 16 under
    `distribution` (`None`: one device). The optimizer is made in the scope
    too: its step counter and learning rate are variables."""
    x, y = make_data(steps * BATCH)
    with scope(distribution):
        model = make_model()
        model.set_weights(initial_weights(model))
        model.compile(make_optimizer(), loss="mse")
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    return model


def state(model):
    """`(path, value)` of the weights and every optimizer variable, in order
    (slot paths repeat: `lamb/kernel_momentum` for each kernel)."""
    return [(unscoped(v.path), keras.ops.convert_to_numpy(v))
            for v in model.weights + model.optimizer.variables]


def assert_same_state(model, reference):
    """Weights, slots, accumulators, step and trust-ratio statistics."""
    actual, expected = state(model), state(reference)
    assert [p for p, _ in actual] == [p for p, _ in expected]
    for index, ((path, value), (_, want)) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(value, want, err_msg=f"#{index} {path}",
                                   **TOL)
    stats, expected_stats = (
        {unscoped(p): s for p, s in m.optimizer.trust_ratio_stats().items()}
        for m in (model, reference)
    )
    assert stats.keys() == expected_stats.keys()
    for path, values in expected_stats.items():
        for stat, value in values.items():
            np.testing.assert_allclose(stats[path][stat], value,
                                       err_msg=f"{stat} of {path}", **TOL)


def per_variable_state(optimizer, index):
    """The optimizer's variables that mirror trainable variable `index`:
    its slots, and its gradient accumulator when accumulating."""
    slots = list(optimizer._slots(index))
    if optimizer.gradient_accumulation_steps:
        slots.append(optimizer._accumulated_gradients[index])
    return slots


def assert_slots_sharded_like_variables(model, distribution_kind):
    optimizer = model.optimizer
    sharded = set()
    for index, variable in enumerate(optimizer._trainable_variables):
        sharding = variable.value.sharding
        if not sharding.is_fully_replicated:
            sharded.add(unscoped(variable.path))
        for slot in per_variable_state(optimizer, index):
            assert slot.value.sharding == sharding, (
                f"{slot.path}: {slot.value.sharding}, {variable.path}: "
                f"{sharding}")
    # The layout map is in force: exactly the kernels are split.
    assert sharded == (SHARDED if distribution_kind == "model_parallel"
                       else set())


_one_device, _sharded = {}, {}


def one_device(name):
    if name not in _one_device:
        _one_device[name] = train(None, OPTIMIZERS[name])
    return _one_device[name]


def sharded(name, distribution_kind):
    key = (name, distribution_kind)
    if key not in _sharded:
        _sharded[key] = train(make_distribution(distribution_kind),
                              OPTIMIZERS[name])
    return _sharded[key]


@pytest.mark.parametrize("distribution_kind",
                         ["data_parallel", "model_parallel"])
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_sharded_fit_equals_one_device(name, distribution_kind):
    """7 batches with weight decay, both exclusion rules and
    `global_clipnorm` (LAMB: and accumulation): weights, slots, accumulators
    and trust-ratio statistics equal one device's, and the per-variable
    optimizer state is laid out like its variable."""
    model = sharded(name, distribution_kind)
    assert int(model.optimizer.iterations) == (3 if name == "lamb" else 7)
    assert_same_state(model, one_device(name))
    assert_slots_sharded_like_variables(model, distribution_kind)


def test_negative_control():
    """Clipping each variable's gradient by its own norm (`clipnorm`), as
    clipping each shard or each replica's part would, rather than by the
    global norm: the comparison fails."""
    model = train(make_distribution("model_parallel"), lambda: OPTIMIZERS[
        "lamb"](global_clipnorm=None, clipnorm=0.1))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_same_state(model, one_device("lamb"))


def test_saved_sharded_model_continues_identically(tmp_path):
    """Saved to `.keras` mid-accumulation and loaded under the same
    distribution, the model is laid out as before and takes the same next
    step as the one that was saved."""
    distribution = make_distribution("model_parallel")
    # Taken out of the cache: it trains on.
    model = _sharded.pop(("lamb", "model_parallel"), None) or train(
        distribution, OPTIMIZERS["lamb"])
    accumulated = per_variable_state(model.optimizer, 0)[-1]
    assert np.abs(keras.ops.convert_to_numpy(accumulated)).max() > 0
    path = str(tmp_path / "sharded.keras")
    model.save(path)
    with distribution.scope():
        loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, keras_lamb.LAMB)
    assert_same_state(loaded, model)
    assert_slots_sharded_like_variables(loaded, "model_parallel")
    x, y = make_data(BATCH)
    for m in (model, loaded):
        with distribution.scope():
            m.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    assert int(loaded.optimizer.iterations) == 4
    assert_same_state(loaded, model)
