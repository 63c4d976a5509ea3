"""Parameter shapes of well-known models, generated from their architectures.

No weights are downloaded: an optimizer step only depends on the number,
shapes and names of the trainable tensors, which these functions list in the
order the reference implementations create them.
"""

import math

__all__ = ["SHAPE_SETS", "bert", "resnet50", "smoke", "shape_set"]


def bert(layers, hidden, intermediate, vocab=30522, positions=512,
         token_types=2):
    """BERT with its pre-training heads (masked LM and next sentence).

    BERT-base: `bert(12, 768, 3072)`, 110 M parameters in 206 tensors.
    BERT-large: `bert(24, 1024, 4096)`, 336 M parameters in 398 tensors.
    """
    shapes = [
        ("embeddings/word_embeddings", (vocab, hidden)),
        ("embeddings/position_embeddings", (positions, hidden)),
        ("embeddings/token_type_embeddings", (token_types, hidden)),
        ("embeddings/layer_norm/gamma", (hidden,)),
        ("embeddings/layer_norm/beta", (hidden,)),
    ]
    for i in range(layers):
        p = f"encoder/layer_{i}"
        for name in ("query", "key", "value"):
            shapes += [(f"{p}/attention/{name}/kernel", (hidden, hidden)),
                       (f"{p}/attention/{name}/bias", (hidden,))]
        shapes += [
            (f"{p}/attention/output/kernel", (hidden, hidden)),
            (f"{p}/attention/output/bias", (hidden,)),
            (f"{p}/attention/layer_norm/gamma", (hidden,)),
            (f"{p}/attention/layer_norm/beta", (hidden,)),
            (f"{p}/intermediate/kernel", (hidden, intermediate)),
            (f"{p}/intermediate/bias", (intermediate,)),
            (f"{p}/output/kernel", (intermediate, hidden)),
            (f"{p}/output/bias", (hidden,)),
            (f"{p}/output/layer_norm/gamma", (hidden,)),
            (f"{p}/output/layer_norm/beta", (hidden,)),
        ]
    shapes += [
        ("pooler/kernel", (hidden, hidden)),
        ("pooler/bias", (hidden,)),
        ("mlm/transform/kernel", (hidden, hidden)),
        ("mlm/transform/bias", (hidden,)),
        ("mlm/transform/layer_norm/gamma", (hidden,)),
        ("mlm/transform/layer_norm/beta", (hidden,)),
        ("mlm/output_bias", (vocab,)),
        ("nsp/kernel", (hidden, 2)),
        ("nsp/bias", (2,)),
    ]
    return shapes


def resnet50(classes=1000):
    """`keras.applications.ResNet50`: 25.6 M parameters in 214 tensors.

    Every convolution has a bias and is followed by a batch normalization
    whose trainable tensors are gamma and beta (the moving statistics are not
    trained, so the optimizer never sees them).
    """
    shapes = []

    def conv_bn(name, k, cin, cout):
        shapes.extend([
            (f"{name}_conv/kernel", (k, k, cin, cout)),
            (f"{name}_conv/bias", (cout,)),
            (f"{name}_bn/gamma", (cout,)),
            (f"{name}_bn/beta", (cout,)),
        ])

    conv_bn("conv1", 7, 3, 64)
    cin = 64
    for stage, (filters, blocks) in enumerate(
        [(64, 3), (128, 4), (256, 6), (512, 3)], start=2
    ):
        for block in range(1, blocks + 1):
            p = f"conv{stage}_block{block}"
            if block == 1:
                conv_bn(f"{p}_0", 1, cin, 4 * filters)
            conv_bn(f"{p}_1", 1, cin, filters)
            conv_bn(f"{p}_2", 3, filters, filters)
            conv_bn(f"{p}_3", 1, filters, 4 * filters)
            cin = 4 * filters
    shapes += [("predictions/kernel", (cin, classes)),
               ("predictions/bias", (classes,))]
    return shapes


def smoke():
    """A few tiny tensors of every rank, for a quick run of the benchmark."""
    return [
        ("dense/kernel", (16, 8)),
        ("dense/bias", (8,)),
        ("conv/kernel", (3, 3, 2, 4)),
        ("layer_norm/gamma", (8,)),
        ("scale", ()),
    ]


SHAPE_SETS = {
    "bert-base": lambda: bert(12, 768, 3072),
    "bert-large": lambda: bert(24, 1024, 4096),
    "resnet50": resnet50,
    "smoke": smoke,
}


def shape_set(name):
    """`(shapes, n_params)` of a named set."""
    if name not in SHAPE_SETS:
        raise ValueError(
            f"Unknown shape set {name!r}; choose from {sorted(SHAPE_SETS)}."
        )
    shapes = SHAPE_SETS[name]()
    return shapes, sum(math.prod(s) for _, s in shapes)
