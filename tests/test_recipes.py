"""Recipes against the numbers of their sources, written out here as data."""

import types

import keras
import pytest

import keras_lamb
from keras_lamb import recipes
from keras_lamb.trust_ratio import ExclusionRule

# You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
# minutes", arXiv:1904.00962, table of untuned LAMB for BERT-Large at a fixed
# number of epochs: batch, learning rate 5/(2^k * 10^3), warmup ratio,
# iterations. Warmup steps = ratio * iterations = 3125 in every column.
LAMB_PAPER = [
    (512, 5 / (2**3.0 * 1e3), 1 / 320, 1_000_000),
    (1024, 5 / (2**2.5 * 1e3), 1 / 160, 500_000),
    (2048, 5 / (2**2.0 * 1e3), 1 / 80, 250_000),
    (4096, 5 / (2**1.5 * 1e3), 1 / 40, 125_000),
    (8192, 5 / (2**1.0 * 1e3), 1 / 20, 62_500),
    (16384, 5 / (2**0.5 * 1e3), 1 / 10, 31_250),
    (32768, 5 / (2**0.0 * 1e3), 1 / 5, 15_625),
]

# MLPerf ResNet-50 TF/TPU reference, lars_util.poly_rate_schedule:
# (global batch, peak LR, warmup epochs, momentum); decay power 2 to 1e-4.
MLPERF = [
    (4096, 10.0, 5, 0.9),
    (16383, 10.0, 5, 0.9),
    (16384, 25.0, 5, 0.9),
    (32767, 25.0, 5, 0.9),
    (32768, 31.2, 25, 0.94),
    (65536, 31.2, 25, 0.94),
]

# Variable paths of keras-hub 0.32 BertBackbone (observed by building one)
# and whether the LAMB recipe must exclude them from decay and adaptation.
KERAS_HUB_BERT_PATHS = {
    "token_embedding/embeddings": False,
    "embeddings_layer_norm/gamma": True,
    "embeddings_layer_norm/beta": True,
    "transformer_layer_0/self_attention_layer/query/kernel": False,
    "transformer_layer_0/self_attention_layer/query/bias": True,
    "transformer_layer_0/self_attention_layer/attention_output/kernel": False,
    "transformer_layer_0/self_attention_layer_norm/gamma": True,
    "transformer_layer_0/feedforward_layer_norm/beta": True,
    "transformer_layer_0/feedforward_intermediate_dense/kernel": False,
    "transformer_layer_0/feedforward_output_dense/bias": True,
    "pooled_dense/kernel": False,
    # TF1 BERT checkpoint names.
    "bert/encoder/layer_0/attention/output/LayerNorm/gamma": True,
}


def _rate(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def _excluded(spec, path):
    return ExclusionRule(spec, "test").excludes(types.SimpleNamespace(path=path))


@pytest.mark.parametrize("batch, peak, ratio, iterations", LAMB_PAPER)
def test_lamb_bert_matches_the_paper_table(batch, peak, ratio, iterations):
    optimizer, schedule, notes = recipes.lamb_bert(batch)
    assert notes["peak_learning_rate"] == pytest.approx(peak, rel=1e-12)
    assert notes["total_steps"] == iterations
    assert notes["warmup_steps"] == round(ratio * iterations) == 3125
    assert notes["decay_power"] == 1.0
    assert not notes["interpolated"]
    # The schedule: warmup to the peak, linear decay to 0 at `iterations`.
    w = notes["warmup_steps"]
    assert _rate(schedule, w - 1) == pytest.approx(peak * (w - 1) / w, rel=1e-5)
    assert _rate(schedule, w) == pytest.approx(
        peak * (1 - w / iterations), rel=1e-4)
    assert _rate(schedule, iterations) == 0.0
    config = optimizer.get_config()
    assert isinstance(optimizer, keras_lamb.LAMB)
    assert config["weight_decay"] == 0.01
    assert config["epsilon"] == 1e-6
    assert config["global_clipnorm"] == 1.0
    assert config["exclude_from_weight_decay"] == "layer_norm|LayerNorm|bias"
    assert config["exclude_from_layer_adaptation"] == "layer_norm|LayerNorm|bias"


@pytest.mark.parametrize("path", sorted(KERAS_HUB_BERT_PATHS))
def test_lamb_bert_exclusions_match_bert_paths(path):
    _, _, notes = recipes.lamb_bert(4096)
    expected = KERAS_HUB_BERT_PATHS[path]
    assert _excluded(notes["exclude_from_weight_decay"], path) == expected
    assert _excluded(notes["exclude_from_layer_adaptation"], path) == expected


def test_lamb_bert_between_table_entries_uses_the_sqrt_rule():
    _, _, notes = recipes.lamb_bert(3072)
    assert notes["interpolated"]
    assert notes["peak_learning_rate"] == pytest.approx(
        recipes.scale_learning_rate(5e-3, 32768, 3072, rule="sqrt"))
    assert notes["warmup_ratio"] == pytest.approx(0.2 * 3072 / 32768)
    assert notes["total_steps"] == round(1e6 * 512 / 3072)


def test_lamb_bert_custom_total_steps_keeps_the_warmup_ratio():
    _, schedule, notes = recipes.lamb_bert(32768, total_steps=1000)
    assert notes["warmup_steps"] == 200
    assert _rate(schedule, 1000) == 0.0


def test_lamb_bert_64k_32k_is_nvidia_recipe():
    # NVIDIA DeepLearningExamples PyTorch BERT scripts/run_pretraining.sh.
    optimizer, schedule, notes = recipes.lamb_bert_64k_32k()
    phase1, phase2 = notes["phases"]
    assert (phase1["global_batch_size"], phase1["sequence_length"],
            phase1["peak_learning_rate"], phase1["warmup_ratio"],
            phase1["steps"]) == (65536, 128, 6e-3, 0.2843, 7038)
    assert (phase2["global_batch_size"], phase2["sequence_length"],
            phase2["peak_learning_rate"], phase2["warmup_ratio"],
            phase2["steps"]) == (32768, 512, 4e-3, 0.128, 1563)
    assert (phase1["warmup_steps"], phase2["warmup_steps"]) == (2001, 200)
    assert notes["phase_boundaries"] == [7038]
    assert notes["decay_power"] == 0.5
    assert notes["total_steps"] == 8601
    assert isinstance(schedule, keras_lamb.schedules.PhasedSchedule)
    assert _rate(schedule, 7038) == 0.0  # re-warmed from zero
    assert optimizer.get_config()["global_clipnorm"] == 1.0


@pytest.mark.parametrize("batch, peak, warmup_epochs, momentum", MLPERF)
def test_lars_resnet50_matches_mlperf(batch, peak, warmup_epochs, momentum):
    steps_per_epoch = 1_281_167 // batch
    optimizer, schedule, notes = recipes.lars_resnet50(
        batch, epochs=40, steps_per_epoch=steps_per_epoch)
    w = warmup_epochs * steps_per_epoch
    total = 40 * steps_per_epoch
    assert notes["peak_learning_rate"] == peak
    assert notes["warmup_steps"] == w
    assert notes["total_steps"] == total
    assert notes["decay_power"] == 2.0
    assert notes["end_learning_rate"] == 1e-4
    assert notes["label_smoothing"] == 0.1
    assert optimizer.momentum == momentum
    assert optimizer.trust_coefficient == 1e-3
    assert optimizer.weight_decay == 1e-4
    # Warmup from 0 to the peak, then (peak - end) (1 - s/(T - w))^2 + end.
    assert _rate(schedule, 0) == 0.0
    assert _rate(schedule, w // 2) == pytest.approx(peak * (w // 2) / w, rel=1e-5)
    assert _rate(schedule, w) == pytest.approx(peak, rel=1e-6)
    half = w + (total - w) // 2
    s = (half - w) / (total - w)
    assert _rate(schedule, half) == pytest.approx(
        (peak - 1e-4) * (1 - s) ** 2 + 1e-4, rel=1e-4)
    assert _rate(schedule, total) == pytest.approx(1e-4, rel=1e-5)


@pytest.fixture(scope="module")
def resnet50_paths():
    model = keras.applications.ResNet50(
        weights=None, input_shape=(32, 32, 3), classes=10)
    return [v.path for v in model.trainable_variables]


def test_lars_resnet50_exclusions_on_keras_applications(resnet50_paths):
    _, _, notes = recipes.lars_resnet50(4096, 40, 312)
    for spec in (notes["exclude_from_weight_decay"],
                 notes["exclude_from_layer_adaptation"]):
        for path in resnet50_paths:
            # Every BN gamma/beta and every bias, and no kernel.
            expected = path.rsplit("/", 1)[-1] in ("gamma", "beta", "bias")
            assert _excluded(spec, path) == expected, path
    kernels = [p for p in resnet50_paths if p.endswith("/kernel")]
    assert (len(kernels), len(resnet50_paths)) == (54, 214)


def test_lars_resnet50_weight_decay_and_momentum_are_arguments():
    optimizer, _, notes = recipes.lars_resnet50(
        8192, 40, 156, weight_decay=2e-4, momentum=0.95)
    assert optimizer.weight_decay == 2e-4 and notes["momentum"] == 0.95


def test_goyal_momentum():
    # Goyal et al. arXiv:1706.02677: 0.1 * B / 256, 5-epoch warmup from 0.1,
    # x0.1 at epochs 30/60/80 of 90, momentum 0.9, weight decay 1e-4.
    optimizer, schedule, notes = recipes.goyal_momentum(8192, 90, 156)
    assert notes["peak_learning_rate"] == pytest.approx(3.2)
    assert notes["warmup_steps"] == 5 * 156
    assert notes["decay_boundaries"] == [30 * 156, 60 * 156, 80 * 156]
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.momentum == 0.9 and optimizer.weight_decay == 1e-4
    table = [(0, 0.1), (390, 0.1 + 3.1 * 390 / 780), (780, 3.2),
             (4680, 3.2), (4681, 0.32), (9361, 0.032), (12481, 0.0032)]
    for step, expected in table:
        assert _rate(schedule, step) == pytest.approx(expected, rel=1e-5)
    # A shorter budget moves the decays proportionally.
    _, _, short = recipes.goyal_momentum(8192, 45, 156)
    assert short["decay_boundaries"] == [15 * 156, 30 * 156, 40 * 156]


def test_goyal_weight_decay_exclusions_reach_keras_sgd():
    optimizer, _, _ = recipes.goyal_momentum(
        1024, 90, 10, exclude_from_weight_decay=["gamma", "beta", "bias"])
    with keras.name_scope("bn"):
        gamma = keras.Variable(1.0, name="gamma")
    kernel = keras.Variable(1.0, name="kernel")
    assert not optimizer._use_weight_decay(gamma)
    assert optimizer._use_weight_decay(kernel)
    one, _, _ = recipes.goyal_momentum(
        1024, 90, 10, exclude_from_weight_decay="gamma")
    assert not one._use_weight_decay(gamma) and one._use_weight_decay(kernel)


def test_controls_take_unconfirmed_values_as_arguments():
    sgd, _, notes = recipes.nesterov_control(
        32768, epochs=40, steps_per_epoch=39, peak_learning_rate=8.0,
        warmup_epochs=5, weight_decay=5e-5, momentum=0.9)
    assert sgd.nesterov and notes["warmup_steps"] == 195
    adamw, schedule, notes = recipes.adamw_control(
        65536, total_steps=1000, peak_learning_rate=1e-3, warmup_steps=100,
        weight_decay=0.01)
    assert isinstance(adamw, keras.optimizers.AdamW)
    assert adamw.global_clipnorm == 1.0
    assert _rate(schedule, 100) == pytest.approx(1e-3 * 0.9, rel=1e-5)


@pytest.mark.parametrize(
    "args, rule, expected",
    [((0.1, 256, 8192), "linear", 3.2),
     ((5e-3, 32768, 512), "sqrt", 6.25e-4),
     ((1.0, 100, 100), "sqrt", 1.0)],
)
def test_scale_learning_rate(args, rule, expected):
    assert recipes.scale_learning_rate(*args, rule=rule) == pytest.approx(expected)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: recipes.scale_learning_rate(-0.1, 256, 512),
         "Argument `base_learning_rate` must be a finite number >= 0. "
         "Received: base_learning_rate=-0.1"),
        (lambda: recipes.scale_learning_rate(0.1, 0, 512),
         "Argument `base_batch_size` must be an integer >= 1. "
         "Received: base_batch_size=0"),
        (lambda: recipes.scale_learning_rate(0.1, 256, 1.5),
         "Received: batch_size=1.5"),
        (lambda: recipes.scale_learning_rate(0.1, 256, 512, rule="log"),
         "Argument `rule` must be one of"),
        (lambda: recipes.lamb_bert(256),
         r"Argument `global_batch_size` must be in \[512, 32768\]"),
        (lambda: recipes.lamb_bert(65536), "lamb_bert_64k_32k"),
        (lambda: recipes.lamb_bert(4096, total_steps=0),
         "Argument `total_steps` must be an integer >= 2"),
        (lambda: recipes.lamb_bert(4096, weight_decay=-0.01),
         "Argument `weight_decay`"),
        (lambda: recipes.lars_resnet50(0, 40, 100),
         "Argument `global_batch_size` must be an integer >= 1"),
        (lambda: recipes.lars_resnet50(4096, 0, 100),
         "Argument `epochs` must be a finite number > 0"),
        (lambda: recipes.lars_resnet50(4096, 40, 0),
         "Argument `steps_per_epoch` must be an integer >= 1"),
        (lambda: recipes.lars_resnet50(32768, 20, 39),
         r"Argument `warmup_steps` must be in \[1, total_steps\) = \[1, 780\)"
         r" \(25 warmup epochs of 20 epochs\). Received: warmup_steps=975"),
        (lambda: recipes.lars_resnet50(4096, 40, 100, weight_decay=-1.0),
         "Argument `weight_decay`"),
        (lambda: recipes.lars_resnet50(4096, 40, 100, momentum=1.0),
         "Argument `momentum`"),
        (lambda: recipes.goyal_momentum(8192, 10, 156),
         "Argument `epochs` must leave the 5-epoch warmup"),
        (lambda: recipes.nesterov_control(1024, 10, 10, 1.0, 20, 1e-4, 0.9),
         r"Argument `warmup_steps` must be in \[1, total_steps\)"),
        (lambda: recipes.nesterov_control(1024, 10, 10, -1.0, 2, 1e-4, 0.9),
         "Argument `peak_learning_rate`"),
        (lambda: recipes.adamw_control(1024, 100, 1e-3, 200, 0.01),
         r"Argument `warmup_steps` must be an integer in \[1, total_steps\)"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
