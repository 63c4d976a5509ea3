"""LAMB and LARS inside real Keras training: fit, XLA, saving, mixed precision,
gradient accumulation, EMA, sparse gradients. Backend-agnostic unless marked."""

import os

import keras
import numpy as np
import pytest

import keras_lamb
from conftest import BACKEND, TOLERANCES, make_gradients, make_variables, mask, run_lockstep
from reference import NumpyLAMB

tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow backend only")

OPTIMIZERS = {
    "lamb": lambda **kw: keras_lamb.LAMB(
        learning_rate=5e-2, weight_decay=0.01,
        exclude_from_weight_decay="bias", exclude_from_layer_adaptation="bias", **kw),
    "lars": lambda **kw: keras_lamb.LARS(
        learning_rate=0.1, trust_coefficient=0.02,
        exclude_from_weight_decay="bias", exclude_from_layer_adaptation="bias", **kw),
}


def make_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype("float32")
    y = (x @ rng.standard_normal((6, 1)) + 0.1).astype("float32")
    return x, y


def make_model(seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh", dtype=dtype),
         keras.layers.Dense(1, dtype=dtype)]
    )


def weights(model):
    return [np.array(w) for w in model.get_weights()]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fit_reduces_loss(name):
    x, y = make_data()
    model = make_model()
    model.compile(optimizer=OPTIMIZERS[name](), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=10, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]


def compiled_graphs():
    """torch: the graphs torch.compile made so far (None elsewhere)."""
    if BACKEND != "torch":
        return None
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_jit_compiled_fit_matches_eager_and_does_not_retrace(name):
    x, y = make_data()
    traces = {"n": 0}

    class Counting(type(OPTIMIZERS[name]())):
        def update_step(self, gradient, variable, learning_rate):
            traces["n"] += 1
            return super().update_step(gradient, variable, learning_rate)

    base_config = OPTIMIZERS[name]().get_config()
    compiled, eager = make_model(), make_model()
    # torch.compile guards on the counter itself (a changed Python int
    # recompiles): there the compiled graphs are counted instead.
    counting = Counting if BACKEND != "torch" else type(OPTIMIZERS[name]())
    compiled.compile(optimizer=counting.from_config(base_config), loss="mse",
                     jit_compile=True)
    eager.compile(optimizer=OPTIMIZERS[name](), loss="mse", run_eagerly=True)
    compiled.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    after_first_epoch, graphs = traces["n"], compiled_graphs()
    assert after_first_epoch > 0 or BACKEND == "torch"
    compiled.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    if BACKEND == "torch":
        assert graphs > 0 and compiled_graphs() == graphs
    else:
        # Python-side update_step runs only while tracing: no retrace, no
        # recompile.
        assert traces["n"] == after_first_epoch
    eager.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
    for a, b in zip(weights(compiled), weights(eager)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@tf_only
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_custom_xla_loop(name):
    import tensorflow as tf

    x, y = make_data()
    model = make_model()
    optimizer = OPTIMIZERS[name]()
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=True)
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    losses = [float(train_step(x[i:i + 16], y[i:i + 16])) for i in range(0, 64, 16)] * 1
    for _ in range(4):
        losses.append(float(train_step(x[:16], y[:16])))
    assert train_step.experimental_get_tracing_count() == 1
    assert losses[-1] < losses[0]
    assert int(optimizer.iterations) == 8


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_keras_save_load_mid_training_gives_the_same_next_step(name, tmp_path):
    x, y = make_data()
    model = make_model()
    model.compile(optimizer=OPTIMIZERS[name](), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 8
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(weights(model), weights(loaded)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mixed_float16_with_loss_scaling(name):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        x, y = make_data()
        model = make_model()
        model.compile(optimizer=OPTIMIZERS[name](), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        history = model.fit(x, y, batch_size=16, epochs=5, verbose=0, shuffle=False)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(w.dtype == "float32" for w in model.trainable_weights)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mixed_bfloat16(name):
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        x, y = make_data()
        model = make_model()
        model.compile(optimizer=OPTIMIZERS[name](), loss="mse")
        history = model.fit(x, y, batch_size=16, epochs=5, verbose=0, shuffle=False)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def apply_stateful(optimizer, grads, variables):
    """`optimizer.apply`; on JAX through `stateless_apply`, as `fit` does
    (Keras's eager `LossScaleOptimizer.apply` leaks tracers on JAX, for its
    own Adam too)."""
    if BACKEND != "jax":
        return optimizer.apply(grads, variables)
    if not optimizer.built:
        optimizer.build(variables)
    new_vars, new_opt_vars = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], grads, [v.value for v in variables])
    for var, value in zip(variables, new_vars):
        var.assign(value)
    for var, value in zip(optimizer.variables, new_opt_vars):
        var.assign(value)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_loss_scale_optimizer_skips_non_finite_steps(name):
    variables = make_variables()
    before = [np.array(v) for v in variables]
    optimizer = keras.optimizers.LossScaleOptimizer(OPTIMIZERS[name]())
    grads = [keras.ops.convert_to_tensor(g, "float32") for g in make_gradients(0)]
    grads[1] = grads[1] * np.nan
    apply_stateful(optimizer, grads, variables)
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(np.array(v), b)
    assert int(optimizer.inner_optimizer.iterations) == 0
    finite = [keras.ops.convert_to_tensor(g, "float32") for g in make_gradients(1)]
    apply_stateful(optimizer, finite, variables)
    assert not np.array_equal(np.array(variables[0]), before[0])


def test_bfloat16_variables_follow_the_reference_with_float32_norms():
    opt = keras_lamb.LAMB(learning_rate=0.05, weight_decay=0.1,
                          exclude_from_weight_decay="layer_norm",
                          exclude_from_layer_adaptation="bias")
    ref = NumpyLAMB(0.05, weight_decay=0.1, decay_mask=mask("layer_norm"),
                    adapt_mask=mask("bias"))
    variables = run_lockstep(opt, ref, steps=3, dtype="bfloat16")
    assert all(v.dtype == "bfloat16" for v in variables)
    assert all(m.dtype == "bfloat16" for m in opt._momentums)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_gradient_accumulation_equals_one_larger_batch(name):
    accumulated, single = make_variables(), make_variables()
    opt_acc = OPTIMIZERS[name](gradient_accumulation_steps=2)
    opt_one = OPTIMIZERS[name]()
    for step in range(3):
        g1, g2 = make_gradients(2 * step), make_gradients(2 * step + 1)
        opt_acc.apply([keras.ops.convert_to_tensor(g, "float32") for g in g1], accumulated)
        opt_acc.apply([keras.ops.convert_to_tensor(g, "float32") for g in g2], accumulated)
        mean = [keras.ops.convert_to_tensor((a + b) / 2, "float32") for a, b in zip(g1, g2)]
        opt_one.apply(mean, single)
    for a, b in zip(accumulated, single):
        np.testing.assert_allclose(np.array(a), np.array(b), **TOLERANCES["float32"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ema_tracks_the_weights(name):
    with_ema, plain = make_variables(), make_variables()
    opt_ema = OPTIMIZERS[name](use_ema=True, ema_momentum=0.8)
    opt_plain = OPTIMIZERS[name]()
    expected = None
    for step in range(4):
        grads = [keras.ops.convert_to_tensor(g, "float32") for g in make_gradients(step)]
        opt_ema.apply(grads, with_ema)
        opt_plain.apply(grads, plain)
        current = [np.array(v, dtype="float64") for v in plain]
        expected = current if expected is None else [
            0.8 * e + 0.2 * c for e, c in zip(expected, current)]
    for a, b in zip(with_ema, plain):  # EMA does not change the trajectory
        np.testing.assert_allclose(np.array(a), np.array(b), **TOLERANCES["float32"])
    opt_ema.finalize_variable_values(with_ema)
    for v, e in zip(with_ema, expected):
        np.testing.assert_allclose(np.array(v), e, **TOLERANCES["float32"])


@tf_only
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sparse_embedding_gradient_equals_dense(name):
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    layer = keras.layers.Embedding(10, 4)
    layer.build((None,))
    ids = tf.constant([[1, 3, 3], [7, 1, 0]])  # duplicate ids: summed rows
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(ids) - 0.3))
    (sparse,) = tape.gradient(loss, layer.trainable_variables)
    assert isinstance(sparse, tf.IndexedSlices)
    dense = tf.convert_to_tensor(sparse)
    start = layer.embeddings.numpy()
    results = []
    for grad in (sparse, dense):
        var = keras.Variable(start, name="embeddings")
        opt = OPTIMIZERS[name](warn_unmatched_exclusions=False)  # no bias
        for _ in range(3):
            opt.apply([grad], [var])
        results.append(np.array(var))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)
    assert not np.allclose(results[0], start)
