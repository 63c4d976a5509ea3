"""ResNet-50 v1.5 (keras-hub ResNetBackbone): stride placement, parameter
count, the MLPerf LARS exclusions on its variable paths, zero-init option."""

import re

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("keras_hub")
flags = pytest.importorskip("absl.flags")

from keras_lamb import LARS, recipes  # noqa: E402
from keras_lamb.trust_ratio import ExclusionRule  # noqa: E402
from tpu_scripts.resnet import models  # noqa: E402


@pytest.fixture(scope="module")
def v15():
    keras.utils.set_random_seed(0)
    return models.build_model("resnet50", (224, 224, 3), 1000)


def strided_convs(model):
    """`{(kernel size, layer name)}` of the stride-2 convolutions."""
    return {
        (layer.kernel_size[0], layer.name) for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.strides == (2, 2)
    }


def test_v15_puts_the_stride_on_the_3x3_convolutions(v15):
    convs = strided_convs(v15)
    assert {(k, n) for k, n in convs if k == 3} == {
        (3, f"stack{s}_block0_2_conv") for s in (1, 2, 3)}
    # The 1x1 stride-2 convolutions are the projection shortcuts only.
    assert {(k, n) for k, n in convs if k == 1} == {
        (1, f"stack{s}_block0_0_conv") for s in (1, 2, 3)}
    assert convs - {(k, n) for k, n in convs if k in (1, 3)} == {
        (7, "conv1_conv")}
    # Spatial sizes: 224 -> 112 (stem) -> 56 (pool) -> 28 -> 14 -> 7.
    sizes = [v15.get_layer(f"stack{s}_block0_2_conv").output.shape[1]
             for s in range(4)]
    assert sizes == [56, 28, 14, 7]


def test_keras_applications_v1_is_the_negative_control():
    v1 = models.build_model("resnet50_v1", (224, 224, 3), 1000)
    convs = strided_convs(v1)
    assert sum(k == 3 for k, _ in convs) == 0  # v1: no stride on a 3x3
    assert sum(k == 1 for k, _ in convs) == 6
    assert v1.count_params() == 25_636_712


def test_v15_parameter_count(v15):
    # 25,557,032 trainable (torchvision's resnet50 count) + 53,120 batch
    # norm moving means and variances.
    assert v15.count_params() == 25_610_152
    trainable = sum(int(np.prod(v.shape)) for v in v15.trainable_variables)
    assert trainable == 25_557_032
    assert v15.output.shape == (None, 1000)
    assert v15.get_layer("logits").dtype_policy.compute_dtype == "float32"


def test_mlperf_lars_exclusions_match_the_keras_hub_paths(v15):
    optimizer, _, notes = recipes.lars_resnet50(32768, 44, 39)
    paths = [v.path for v in v15.trainable_variables]
    assert "stack2_block3_2_bn/gamma" in paths and "logits/bias" in paths
    for spec in (notes["exclude_from_weight_decay"],
                 notes["exclude_from_layer_adaptation"]):
        rule = ExclusionRule(spec, "test")
        for v in v15.trainable_variables:
            # Every batch norm gamma/beta and every bias; no kernel.
            expected = v.path.rsplit("/", 1)[-1] in ("gamma", "beta", "bias")
            assert rule.excludes(v) == expected, v.path
    excluded = [p for p in paths if not p.endswith("/kernel")]
    assert (len(paths), len(excluded)) == (161, 107)  # 53 convs + dense


def test_lars_step_leaves_excluded_variables_alone(v15):
    # Zero gradients: only weight decay (through the trust ratio) moves a
    # weight, so exactly the kernels move and batch norm / bias stay put.
    _, _, notes = recipes.lars_resnet50(4096, 40, 312)
    optimizer = LARS(
        learning_rate=1.0, weight_decay=notes["weight_decay"],
        exclude_from_weight_decay=notes["exclude_from_weight_decay"],
        exclude_from_layer_adaptation=notes["exclude_from_layer_adaptation"],
    )
    variables = v15.trainable_variables
    before = [keras.ops.convert_to_numpy(v).copy() for v in variables]
    optimizer.apply([keras.ops.zeros_like(v) for v in variables], variables)
    for v, old in zip(variables, before):
        moved = not np.array_equal(keras.ops.convert_to_numpy(v), old)
        kernel = v.path.endswith("/kernel")
        assert moved == (kernel and bool(np.any(old))), v.path
        v.assign(old)


def test_mlperf_initialisation(v15):
    head = keras.ops.convert_to_numpy(v15.get_layer("logits").kernel)
    assert abs(head.std() - 0.01) < 1e-3
    # Variance scaling, fan-in, truncated normal: std sqrt(1 / fan_in),
    # |w| < 2 untruncated std.
    kernel = keras.ops.convert_to_numpy(
        v15.get_layer("stack2_block0_1_conv").kernel)
    fan_in = np.prod(kernel.shape[:-1])
    assert abs(kernel.std() * np.sqrt(fan_in) - 1) < 0.05
    assert np.abs(kernel).max() <= 2 * np.sqrt(1 / fan_in) / 0.8796 + 1e-6


def test_script_builds_v15_and_zero_init_residual_is_an_option(v15):
    last = re.compile(r"^stack\d+_block\d+_3_bn$")
    gammas = [keras.ops.convert_to_numpy(layer.gamma)
              for layer in v15.layers if last.match(layer.name)]
    assert len(gammas) == 16 and all(np.all(g == 1) for g in gammas)
    # The script's model function, --model=resnet50 --zero_init_residual.
    from tpu_scripts.resnet import train as resnet_train

    values = flags.FlagValues()
    resnet_train.define_flags(values)
    values(["script", "--zero_init_residual"])
    small = resnet_train.build_model_fn(values, (32, 32, 3), 10)()
    assert small.name == "resnet50_v1_5" and small.output.shape[-1] == 10
    zeroed = [layer.name for layer in small.layers
              if getattr(layer, "gamma", None) is not None
              and not np.any(keras.ops.convert_to_numpy(layer.gamma))]
    assert sorted(zeroed) == sorted(
        layer.name for layer in small.layers if last.match(layer.name))
    # An identity-shortcut block now starts as the identity (inference: the
    # batch norm's moving statistics are 0 and 1, its output beta = 0).
    probe = keras.Model(small.input, [
        small.get_layer("stack1_block0_out").output,
        small.get_layer("stack1_block1_out").output,
    ])
    block_in, block_out = probe(
        np.random.default_rng(0).normal(size=(2, 32, 32, 3)), training=False)
    assert np.any(keras.ops.convert_to_numpy(block_in))
    np.testing.assert_array_equal(block_out, block_in)
