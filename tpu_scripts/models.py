"""Image classification models used by the ResNet scripts.

- `resnet50`: ResNet-50 **v1** from `keras.applications.ResNet50` (the stride
  sits on the first 1x1 convolution of each downsampling bottleneck, as in He
  et al. 2015). The MLPerf reference uses v1.5 (stride on the 3x3 convolution,
  about +0.5 % top-1 and ~12 % more FLOPs); Keras ships no v1.5, so results
  with this model are ResNet-50 v1 results.
- `small_resnet`: a CIFAR-style ResNet (He et al. 2015, section 4.2) of basic
  blocks for 28x28 / 32x32 inputs, with configurable depth and width, small
  enough to train on a CPU.

Both return logits (no softmax) so the loss is computed in float32 under mixed
precision.
"""

import keras
from keras import layers

MODEL_NAMES = ("resnet50", "small_resnet")


def resnet50(input_shape=(224, 224, 3), num_classes=1000):
    """ResNet-50 v1 from `keras.applications`, randomly initialised."""
    return keras.applications.ResNet50(
        weights=None,
        include_top=True,
        input_shape=input_shape,
        classes=num_classes,
        classifier_activation=None,
    )


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
    """The model called `name` (one of `MODEL_NAMES`)."""
    if name == "resnet50":
        return resnet50(input_shape, num_classes)
    if name == "small_resnet":
        return small_resnet(input_shape, num_classes, **kwargs)
    raise ValueError(
        f"Unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}."
    )
