"""Exclusion patterns that match no variable are reported, never silent
(backend-agnostic; also rerun on JAX by test_jax_backend.py)."""

import re
import warnings

import keras
import pytest

import keras_lamb
from keras_lamb.recipes import BERT_EXCLUDE, RESNET_EXCLUDE


def small_model():
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, name="dense"),
        keras.layers.LayerNormalization(name="layer_norm"),
        keras.layers.Dense(1, name="head"),
    ], name="net")


def build_warnings(optimizer, variables):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.build(variables)
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning)
            and "warn_unmatched_exclusions" in str(w.message)]


@pytest.mark.parametrize("cls", [keras_lamb.LAMB, keras_lamb.LARS])
def test_a_pattern_that_matches_nothing_is_reported_with_example_paths(cls):
    # The users' most common LAMB complaint: a pattern in the wrong naming
    # convention leaves every LayerNorm and bias decayed and adapted.
    optimizer = cls(weight_decay=0.01,
                    exclude_from_weight_decay="LayerNormXX|biasXX",
                    exclude_from_layer_adaptation=["layer_norm", "gammaX"])
    messages = build_warnings(optimizer, small_model().trainable_variables)
    assert len(messages) == 2, messages
    decay, adaptation = messages
    assert re.search(r"the pattern 'LayerNormXX\|biasXX' of "
                     r"`exclude_from_weight_decay` matches none of the 6 "
                     r"variables", decay)
    assert "'net/dense/kernel'" in decay and "2 more" in decay
    assert "the pattern 'gammaX' of `exclude_from_layer_adaptation`" in (
        adaptation)
    # The optimizer still does what it was told: every variable decayed.
    assert all(optimizer._apply_decay)


@pytest.mark.parametrize("cls", [keras_lamb.LAMB, keras_lamb.LARS])
def test_matching_patterns_and_the_opt_out_are_quiet(cls):
    variables = small_model().trainable_variables
    matching = dict(weight_decay=0.01, exclude_from_weight_decay="layer_norm",
                    exclude_from_layer_adaptation=["bias", "gamma|beta"])
    assert build_warnings(cls(**matching), variables) == []
    # A model without biases, on purpose: the opt-out.
    unmatched = dict(weight_decay=0.01, exclude_from_weight_decay="no_such",
                     exclude_from_layer_adaptation="no_such")
    assert build_warnings(cls(**unmatched, warn_unmatched_exclusions=False),
                          variables) == []
    # Without weight decay its exclusions change nothing: not reported.
    messages = build_warnings(cls(**dict(unmatched, weight_decay=0.0)),
                              variables)
    assert [("exclude_from_layer_adaptation" in m) for m in messages] == [True]


def test_exclusions_lists_what_each_pattern_matches():
    model = small_model()
    optimizer = keras_lamb.LAMB(
        weight_decay=0.01, exclude_from_weight_decay=["layer_norm", "bias$"],
        exclude_from_layer_adaptation=lambda v: "head" in v.path,
        warn_unmatched_exclusions=False)
    with pytest.raises(ValueError, match="not built yet: pass `var_list`"):
        optimizer.exclusions()
    assert optimizer.exclusions(model.trainable_variables)[
        "exclude_from_weight_decay"]["bias$"] == [
        "net/dense/bias", "net/head/bias"]
    optimizer.build(model.trainable_variables)
    assert optimizer.exclusions() == {
        "exclude_from_weight_decay": {
            "layer_norm": ["net/layer_norm/gamma",
                           "net/layer_norm/beta"],
            "bias$": ["net/dense/bias", "net/head/bias"],
        },
        "exclude_from_layer_adaptation": {
            "<callable>": ["net/head/kernel", "net/head/bias"],
        },
    }


def test_the_recipes_patterns_match_keras_hub_bert_and_resnet():
    keras_hub = pytest.importorskip("keras_hub")
    bert = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=16)
    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64], stackwise_num_blocks=[1],
        stackwise_num_strides=[1], block_type="bottleneck_block",
        use_pre_activation=False, image_shape=(16, 16, 3))
    for model, pattern, kinds in ((bert, BERT_EXCLUDE, ("layer_norm", "bias")),
                                  (resnet, RESNET_EXCLUDE, ("bn",))):
        optimizer = keras_lamb.LAMB(weight_decay=0.01,
                                    exclude_from_weight_decay=pattern,
                                    exclude_from_layer_adaptation=pattern)
        assert build_warnings(optimizer, model.trainable_variables) == []
        matched = optimizer.exclusions()["exclude_from_weight_decay"][pattern]
        for kind in kinds:
            assert any(kind in path for path in matched), (kind, matched)
        assert not any("kernel" in path and "bn" not in path
                       for path in matched)
