"""Image classification models used by the ResNet scripts.

- `resnet50`: ResNet-50 **v1.5**, the MLPerf and NVIDIA variant: keras-hub's
  `ResNetBackbone` of bottleneck blocks without pre-activation, whose
  downsampling blocks put the stride 2 on the 3x3 convolution (and on the 1x1
  projection shortcut), plus global average pooling and a dense head.
  25,557,032 trainable weights with a 1000-way head, 25,610,152 with the batch
  norm moving statistics. Initialised as the MLPerf reference does:
  convolutions variance-scaling (fan-in, truncated normal), head N(0, 0.01).
- `resnet50_v1`: ResNet-50 **v1** from `keras.applications.ResNet50` (stride
  2 on the first 1x1 convolution of each downsampling block, He et al. 2015;
  about 0.5 % less accurate than v1.5; 25,636,712 weights).
- `small_resnet`: a CIFAR-style ResNet (He et al. 2015, section 4.2) of basic
  blocks for 28x28 / 32x32 inputs, with configurable depth and width, small
  enough to train on a CPU.

Both return logits (no softmax) so the loss is computed in float32 under mixed
precision.
"""

import re

import keras
from keras import layers

MODEL_NAMES = ("resnet50", "resnet50_v1", "small_resnet")

# The last batch norm of each bottleneck block (before the residual sum), by
# model: the layers `zero_init_residual` zeroes the scale of.
LAST_BLOCK_BN = {
    "resnet50": re.compile(r"^stack\d+_block\d+_3_bn$"),  # keras-hub
    "resnet50_v1": re.compile(r"^conv\d+_block\d+_3_bn$"),  # applications
}


def resnet50(input_shape=(224, 224, 3), num_classes=1000,
             zero_init_residual=False):
    """ResNet-50 v1.5 (keras-hub `ResNetBackbone`), randomly initialised.

    Args:
        input_shape: `(height, width, 3)`.
        num_classes: number of logits.
        zero_init_residual: start the scale (gamma) of each block's last
            batch norm at 0, so every residual block starts as the identity
            (Goyal et al. 2017, section 5.1). Off in the MLPerf reference.
    """
    import keras_hub  # imported here: only this model needs it

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="bottleneck_block",
        use_pre_activation=False,  # v1: batch norm and ReLU after each conv
        image_shape=tuple(input_shape),
    )
    x = layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    logits = layers.Dense(
        num_classes, name="logits", dtype="float32",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
    )(x)
    model = keras.Model(backbone.input, logits, name="resnet50_v1_5")
    # MLPerf's convolutions: variance scaling, fan-in, truncated normal
    # (keras-hub's default would be Glorot uniform). One initializer per
    # layer: each draws its own seed from Keras's global seed.
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            initializer = keras.initializers.VarianceScaling(
                1.0, "fan_in", "truncated_normal"
            )
            layer.kernel.assign(initializer(layer.kernel.shape))
    if zero_init_residual:
        zero_last_block_gammas(model, "resnet50")
    return model


def resnet50_v1(input_shape=(224, 224, 3), num_classes=1000,
                zero_init_residual=False):
    """ResNet-50 v1 from `keras.applications`, randomly initialised."""
    model = keras.applications.ResNet50(
        weights=None,
        include_top=True,
        input_shape=input_shape,
        classes=num_classes,
        classifier_activation=None,
    )
    if zero_init_residual:
        zero_last_block_gammas(model, "resnet50_v1")
    return model


def zero_last_block_gammas(model, name):
    """Sets the gamma of each block's last batch norm to 0 (Goyal et al.);
    returns the layer names."""
    zeroed = [layer.name for layer in model.layers
              if LAST_BLOCK_BN[name].match(layer.name)]
    if len(zeroed) != 16:  # 3 + 4 + 6 + 3 bottleneck blocks
        raise RuntimeError(
            f"{name}: expected 16 residual blocks, found {len(zeroed)} "
            f"({zeroed}); the layer names have changed."
        )
    for layer_name in zeroed:
        gamma = model.get_layer(layer_name).gamma
        gamma.assign(keras.ops.zeros_like(gamma))
    return zeroed


def _basic_block(x, filters, stride, name, sync_batchnorm, bn_momentum):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(
            filters, 1, strides=stride, use_bias=False,
            kernel_initializer="he_normal", name=f"{name}_0_conv",
        )(x)
        shortcut = layers.BatchNormalization(
            momentum=bn_momentum, synchronized=sync_batchnorm,
            name=f"{name}_0_bn",
        )(shortcut)
    x = layers.Conv2D(
        filters, 3, strides=stride, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=f"{name}_1_conv",
    )(x)
    x = layers.BatchNormalization(
        momentum=bn_momentum, synchronized=sync_batchnorm, name=f"{name}_1_bn"
    )(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = layers.Conv2D(
        filters, 3, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=f"{name}_2_conv",
    )(x)
    # Zero-init the last BN scale of each block (Goyal et al. 2017, 5.1):
    # every block starts as the identity, which large-batch runs rely on.
    x = layers.BatchNormalization(
        momentum=bn_momentum, synchronized=sync_batchnorm,
        gamma_initializer="zeros", name=f"{name}_2_bn",
    )(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def small_resnet(
    input_shape=(28, 28, 1),
    num_classes=10,
    widths=(16, 32, 64),
    blocks_per_stage=1,
    stem_stride=1,
    sync_batchnorm=False,
    bn_momentum=0.9,
):
    """A ResNet of basic blocks for small images.

    Args:
        input_shape: `(height, width, channels)`.
        num_classes: number of logits.
        widths: channels of each stage; every stage after the first halves
            the resolution. `(16, 32, 64)` with `blocks_per_stage=3` is
            ResNet-20 of He et al.
        blocks_per_stage: basic blocks per stage.
        stem_stride: stride of the 3x3 stem convolution (2 quarters the cost).
        sync_batchnorm: compute BatchNorm statistics over the global batch
            under a `tf.distribute` strategy (Keras `synchronized=True`), so
            the model's output does not depend on the replica count.
        bn_momentum: BatchNorm moving-average momentum.
    """
    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(
        widths[0], 3, strides=stem_stride, padding="same", use_bias=False,
        kernel_initializer="he_normal", name="stem_conv",
    )(inputs)
    x = layers.BatchNormalization(
        momentum=bn_momentum, synchronized=sync_batchnorm, name="stem_bn"
    )(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    for stage, filters in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(
                x, filters, stride, f"stage{stage + 1}_block{block + 1}",
                sync_batchnorm, bn_momentum,
            )
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="small_resnet")


def build_model(name, input_shape, num_classes, **kwargs):
    """The model called `name` (one of `MODEL_NAMES`); `resnet50` is v1.5."""
    if name == "resnet50":
        return resnet50(input_shape, num_classes, **kwargs)
    if name == "resnet50_v1":
        return resnet50_v1(input_shape, num_classes, **kwargs)
    if name == "small_resnet":
        return small_resnet(input_shape, num_classes, **kwargs)
    raise ValueError(
        f"Unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}."
    )
