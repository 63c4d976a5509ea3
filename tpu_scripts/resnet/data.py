"""Image input pipelines: TFDS by name, and an offline Fashion-MNIST IDX reader.

Every pipeline is TPU-ready and resumable:

- an input function `fn(input_context, epoch, start_step)` for
  `strategy.distribute_datasets_from_function`, batched per replica
  (`input_context.get_per_replica_batch_size`), sharded per input pipeline,
  prefetched;
- training batches have static shapes (`drop_remainder=True`) and every input
  pipeline yields exactly `steps_per_epoch` steps;
- evaluation covers every example once: the set is padded to a whole number of
  global batches and padded examples carry weight 0;
- shuffling and augmentation depend only on `(seed, epoch, example)`, so a run
  resumed at `start_step` of an epoch sees exactly the batches the
  uninterrupted run would have seen.
"""

import gzip
import os
import struct
import zlib

import numpy as np

from tpu_scripts import fileio

# Debian's `dataset-fashion-mnist` package installs the IDX files here.
SYSTEM_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
AUGMENTATIONS = ("auto", "imagenet", "pad_crop_flip", "none")

# Per-channel mean and standard deviation on the 0-255 scale.
IMAGENET_MEAN_STD = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
GREY_MEAN_STD = ((72.94,), (90.02,))  # Fashion-MNIST training set

# IDX element types (the third byte of the magic number).
_IDX_DTYPES = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
    0x0E: ">f8",
}


# ----------------------------------------------------------------------------
# Offline Fashion-MNIST (IDX files)


def read_idx(path):
    """Reads an IDX file (optionally gzip-compressed; any path
    `tpu_scripts.fileio` reads, `gs://` included) into a numpy array.

    The format: two zero bytes, a type byte, a byte with the number of
    dimensions `n`, then `n` big-endian uint32 sizes (so 16 header bytes for
    images, 8 for labels), then the data, big-endian.
    """
    from tpu_scripts import run_state

    with fileio.GFile(path, "rb") as f:  # local, gs://, ...
        data = f.read()
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # cut short or corrupt
            raise run_state.DataError(
                f"{path} is not a whole gzip file ({e}): truncated or "
                "corrupt.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise run_state.DataError(
            f"{path} is not an IDX file (bad magic number).")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES:
        raise run_state.DataError(
            f"{path}: unknown IDX element type 0x{dtype:02x}.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise run_state.DataError(
            f"{path}: the file ends inside its header: truncated.")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    itemsize = np.dtype(_IDX_DTYPES[dtype]).itemsize
    if len(data) - header != int(np.prod(shape)) * itemsize:
        raise run_state.DataError(
            f"{path}: header says shape {shape} ({int(np.prod(shape))} "
            f"values) but the file holds {(len(data) - header) // itemsize}"
            ": truncated or corrupt."
        )
    array = np.frombuffer(data, dtype=_IDX_DTYPES[dtype], offset=header)
    return array.reshape(shape)


def write_idx(path, array):
    """Writes `array` (uint8) as an IDX file, gzip-compressed if `path` ends
    in `.gz`; the inverse of `read_idx`, for making small offline datasets."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.tobytes()
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with fileio.GFile(path, "wb") as f:
        f.write(data)


def write_fashion_mnist(data_dir, train, test):
    """Writes `(images [N, H, W], labels [N])` pairs as the four
    Fashion-MNIST IDX files (`*.gz`) in `data_dir`."""
    fileio.makedirs(data_dir)
    for split, (images, labels) in (("train", train), ("test", test)):
        image_stem, label_stem = FASHION_MNIST_FILES[split]
        write_idx(os.path.join(data_dir, image_stem + ".gz"), images)
        write_idx(os.path.join(data_dir, label_stem + ".gz"), labels)


def _idx_path(data_dir, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if fileio.exists(path):
            return path
    return None


def has_fashion_mnist(data_dir):
    """Whether `data_dir` holds the four Fashion-MNIST IDX files."""
    return bool(data_dir) and all(
        _idx_path(data_dir, stem) is not None
        for files in FASHION_MNIST_FILES.values()
        for stem in files
    )


def load_fashion_mnist(data_dir, split):
    """`(images uint8 [N, 28, 28, 1], labels int32 [N])` from IDX files."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(
            f"Unknown split {split!r}; expected 'train' or 'test'."
        )
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    paths = [_idx_path(data_dir, s) for s in (image_stem, label_stem)]
    if None in paths:
        raise FileNotFoundError(
            f"No Fashion-MNIST IDX files ({image_stem}[.gz], "
            f"{label_stem}[.gz]) in {data_dir!r}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, "
            f"{SYSTEM_FASHION_MNIST_DIR}) or pass --data_dir."
        )
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        from tpu_scripts import run_state

        raise run_state.DataError(
            f"Fashion-MNIST files in {data_dir!r} disagree: images "
            f"{images.shape}, labels {labels.shape}."
        )
    return images[..., None], labels.astype(np.int32)


# ----------------------------------------------------------------------------
# Preprocessing


def resolve_augmentation(augmentation, image_size):
    """`auto` -> `imagenet` for images >= 64 pixels, else `pad_crop_flip`."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"Unknown --augmentation={augmentation!r}; expected one of: "
            f"{', '.join(AUGMENTATIONS)}."
        )
    if augmentation == "auto":
        return "imagenet" if image_size >= 64 else "pad_crop_flip"
    return augmentation


def normalize(image, channels):
    """uint8/float image on the 0-255 scale -> standardised float32."""
    import tensorflow as tf
    mean, std = IMAGENET_MEAN_STD if channels == 3 else GREY_MEAN_STD
    image = tf.cast(image, tf.float32)
    return (image - tf.constant(mean[:channels])) / tf.constant(std[:channels])


def random_resized_crop(image, seed, image_size, area=(0.08, 1.0),
                        aspect_ratio=(3 / 4, 4 / 3)):
    """The ImageNet training crop (Inception / ResNet): a random box covering
    8-100 % of the area with aspect ratio in [3/4, 4/3], resized."""
    import tensorflow as tf
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=aspect_ratio,
        area_range=area,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, size)
    return tf.image.resize(image, [image_size, image_size], "bilinear")


def center_crop(image, image_size, crop_fraction=0.875):
    """The ImageNet evaluation crop: resize the short side to
    `image_size / crop_fraction`, then take the central square."""
    import tensorflow as tf
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = image_size / crop_fraction / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, "bilinear")
    offset = (resized - image_size) // 2
    return tf.slice(
        image, [offset[0], offset[1], 0], [image_size, image_size, -1]
    )


def preprocess_train(image, seed, image_size, augmentation):
    """One training image (uint8 HWC) -> float32 `[image_size]*2 + [C]`."""
    import tensorflow as tf
    channels = image.shape[-1]
    if augmentation == "imagenet":
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 2)
        )
        image = random_resized_crop(image, crop_seed, image_size)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    elif augmentation == "pad_crop_flip":
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 2)
        )
        image = _resize_if_needed(image, image_size)
        pad = max(2, image_size // 8)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(
            image, [image_size, image_size, channels], crop_seed
        )
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    else:
        image = _resize_if_needed(image, image_size)
    image = tf.ensure_shape(
        normalize(image, channels), [image_size, image_size, channels]
    )
    return image


def preprocess_eval(image, image_size, augmentation):
    import tensorflow as tf
    channels = image.shape[-1]
    if augmentation == "imagenet":
        image = center_crop(image, image_size)
    else:
        image = _resize_if_needed(image, image_size)
    return tf.ensure_shape(
        normalize(image, channels), [image_size, image_size, channels]
    )


def _resize_if_needed(image, image_size):
    import tensorflow as tf
    if image.shape[0] == image_size and image.shape[1] == image_size:
        return image
    return tf.image.resize(image, [image_size, image_size], "bilinear")


# ----------------------------------------------------------------------------
# Input functions


def _pipeline_share(input_context, global_batch_size):
    """`(per_replica_batch, replicas_per_pipeline, num_pipelines, id)`."""
    if input_context is None:
        return global_batch_size, 1, 1, 0
    per_replica = input_context.get_per_replica_batch_size(global_batch_size)
    replicas = (
        input_context.num_replicas_in_sync // input_context.num_input_pipelines
    )
    return (
        per_replica, replicas, input_context.num_input_pipelines,
        input_context.input_pipeline_id,
    )


class InputSpec:
    """The facts the trainer needs about a dataset split."""

    def __init__(self, num_examples, global_batch_size, training,
                 source="the training set"):
        from tpu_scripts import run_state

        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.training = training
        if training and num_examples < global_batch_size:
            raise run_state.FlagError(
                f"--global_batch_size={global_batch_size} is more than the "
                f"{num_examples} examples of {source}: not one whole "
                "training batch. Lower --global_batch_size (or use more "
                "data)."
            )

    @property
    def steps_per_epoch(self):
        """Training: whole batches only; evaluation: every example once."""
        if self.training:
            return self.num_examples // self.global_batch_size
        return -(-self.num_examples // self.global_batch_size)


class ArrayInput(InputSpec):
    """Input function over in-memory arrays (uint8 NHWC images, int labels).

    Training yields `(images, labels)`; evaluation yields `(images, labels,
    weights)` with weight 0 on padding.
    """

    def __init__(self, images, labels, global_batch_size, training,
                 image_size=None, augmentation="none", seed=0):
        super().__init__(len(images), global_batch_size, training)
        self.images = np.asarray(images)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.image_size = image_size or self.images.shape[1]
        self.augmentation = resolve_augmentation(augmentation, self.image_size)
        self.seed = seed

    def __call__(self, input_context=None, epoch=0, start_step=0):
        import tensorflow as tf
        per_replica, replicas, pipelines, pipeline_id = _pipeline_share(
            input_context, self.global_batch_size
        )
        steps = self.steps_per_epoch
        n = self.num_examples
        if self.training:
            # The same permutation on every pipeline, then disjoint shards.
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            order = order[: steps * self.global_batch_size]
        else:
            order = np.arange(steps * self.global_batch_size)
        order = order[pipeline_id::pipelines]
        order = order[start_step * per_replica * replicas:]
        images = tf.constant(self.images)
        labels = tf.constant(self.labels)
        size, augmentation = self.image_size, self.augmentation
        ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
        if self.training:
            def load(index):
                # Stateless seed from (seed, epoch, example): resumable.
                seed = tf.stack([
                    tf.constant(self.seed * 100003 + epoch, tf.int64), index
                ])
                image = preprocess_train(
                    tf.gather(images, index), seed, size, augmentation
                )
                return image, tf.gather(labels, index)

            if augmentation == "none" and size == self.images.shape[1]:
                ds = ds.batch(per_replica, drop_remainder=True).map(
                    lambda i: (
                        normalize(tf.gather(images, i), images.shape[-1]),
                        tf.gather(labels, i),
                    ),
                    num_parallel_calls=tf.data.AUTOTUNE,
                )
            else:
                ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(
                    per_replica, drop_remainder=True
                )
        else:
            def load_eval(index):
                real = index < n
                safe = tf.minimum(index, n - 1)
                image = preprocess_eval(
                    tf.gather(images, safe), size, augmentation
                )
                return (
                    image,
                    tf.where(real, tf.gather(labels, safe), 0),
                    tf.cast(real, tf.float32),
                )

            ds = ds.map(load_eval, num_parallel_calls=tf.data.AUTOTUNE).batch(
                per_replica, drop_remainder=True
            )
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    def numpy_batches(self, epoch=0, start_step=0, process_count=1,
                      process_index=0):
        """This process's share of each global batch of `epoch` from batch
        `start_step` on, as NumPy (the JAX engine; no TensorFlow): the same
        examples in the same order as `__call__` gives one replica. `None`
        where only the `tf.data` pipeline can (resizing, `imagenet`
        augmentation)."""
        if self.image_size != self.images.shape[1] or (
                self.augmentation == "imagenet"):
            return None
        return self._numpy_batches(epoch, start_step, *process_share(
            self.global_batch_size, process_count, process_index))

    def _numpy_batches(self, epoch, start_step, start, stop):
        batch, n = self.global_batch_size, self.num_examples
        steps = self.steps_per_epoch
        if self.training:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(steps * batch)
        for step in range(start_step, steps):
            indices = order[step * batch:(step + 1) * batch]
            if not self.training:
                real = indices < n
                safe = np.minimum(indices, n - 1)[start:stop]
                yield (normalize_numpy(self.images[safe]),
                       np.where(real[start:stop], self.labels[safe], 0),
                       real[start:stop].astype(np.float32))
                continue
            images = self.images[indices]
            if self.augmentation == "pad_crop_flip":
                # Drawn for the whole global batch, then shared out: the
                # same crops for any number of processes; resumable.
                images = pad_crop_flip_numpy(images, np.random.default_rng(
                    [self.seed, epoch, step]))
            yield (normalize_numpy(images[start:stop]),
                   self.labels[indices][start:stop])


def process_share(global_batch_size, process_count, process_index):
    """`(start, stop)` of this process's examples within a global batch
    (the JAX engine: each host feeds its own contiguous share)."""
    if global_batch_size % process_count:
        from tpu_scripts import run_state

        raise run_state.FlagError(
            f"The batch of {global_batch_size} is not divisible by the "
            f"{process_count} processes; use a multiple of {process_count}.")
    share = global_batch_size // process_count
    return process_index * share, (process_index + 1) * share


def normalize_numpy(images):
    """`normalize` in NumPy (the same float32 arithmetic)."""
    channels = images.shape[-1]
    mean, std = IMAGENET_MEAN_STD if channels == 3 else GREY_MEAN_STD
    return ((images.astype(np.float32) - np.float32(mean[:channels]))
            / np.float32(std[:channels]))


def pad_crop_flip_numpy(images, rng):
    """The `pad_crop_flip` augmentation of a batch in NumPy: zero padding of
    `max(2, size // 8)`, a random crop back to the size, a random
    horizontal flip. `rng` draws each example's crop and flip."""
    n, height, width = images.shape[:3]
    pad = max(2, height // 8)
    padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    top = rng.integers(0, 2 * pad + 1, n)
    left = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    rows = top[:, None] + np.arange(height)[None, :]
    cols = left[:, None] + np.arange(width)[None, :]
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None],
                  cols[:, None, :]]


class TFDSInput(InputSpec):
    """Input function over a TFDS dataset (`imagenet2012`, `imagenette`,
    `cifar10`, `fashion_mnist`, ...) with ImageNet-style preprocessing.

    Files are sharded per input pipeline when the split has enough files,
    otherwise examples are. Training yields `(images, labels)`, evaluation
    `(images, labels, weights)` padded with weight-0 examples.
    """

    def __init__(self, name, split, global_batch_size, training, image_size,
                 data_dir=None, augmentation="auto", seed=0,
                 shuffle_buffer=10000, num_examples=None):
        import tensorflow_datasets as tfds

        builder = tfds.builder(name, data_dir=data_dir)
        builder.download_and_prepare()
        info = builder.info
        if num_examples is None:
            num_examples = info.splits[split].num_examples
        super().__init__(num_examples, global_batch_size, training)
        self.builder = builder
        self.split = split
        self.num_classes = info.features["label"].num_classes
        self.channels = info.features["image"].shape[-1]
        self.image_size = image_size
        self.augmentation = resolve_augmentation(augmentation, image_size)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        # Unknown when the split's metadata is missing (tfds.testing mocks).
        self.num_files = (len(info.splits[split].filenames)
                          if split in info.splits else 1)

    def __call__(self, input_context=None, epoch=0, start_step=0):
        import tensorflow as tf
        import tensorflow_datasets as tfds

        per_replica, replicas, pipelines, pipeline_id = _pipeline_share(
            input_context, self.global_batch_size
        )
        # Training shards files (cheap); evaluation shards examples, so every
        # pipeline holds at most its padded share and none is cut off.
        shard_files = (
            self.training and pipelines > 1 and self.num_files >= pipelines
        )
        read_config = tfds.ReadConfig(
            shuffle_seed=self.seed * 100003 + epoch,
            interleave_cycle_length=16,
            input_context=input_context if shard_files else None,
            options=tf.data.Options(),
        )
        read_config.options.deterministic = True
        ds = self.builder.as_dataset(
            split=self.split,
            shuffle_files=self.training,
            read_config=read_config,
            as_supervised=True,
        )
        if pipelines > 1 and not shard_files:
            ds = ds.shard(pipelines, pipeline_id)
        size, augmentation, channels = (
            self.image_size, self.augmentation, self.channels,
        )
        steps = self.steps_per_epoch
        if self.training:
            # repeat(): a pipeline whose files hold a few examples fewer than
            # its share wraps around instead of running dry.
            ds = ds.repeat().enumerate().shuffle(
                self.shuffle_buffer, seed=self.seed * 100003 + epoch,
                reshuffle_each_iteration=False,
            )
            ds = ds.skip(start_step * per_replica * replicas)
            base = tf.constant(self.seed * 100003 + epoch, tf.int64)

            def load(index, example):
                image, label = example
                image = tf.ensure_shape(image, [None, None, channels])
                image = preprocess_train(
                    image, tf.stack([base, index]), size, augmentation
                )
                return image, tf.cast(label, tf.int32)

            ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(per_replica, drop_remainder=True)
            ds = ds.take((steps - start_step) * replicas)
        else:
            def load_eval(image, label):
                image = tf.ensure_shape(image, [None, None, channels])
                return (
                    preprocess_eval(image, size, augmentation),
                    tf.cast(label, tf.int32),
                    tf.constant(1.0),
                )

            ds = ds.map(load_eval, num_parallel_calls=tf.data.AUTOTUNE)
            # Pad with weight-0 examples up to whole global batches.
            padding = tf.data.Dataset.from_tensors((
                tf.zeros([size, size, channels]), tf.constant(0),
                tf.constant(0.0),
            )).repeat()
            ds = ds.concatenate(padding).take(steps * per_replica * replicas)
            ds = ds.batch(per_replica, drop_remainder=True)
        return ds.prefetch(tf.data.AUTOTUNE)
