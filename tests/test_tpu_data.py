"""Input pipelines of tpu_scripts: IDX reader, static shapes, sharding,
resume, evaluation padding, TFDS path (mocked, offline)."""

import gzip
import struct

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tpu_scripts.resnet import data  # noqa: E402


class FakeContext:
    """The fields of `tf.distribute.InputContext` the pipelines use."""

    def __init__(self, pipelines, pipeline_id, replicas):
        self.num_input_pipelines = pipelines
        self.input_pipeline_id = pipeline_id
        self.num_replicas_in_sync = replicas

    def get_per_replica_batch_size(self, global_batch_size):
        return global_batch_size // self.num_replicas_in_sync


def raw_idx(array, type_byte=0x08):
    """IDX bytes built by hand: magic 0 0 type ndim, big-endian sizes."""
    header = bytes([0, 0, type_byte, array.ndim])
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(">u1").tobytes()


@pytest.fixture
def idx_dir(tmp_path):
    """Fashion-MNIST-named IDX files of 6x6 images: 50 train, 17 test,
    with an uneven label histogram."""
    rng = np.random.default_rng(0)
    splits = {
        "train": (rng.integers(0, 256, (50, 6, 6)),
                  rng.choice(10, 50, p=np.arange(1, 11) / 55)),
        "test": (rng.integers(0, 256, (17, 6, 6)), rng.integers(0, 10, 17)),
    }
    for split, (images, labels) in splits.items():
        image_stem, label_stem = data.FASHION_MNIST_FILES[split]
        # Images gzip-compressed (as Debian ships them), labels raw.
        with gzip.open(tmp_path / f"{image_stem}.gz", "wb") as f:
            f.write(raw_idx(images))
        (tmp_path / label_stem).write_bytes(raw_idx(labels))
    return str(tmp_path), splits


def test_idx_reader_agrees_with_raw_files(idx_dir):
    path, splits = idx_dir
    assert data.has_fashion_mnist(path)
    for split, (images, labels) in splits.items():
        got_images, got_labels = data.load_fashion_mnist(path, split)
        assert got_images.shape == images.shape + (1,)
        assert got_images.dtype == np.uint8
        assert len(got_labels) == len(labels)
        np.testing.assert_array_equal(
            np.bincount(got_labels, minlength=10),
            np.bincount(labels, minlength=10),
        )
        np.testing.assert_array_equal(got_images[..., 0], images)
        np.testing.assert_array_equal(got_labels, labels)


def test_idx_header_sizes_are_16_and_8_bytes(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], np.uint8)
    data.write_idx(str(tmp_path / "i"), images)
    data.write_idx(str(tmp_path / "l.gz"), labels)
    raw_images = (tmp_path / "i").read_bytes()
    assert len(raw_images) == 16 + images.size
    assert raw_images[:16] == raw_idx(images)[:16]
    assert len(gzip.open(tmp_path / "l.gz").read()) == 8 + 2
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "l.gz")),
                                  labels)


def test_idx_reader_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(raw_idx(np.zeros((4, 2), np.uint8))[:-3])
    with pytest.raises(ValueError, match="header says shape"):
        data.read_idx(str(short))
    assert not data.has_fashion_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install "
                       "dataset-fashion-mnist"):
        data.load_fashion_mnist(str(tmp_path), "train")


def test_training_batches_static_drop_remainder_and_resumable(idx_dir):
    path, _ = idx_dir
    images, labels = data.load_fashion_mnist(path, "train")
    train = data.ArrayInput(images, labels, 8, True, seed=3,
                            augmentation="pad_crop_flip")
    assert train.steps_per_epoch == 50 // 8
    ds = train(None, epoch=1)
    image_spec, label_spec = ds.element_spec
    assert image_spec.shape.as_list() == [8, 6, 6, 1]  # static, remainder
    assert label_spec.shape.as_list() == [8]  # dropped
    batches = [(x.numpy(), y.numpy()) for x, y in ds]
    assert len(batches) == train.steps_per_epoch
    # Deterministic, and a resumed epoch sees exactly the remaining batches.
    again = [(x.numpy(), y.numpy()) for x, y in train(None, epoch=1)]
    resumed = [(x.numpy(), y.numpy())
               for x, y in train(None, epoch=1, start_step=4)]
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a[0], b[0])
    assert len(resumed) == len(batches) - 4
    for a, b in zip(batches[4:], resumed):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # Another epoch, another order.
    other = [y.numpy() for _, y in train(None, epoch=2)]
    assert not all(np.array_equal(a[1], b) for a, b in zip(batches, other))


def test_pipelines_of_two_workers_are_disjoint_and_complete(idx_dir):
    path, _ = idx_dir
    images, labels = data.load_fashion_mnist(path, "train")
    # Label i has image value i, so labels identify examples.
    ids = np.arange(48, dtype=np.uint8)
    train = data.ArrayInput(images[:48], ids, 16, True)
    seen = []
    for worker in range(2):
        ds = train(FakeContext(2, worker, 4), epoch=0)
        assert ds.element_spec[0].shape.as_list() == [4, 6, 6, 1]
        batches = [y.numpy() for _, y in ds]
        assert len(batches) == train.steps_per_epoch * 2  # 2 replicas each
        seen.extend(np.concatenate(batches))
    assert sorted(seen) == list(range(48))


def test_evaluation_covers_every_example_once(idx_dir):
    path, splits = idx_dir
    images, labels = data.load_fashion_mnist(path, "test")
    evaluation = data.ArrayInput(images, labels, 8, False)
    assert evaluation.steps_per_epoch == 3  # 17 examples, padded to 24
    batches = list(evaluation(None))
    assert all(b[0].shape == (8, 6, 6, 1) for b in batches)
    weights = np.concatenate([b[2].numpy() for b in batches])
    got = np.concatenate([b[1].numpy() for b in batches])[weights > 0]
    assert weights.sum() == 17
    np.testing.assert_array_equal(got, splits["test"][1])


def test_imagenet_preprocessing_shapes_and_determinism():
    image = tf.cast(tf.random.stateless_uniform((50, 70, 3), [1, 2],
                                                maxval=255), tf.uint8)
    seed = tf.constant([4, 5], tf.int64)
    train = data.preprocess_train(image, seed, 32, "imagenet")
    assert train.shape == (32, 32, 3)
    np.testing.assert_array_equal(
        train, data.preprocess_train(image, seed, 32, "imagenet"))
    assert data.preprocess_eval(image, 32, "imagenet").shape == (32, 32, 3)
    with pytest.raises(ValueError, match="--augmentation"):
        data.resolve_augmentation("cutmix", 32)


def test_tfds_pipeline_offline_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40):
        train = data.TFDSInput("cifar10", "train", 8, True, image_size=40,
                               shuffle_buffer=16, num_examples=40)
        ds = train(FakeContext(1, 0, 2), epoch=0)
        assert ds.element_spec[0].shape.as_list() == [4, 40, 40, 3]
        assert len(list(ds)) == train.steps_per_epoch * 2
        evaluation = data.TFDSInput("cifar10", "test", 16, False,
                                    image_size=40, num_examples=40)
        weights = [b[2].numpy().sum() for b in evaluation(None)]
        assert len(weights) == 3 and sum(weights) == 40
