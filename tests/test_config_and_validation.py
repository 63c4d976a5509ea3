"""Hyperparameter checks and serialization of LAMB and LARS (backend-agnostic)."""

import math

import keras
import pytest

import keras_lamb

LAMB_NON_DEFAULT = dict(
    learning_rate=0.0123,
    beta_1=0.8,
    beta_2=0.95,
    epsilon=1e-4,
    weight_decay=0.02,
    exclude_from_weight_decay=["layer_norm", "bias$"],
    exclude_from_layer_adaptation="LayerNorm|bias",
    bias_correction=False,
    trust_ratio_bounds=[0.01, 10.0],
    clip_trust_ratio=True,
    track_trust_ratios=True,
    warn_unmatched_exclusions=False,
    clipnorm=None,
    global_clipnorm=1.0,
    use_ema=True,
    ema_momentum=0.9,
    ema_overwrite_frequency=7,
    loss_scale_factor=128.0,
    gradient_accumulation_steps=3,
    name="my_lamb",
)

LARS_NON_DEFAULT = dict(
    learning_rate=12.5,
    momentum=0.94,
    weight_decay=5e-5,
    trust_coefficient=2e-3,
    epsilon=1e-9,
    nesterov=True,
    exclude_from_weight_decay="bn|bias",
    exclude_from_layer_adaptation=["batch_norm"],
    clip_trust_ratio=True,
    track_trust_ratios=True,
    warn_unmatched_exclusions=False,
    clipvalue=5.0,
    use_ema=True,
    ema_momentum=0.5,
    loss_scale_factor=4.0,
    gradient_accumulation_steps=2,
    name="my_lars",
)


@pytest.mark.parametrize(
    "cls, kwargs",
    [(keras_lamb.LAMB, LAMB_NON_DEFAULT), (keras_lamb.LARS, LARS_NON_DEFAULT)],
)
def test_config_round_trip_with_every_argument_set(cls, kwargs):
    opt = cls(**kwargs)
    config = opt.get_config()
    for key, value in kwargs.items():
        if key == "learning_rate":
            assert config[key] == pytest.approx(value)
        elif key == "trust_ratio_bounds":
            assert list(config[key]) == list(value)
        else:
            assert config[key] == value, key
    # Through Keras's own (de)serialization, by registered name.
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is cls
    assert restored.get_config() == config


def test_registered_names():
    assert keras.saving.get_registered_object("keras_lamb>LAMB") is keras_lamb.LAMB
    assert keras.saving.get_registered_object("keras_lamb>LARS") is keras_lamb.LARS


def test_weight_decay_is_not_applied_by_base_class():
    # The base class must never apply decoupled decay on top of ours.
    opt = keras_lamb.LAMB(learning_rate=0.1, weight_decay=0.5)
    var = keras.Variable([1.0, 2.0])
    opt.build([var])
    opt._apply_weight_decay([var])
    assert keras.ops.convert_to_numpy(var).tolist() == [1.0, 2.0]


def test_callable_exclusion_is_used_but_cannot_be_serialized():
    opt = keras_lamb.LAMB(
        weight_decay=0.1, exclude_from_weight_decay=lambda v: "bias" in v.path
    )
    with keras.name_scope("dense"):
        kernel = keras.Variable([[1.0]], name="kernel")
        bias = keras.Variable([1.0], name="bias")
    opt.build([kernel, bias])
    assert opt._apply_decay == [True, False]
    with pytest.raises(ValueError, match="callable.*silently lose"):
        opt.get_config()


def test_exclusions_are_independent():
    opt = keras_lamb.LARS(exclude_from_weight_decay="bias")
    with keras.name_scope("dense"):
        kernel = keras.Variable([[1.0]], name="kernel")
        bias = keras.Variable([1.0], name="bias")
    opt.build([kernel, bias])
    assert opt._apply_decay == [True, False]
    assert opt._apply_adaptation == [True, True]


def test_exclude_from_weight_decay_method_adds_patterns():
    opt = keras_lamb.LAMB(weight_decay=0.1, exclude_from_weight_decay="bias")
    opt.exclude_from_weight_decay(var_names=["gamma"])
    assert opt.get_config()["exclude_from_weight_decay"] == ["bias", "gamma"]
    with pytest.raises(ValueError, match="var_list"):
        opt.exclude_from_weight_decay(var_list=[keras.Variable(1.0)])


BAD_LAMB = [
    (dict(learning_rate=-1.0), r"Argument `learning_rate` must be a finite number >= 0. Received: learning_rate=-1.0"),
    (dict(learning_rate=math.nan), r"Argument `learning_rate` must be .* Received: learning_rate=nan"),
    (dict(learning_rate=math.inf), r"Received: learning_rate=inf"),
    (dict(learning_rate="fast"), r"Argument `learning_rate` must be .* Received: learning_rate='fast'"),
    (dict(beta_1=1.5), r"Argument `beta_1` must be in \[0, 1\). Received: beta_1=1.5"),
    (dict(beta_1=1.0), r"Argument `beta_1` must be in \[0, 1\). Received: beta_1=1.0"),
    (dict(beta_2=-0.1), r"Argument `beta_2` must be in \[0, 1\). Received: beta_2=-0.1"),
    (dict(epsilon=-1e-6), r"Argument `epsilon` must be a finite number >= 0. Received: epsilon=-1e-06"),
    (dict(weight_decay=-0.01), r"Argument `weight_decay` must be a finite number >= 0. Received: weight_decay=-0.01"),
    (dict(weight_decay=math.nan), r"Argument `weight_decay` .* Received: weight_decay=nan"),
    (dict(trust_ratio_bounds=(2.0, 1.0)), r"Argument `trust_ratio_bounds` .*lower <= upper. Received: trust_ratio_bounds=\(2.0, 1.0\)"),
    (dict(trust_ratio_bounds=(-1.0, 1.0)), r"Argument `trust_ratio_bounds` .* Received: trust_ratio_bounds=\(-1.0, 1.0\)"),
    (dict(trust_ratio_bounds=1.0), r"Argument `trust_ratio_bounds` .* Received: trust_ratio_bounds=1.0"),
    (dict(bias_correction="yes"), r"Argument `bias_correction` must be a bool. Received: bias_correction='yes'"),
    (dict(clip_trust_ratio=1), r"Argument `clip_trust_ratio` must be a bool. Received: clip_trust_ratio=1"),
    (dict(exclude_from_weight_decay=3), r"Argument `exclude_from_weight_decay` must be None, a regular expression .* Received: exclude_from_weight_decay=3"),
    (dict(exclude_from_layer_adaptation=["bias", 1]), r"Argument `exclude_from_layer_adaptation` must be .* Received: exclude_from_layer_adaptation=\['bias', 1\]"),
    (dict(exclude_from_layer_adaptation="bias("), r"Argument `exclude_from_layer_adaptation` contains an invalid regular expression 'bias\('"),
    (dict(track_trust_ratios=1), r"Argument `track_trust_ratios` must be a bool"),
    (dict(warn_unmatched_exclusions="no"),
     r"Argument `warn_unmatched_exclusions` must be a bool"),
]

BAD_LARS = [
    (dict(learning_rate=-0.1), r"Argument `learning_rate` must be a finite number >= 0. Received: learning_rate=-0.1"),
    (dict(momentum=1.0), r"Argument `momentum` must be in \[0, 1\). Received: momentum=1.0"),
    (dict(momentum=-0.5), r"Argument `momentum` must be in \[0, 1\). Received: momentum=-0.5"),
    (dict(weight_decay=-1e-4), r"Argument `weight_decay` must be a finite number >= 0. Received: weight_decay=-0.0001"),
    (dict(trust_coefficient=0.0), r"Argument `trust_coefficient` must be a finite number > 0. Received: trust_coefficient=0.0"),
    (dict(trust_coefficient=-1e-3), r"Argument `trust_coefficient` must be a finite number > 0"),
    (dict(epsilon=-1.0), r"Argument `epsilon` must be a finite number >= 0. Received: epsilon=-1.0"),
    (dict(nesterov=None), r"Argument `nesterov` must be a bool. Received: nesterov=None"),
    (dict(clip_trust_ratio="no"), r"Argument `clip_trust_ratio` must be a bool"),
    (dict(exclude_from_weight_decay="[bn"), r"Argument `exclude_from_weight_decay` contains an invalid regular expression '\[bn'"),
    (dict(exclude_from_weight_decay={"bn": 1}), r"Argument `exclude_from_weight_decay` must be None"),
]


@pytest.mark.parametrize("kwargs, message", BAD_LAMB, ids=[m[:40] for _, m in BAD_LAMB])
def test_lamb_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_lamb.LAMB(**kwargs)


@pytest.mark.parametrize("kwargs, message", BAD_LARS, ids=[m[:40] for _, m in BAD_LARS])
def test_lars_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_lamb.LARS(**kwargs)


def test_integer_learning_rate_and_schedule_are_accepted():
    assert keras_lamb.LARS(learning_rate=10).get_config()["learning_rate"] == 10.0
    schedule = keras.optimizers.schedules.PolynomialDecay(1e-3, 100, power=2.0)
    config = keras_lamb.LAMB(learning_rate=schedule).get_config()
    restored = keras_lamb.LAMB.from_config(config)
    assert float(restored._learning_rate(10)) == pytest.approx(float(schedule(10)))
