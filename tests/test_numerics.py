"""LAMB and LARS against the numpy reference of the papers' equations.

Backend-agnostic: runs under TensorFlow in the main suite and again under JAX
(tests/test_jax_backend.py).
"""

import keras
import numpy as np
import pytest

import keras_lamb
from conftest import BACKEND, make_variables, mask, run_lockstep
from reference import NumpyLAMB, NumpyLARS

LR = 0.05
WD = 0.1


def lamb_pair(**kwargs):
    """A LAMB and its numpy reference with the same settings."""
    ref_kwargs = dict(
        beta_1=kwargs.get("beta_1", 0.9),
        beta_2=kwargs.get("beta_2", 0.999),
        epsilon=kwargs.get("epsilon", 1e-6),
        weight_decay=kwargs.get("weight_decay", WD),
        bias_correction=kwargs.get("bias_correction", True),
        bounds=kwargs.get("trust_ratio_bounds"),
        clip=kwargs.get("clip_trust_ratio", False),
        decay_mask=mask("layer_norm"),
        adapt_mask=mask("bias"),
    )
    opt = keras_lamb.LAMB(
        learning_rate=LR,
        weight_decay=WD,
        exclude_from_weight_decay="layer_norm",
        exclude_from_layer_adaptation=["bias"],
        **{k: v for k, v in kwargs.items() if k != "weight_decay"},
    )
    return opt, NumpyLAMB(LR, **ref_kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias_correction": False},
        {"trust_ratio_bounds": (0.05, 2.0)},
        {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3},
        {"clip_trust_ratio": True},
    ],
    ids=["paper", "no_bias_correction", "bounds", "other_betas", "lambc"],
)
def test_lamb_matches_reference(kwargs):
    opt, ref = lamb_pair(**kwargs)
    run_lockstep(opt, ref)


def test_lambc_clip_changes_the_step():
    # Negative control: some ratios of the test variables exceed 1, so the
    # clipped optimizer fails the unclipped reference (and the reverse).
    opt, _ = lamb_pair(clip_trust_ratio=True)
    _, unclipped = lamb_pair()
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        run_lockstep(opt, unclipped)
    opt, _ = lamb_pair()
    _, clipped = lamb_pair(clip_trust_ratio=True)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        run_lockstep(opt, clipped)


def timm_lamb_trust_ratio(w_norm, g_norm, trust_clip):
    """timm's `_lamb_trust_ratio` (timm/optim/lamb.py), rewritten in NumPy:
    the ratio, 1 where either norm is 0, then clamped to at most 1."""
    ratio = w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
    return min(ratio, 1.0) if trust_clip else ratio


def test_clip_trust_ratio_is_timms_trust_clip():
    opt = keras_lamb.LAMB(clip_trust_ratio=True)
    for w_norm, u_norm in [(3.0, 1.0), (0.5, 2.0), (0.0, 1.0), (2.0, 0.0),
                           (1.0, 1.0)]:
        ours = float(keras.ops.convert_to_numpy(opt._trust_ratio(
            keras.ops.convert_to_tensor(w_norm, "float32"),
            keras.ops.convert_to_tensor(u_norm, "float32"))))
        assert ours == pytest.approx(
            timm_lamb_trust_ratio(w_norm, u_norm, True)), (w_norm, u_norm)


def test_lamb_zero_variable_falls_back_to_ratio_one():
    # ||w|| = 0: the step is a plain Adam step with r = 1, not a frozen variable.
    opt, ref = lamb_pair()
    variables = run_lockstep(opt, ref, steps=1)
    zeros = keras.ops.convert_to_numpy(variables[2])
    np.testing.assert_allclose(np.abs(zeros), LR, rtol=1e-4)


def test_keras_lamb_with_weight_decay_fails_the_same_check():
    # Negative control: keras.optimizers.Lamb decays outside the trust ratio.
    opt = keras.optimizers.Lamb(learning_rate=LR, weight_decay=WD, epsilon=1e-6)
    opt.exclude_from_weight_decay(var_names=["gamma"])
    ref = NumpyLAMB(LR, weight_decay=WD, decay_mask=mask("layer_norm"))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        run_lockstep(opt, ref)


def test_adam_fails_the_same_check():
    opt = keras.optimizers.Adam(learning_rate=LR, epsilon=1e-6)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        run_lockstep(opt, NumpyLAMB(LR, weight_decay=0.0))


def test_lamb_without_weight_decay_equals_keras_lamb():
    ours, theirs = make_variables(), make_variables()
    lamb = keras_lamb.LAMB(learning_rate=LR, epsilon=1e-6)
    keras_lamb_ = keras.optimizers.Lamb(learning_rate=LR, epsilon=1e-6)
    from conftest import make_gradients

    for step in range(5):
        grads = [keras.ops.convert_to_tensor(g, "float32") for g in make_gradients(step)]
        lamb.apply(grads, ours)
        keras_lamb_.apply(grads, theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
            rtol=1e-5, atol=1e-6,
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"nesterov": True},
        {"clip_trust_ratio": True},
        {"epsilon": 1e-3, "momentum": 0.5, "trust_coefficient": 0.02},
    ],
    ids=["mlperf", "nesterov", "larc_clip", "other"],
)
def test_lars_matches_reference(kwargs):
    lr = 2.0
    opt = keras_lamb.LARS(
        learning_rate=lr,
        weight_decay=WD,
        exclude_from_weight_decay="layer_norm",
        exclude_from_layer_adaptation="bias",
        **kwargs,
    )
    ref = NumpyLARS(
        lr,
        momentum=kwargs.get("momentum", 0.9),
        weight_decay=WD,
        eta=kwargs.get("trust_coefficient", 1e-3),
        epsilon=kwargs.get("epsilon", 0.0),
        nesterov=kwargs.get("nesterov", False),
        clip=kwargs.get("clip_trust_ratio", False),
        decay_mask=mask("layer_norm"),
        adapt_mask=mask("bias"),
    )
    run_lockstep(opt, ref)


def test_lars_clip_keeps_effective_rate_below_global_rate():
    # With a small global rate the clip is active for the big-norm variables.
    lr = 1e-4
    opt = keras_lamb.LARS(
        learning_rate=lr, trust_coefficient=0.5, clip_trust_ratio=True,
        track_trust_ratios=True,
    )
    variables = make_variables()
    from conftest import make_gradients

    opt.apply([keras.ops.convert_to_tensor(g, "float32") for g in make_gradients(0)], variables)
    rates = [s["learning_rate"] for s in opt.trust_ratio_stats().values()]
    assert max(rates) <= lr * (1 + 1e-6)
    assert any(r == pytest.approx(lr) for r in rates)


def test_sgd_momentum_fails_the_lars_check():
    opt = keras.optimizers.SGD(learning_rate=2.0, momentum=0.9)
    ref = NumpyLARS(2.0, weight_decay=0.0)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        run_lockstep(opt, ref)


def test_trust_ratio_stats_equal_hand_computation():
    opt = keras_lamb.LAMB(learning_rate=LR, weight_decay=WD, track_trust_ratios=True,
                          exclude_from_layer_adaptation="bias")
    variables = make_variables()
    before = [keras.ops.convert_to_numpy(v).astype("float64") for v in variables]
    from conftest import make_gradients

    grads = make_gradients(0)
    opt.apply([keras.ops.convert_to_tensor(g, "float32") for g in grads], variables)
    stats = opt.trust_ratio_stats()
    for v, w, g in zip(variables, before, grads):
        # First step, bias-corrected: m_hat = g, v_hat = g^2.
        u = g / (np.abs(g) + 1e-6) + WD * w
        w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(u)
        ratio = w_norm / u_norm if w_norm > 0 and "bias" not in v.path else 1.0
        s = stats[v.path]
        assert s["weight_norm"] == pytest.approx(w_norm, rel=1e-5)
        assert s["update_norm"] == pytest.approx(u_norm, rel=1e-5)
        assert s["trust_ratio"] == pytest.approx(ratio, rel=1e-5)
        assert s["learning_rate"] == pytest.approx(LR * ratio, rel=1e-5)


def test_tracking_off_adds_no_variables():
    plain, tracked = keras_lamb.LAMB(), keras_lamb.LAMB(track_trust_ratios=True)
    plain.build(make_variables())
    tracked.build(make_variables())
    n = len(make_variables())
    # iteration + learning rate + (m, v) per variable
    assert len(plain.variables) == 2 + 2 * n
    assert len(tracked.variables) == 2 + 6 * n
    with pytest.raises(ValueError, match="track_trust_ratios=True"):
        plain.trust_ratio_stats()


@pytest.mark.skipif(BACKEND != "jax", reason="optax runs on the JAX backend")
def test_lamb_equals_optax_lamb():
    import jax.numpy as jnp
    import optax

    from conftest import make_gradients

    decay = mask("layer_norm")
    tx = optax.lamb(LR, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0,
                    weight_decay=WD, mask=decay)
    params = [jnp.asarray(keras.ops.convert_to_numpy(v)) for v in make_variables()]
    state = tx.init(params)
    ours = make_variables()
    opt = keras_lamb.LAMB(learning_rate=LR, weight_decay=WD,
                          exclude_from_weight_decay="layer_norm")
    for step in range(5):
        grads = [jnp.asarray(g, jnp.float32) for g in make_gradients(step)]
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        opt.apply(grads, ours)
    for a, b in zip(ours, params):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), np.asarray(b),
                                   rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="optax runs on the JAX backend")
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_equals_optax_lars_without_weight_decay(nesterov):
    # optax divides by ||g + wd w|| where MLPerf LARS divides by
    # ||g|| + wd ||w||; the two coincide only for wd = 0.
    import jax.numpy as jnp
    import optax

    from conftest import make_gradients

    adapt = mask("bias")
    tx = optax.lars(2.0, weight_decay=0.0, trust_coefficient=1e-3, eps=0.0,
                    trust_ratio_mask=adapt, momentum=0.9, nesterov=nesterov)
    params = [jnp.asarray(keras.ops.convert_to_numpy(v)) for v in make_variables()]
    state = tx.init(params)
    ours = make_variables()
    opt = keras_lamb.LARS(learning_rate=2.0, weight_decay=0.0, nesterov=nesterov,
                          exclude_from_layer_adaptation="bias")
    for step in range(5):
        grads = [jnp.asarray(g, jnp.float32) for g in make_gradients(step)]
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        opt.apply(grads, ours)
    for a, b in zip(ours, params):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), np.asarray(b),
                                   rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("cls", [keras_lamb.LAMB, keras_lamb.LARS])
def test_trust_ratio_stats_read_the_device_once(cls, monkeypatch):
    """One device-to-host transfer per call, whatever the variable count,
    with the values the per-variable statistics hold and the adaptation
    flags of the exclusion rule."""
    variables = [keras.Variable(np.full((3, 2), 0.5 + i), name=f"kernel{i}")
                 for i in range(12)]
    variables += [keras.Variable(np.full((2,), 0.1), name="bias")]
    opt = cls(learning_rate=LR, exclude_from_layer_adaptation="bias",
              track_trust_ratios=True)
    opt.apply([keras.ops.ones(v.shape) for v in variables], variables)
    expected = {
        v.path: [float(keras.ops.convert_to_numpy(opt._stats[s][i]))
                 for s in ("weight_norm", "update_norm", "trust_ratio",
                           "learning_rate")]
        for i, v in enumerate(variables)
    }
    reads = []
    to_numpy = keras.ops.convert_to_numpy
    monkeypatch.setattr(keras.ops, "convert_to_numpy",
                        lambda x: reads.append(1) or to_numpy(x))
    stats = opt.trust_ratio_stats()
    assert len(reads) == 1
    assert list(stats) == [v.path for v in variables]
    for path, values in stats.items():
        assert [values[s] for s in ("weight_norm", "update_norm",
                                    "trust_ratio", "learning_rate")] == (
            expected[path])
        assert values["adapted"] is (path != "bias")
    # Each kernel has its own norms, so rows were not mixed up.
    assert len({s["weight_norm"] for s in stats.values()}) == 13


def test_update_norm_of_names_the_norm_in_the_ratio():
    assert keras_lamb.LARS.update_norm_of == "g"
    assert keras_lamb.LAMB.update_norm_of == "u"
    # LARS: update_norm is ||g|| (here a gradient of ones, not the step).
    w = keras.Variable(np.full((4,), 2.0), name="w")
    opt = keras_lamb.LARS(learning_rate=LR, track_trust_ratios=True)
    opt.apply([keras.ops.ones((4,))], [w])
    assert opt.trust_ratio_stats()[w.path]["update_norm"] == pytest.approx(2.0)
