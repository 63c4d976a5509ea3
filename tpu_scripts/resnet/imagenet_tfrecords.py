"""ImageNet from TFRecord shards, and synthetic ImageNet-shaped data.

The TFRecords are those the TPU and Model Garden conversion tools write (and
MLPerf's reference reads): `tf.train.Example`s with `image/encoded` (JPEG
bytes) and `image/class/label` (int64, **1-based**: 1..1000, 0 being the
background class of the old Inception models), plus `image/format`,
`image/height`, `image/width`, `image/colorspace`, `image/channels`,
`image/class/synset`, `image/class/text`, `image/filename` and
`image/object/bbox/*`, which are not read. Labels come out 0-based.

Preprocessing is MLPerf's. Training: a random crop of 8-100 % of the area
with aspect ratio in [3/4, 4/3] (10 attempts, else a centre crop), decoded
together with the JPEG (`decode_and_crop_jpeg`), resized to `image_size`,
randomly flipped. Evaluation: decode, resize the short side to
`image_size / 0.875`, take the central `image_size` square. Both normalise
with the ImageNet mean and standard deviation.

`TFRecordInput` keeps the contract of `tpu_scripts.resnet.data` (see its
docstring): static per-replica batches, files sharded per input pipeline
(examples when there are fewer files than pipelines), every evaluation
example exactly once (padding weighted 0), and an exact resume: file order,
shuffling and augmentation depend only on `(seed, epoch, example)`, and reads
are deterministic, so a run resumed at `start_step` of an epoch sees the
batches the uninterrupted run would have seen. The price of the exact resume
is a re-read (without decoding) of the epoch's records before `start_step`.

Bad records stop the input with an error naming the flag, the file and the
record: a missing `image/encoded` or `image/class/label`, a label outside
[1, num_classes], bytes that do not decode as a JPEG. So does a file that
is truncated or corrupt (`tpu_scripts.records`: its records must add up to
its size, with both checksums right), and a wrong count (`num_examples`),
raised when the input reads past it or runs short: always for evaluation,
and for training when one input pipeline reads all the files. The messages
start with `records.MARKER`; `records.data_error` turns the TensorFlow
error into a `run_state.DataError`. Files named as ImageNet's shards in the
TPU layout must hold ImageNet's count (`known_count`).

`SyntheticInput` yields example indices and random labels; the images are
made from the indices on the accelerator (`synthetic_images`), so that no
image crosses from the host: the throughput mode of Model Garden and MLPerf.
"""

import numpy as np

from tpu_scripts import records, run_state
from tpu_scripts.resnet import data

IMAGENET_TRAIN_EXAMPLES = 1_281_167
IMAGENET_EVAL_EXAMPLES = 50_000
ENCODED_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
READ_BUFFER_BYTES = records.READ_BUFFER_BYTES  # per file, as MLPerf's


def expand_globs(patterns, flag="--train_files"):
    """Comma-separated globs (local paths, gs://, ...) -> sorted files.

    Raises `run_state.FlagError` (a `ValueError`) naming `flag` when
    nothing is given or a glob matches no file.
    """
    import tensorflow as tf
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    patterns = [p.strip() for p in patterns if p.strip()]
    if not patterns:
        raise run_state.FlagError(
            f"{flag} is empty; give comma-separated globs.")
    files = set()
    for pattern in patterns:
        matches = tf.io.gfile.glob(pattern)
        if not matches:
            raise run_state.FlagError(
                f"{flag}: {pattern!r} matches no file.")
        folders = [m for m in matches if tf.io.gfile.isdir(m)]
        if folders:
            raise run_state.FlagError(
                f"{flag}: {pattern!r} matches the folder {folders[0]}; give "
                f"a glob of TFRecord files (e.g. {folders[0].rstrip('/')}"
                "/train-*).")
        files.update(matches)
    return sorted(files)


def count_records(files, flag="", sizes=None):
    """Number of records in `files` (reads every file once and checks it
    whole: `tpu_scripts.records.count_records`)."""
    return records.count_records(files, flag, sizes)


# The TPU / Model Garden conversion tools write ImageNet as 1024 training
# shards `train-00000-of-01024` ... and 128 validation shards
# `validation-00000-of-00128`: files named so are ImageNet, whose counts are
# known.
IMAGENET_SHARDS = {"train": (1024, IMAGENET_TRAIN_EXAMPLES),
                   "validation": (128, IMAGENET_EVAL_EXAMPLES)}


def known_count(files):
    """ImageNet's record count when `files` are exactly its training (or
    validation) shards in the TPU layout, all of them; else `None`."""
    names = {f.replace("\\", "/").rsplit("/", 1)[-1] for f in files}
    for prefix, (shards, examples) in IMAGENET_SHARDS.items():
        layout = {f"{prefix}-{i:05d}-of-{shards:05d}" for i in range(shards)}
        if names == layout and len(files) == shards:
            return examples
    return None


def resolve_count(files, num_examples, files_flag, count_flag, log=None,
                  sizes=None):
    """The record count of `files`: `num_examples` when given, else counted
    (every file read once and checked whole). Where the count is known
    (ImageNet's shards, `known_count`) a given or counted count that
    differs is an error."""
    known = known_count(files)
    if known is not None and num_examples and num_examples != known:
        raise run_state.FlagError(
            f"{count_flag}={num_examples}, but {files_flag} are ImageNet's "
            f"{len(files)} shards in the TPU layout, which hold {known} "
            f"records. Pass {count_flag}={known} (or 0 to count them)."
        )
    if num_examples:
        return num_examples
    if log:
        log(f"Counting and checking the records of {files_flag} (pass "
            f"{count_flag} to skip this"
            + (f"; these are ImageNet's: {known})." if known else ")."))
    count = count_records(files, files_flag, sizes)
    if known is not None and count != known:
        raise run_state.DataError(
            f"{files_flag} are named as ImageNet's {len(files)} shards in "
            f"the TPU layout, which hold {known} records, but they hold "
            f"{count}: a shard holds too few or too many records."
        )
    if count == 0:
        raise run_state.DataError(f"{files_flag} hold no records.")
    return count


# ----------------------------------------------------------------------------
# Writing (tests, small datasets)


def _bytes(value):
    import tensorflow as tf
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(*values):
    import tensorflow as tf
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _floats(*values):
    import tensorflow as tf
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def make_example(jpeg, label, height, width, synset="n00000000",
                 filename="image.JPEG"):
    """A `tf.train.Example` in the layout of the TPU / Model Garden ImageNet
    conversion tools (`label` 1-based)."""
    import tensorflow as tf
    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": _bytes(jpeg),
        "image/format": _bytes(b"JPEG"),
        "image/height": _ints(height),
        "image/width": _ints(width),
        "image/colorspace": _bytes(b"RGB"),
        "image/channels": _ints(3),
        "image/class/label": _ints(label),
        "image/class/synset": _bytes(synset.encode()),
        "image/class/text": _bytes(b"a class"),
        "image/filename": _bytes(filename.encode()),
        "image/object/bbox/xmin": _floats(0.1),
        "image/object/bbox/ymin": _floats(0.1),
        "image/object/bbox/xmax": _floats(0.9),
        "image/object/bbox/ymax": _floats(0.9),
        "image/object/bbox/label": _ints(label),
    }))


def write_shards(directory, prefix, images, labels, num_shards):
    """Writes uint8 HWC `images` with 1-based `labels` as JPEG records in
    `num_shards` files `{prefix}-0000i-of-0000n`; returns the paths."""
    import tensorflow as tf
    paths = []
    for shard, indices in enumerate(
            np.array_split(np.arange(len(images)), num_shards)):
        path = f"{directory}/{prefix}-{shard:05d}-of-{num_shards:05d}"
        with tf.io.TFRecordWriter(path) as writer:
            for i in indices:
                jpeg = tf.io.encode_jpeg(images[i], quality=90).numpy()
                height, width = images[i].shape[:2]
                writer.write(make_example(
                    jpeg, int(labels[i]), height, width,
                    filename=f"{prefix}_{i}.JPEG",
                ).SerializeToString())
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------
# Preprocessing


def decode_train(encoded, seed, image_size):
    """JPEG bytes -> a random-resized-crop, flipped, normalised float32
    `[image_size, image_size, 3]` image; `seed` is a stateless seed."""
    import tensorflow as tf
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2)
    )
    shape = tf.io.extract_jpeg_shape(encoded)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    # The whole image comes back when all 10 attempts failed: MLPerf then
    # takes the centre crop instead.
    failed = tf.reduce_all(tf.equal(shape[:2], size[:2]))

    def random_crop():
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
        return tf.image.resize(image, [image_size, image_size], "bilinear")

    def centre_crop():
        image = tf.io.decode_jpeg(encoded, channels=3)
        return data.center_crop(image, image_size)

    image = tf.cond(failed, centre_crop, random_crop)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(
        data.normalize(image, 3), [image_size, image_size, 3]
    )


def decode_eval(encoded, image_size):
    """JPEG bytes -> the normalised central crop (ratio 0.875)."""
    import tensorflow as tf
    # decode_jpeg also decodes PNG and GIF; training's decode_and_crop_jpeg
    # does not. Both reject what is not a JPEG.
    encoded = _checked(encoded, [(tf.io.is_jpeg(encoded), "not a JPEG")])
    image = data.center_crop(tf.io.decode_jpeg(encoded, channels=3),
                             image_size)
    return tf.ensure_shape(
        data.normalize(image, 3), [image_size, image_size, 3]
    )


def _or_failed(fn, args, failed_value):
    """`(fn(*args), True)`, or `(failed_value, False)` where `fn` raises.

    tf.data has no try/except; a one-element dataset with `ignore_errors`
    is one. It keeps the record's file and index at hand for the message
    (a decode error of TensorFlow names neither) and swallows nothing
    upstream. Costs ~0.1 ms of host CPU per record.
    """
    import tensorflow as tf
    attempt = tf.data.Dataset.from_tensors(args).map(
        lambda *a: (fn(*a), tf.constant(True))
    ).ignore_errors()
    fallback = tf.data.Dataset.from_tensors((failed_value, tf.constant(False)))
    return attempt.concatenate(fallback).take(1).get_single_element()


def _where(flag, file, record):
    import tensorflow as tf
    return tf.strings.join([
        records.MARKER, flag, ": ", file, ", record ",
        tf.strings.as_string(record), ": ",
    ])


def _checked(value, checks):
    """`value` once every `(condition, message)` of `checks` holds."""
    import tensorflow as tf
    asserts = [tf.debugging.Assert(condition, [message])
               for condition, message in checks]
    with tf.control_dependencies(asserts):
        return tf.nest.map_structure(tf.identity, value)


# ----------------------------------------------------------------------------
# Input functions


class TFRecordInput(data.InputSpec):
    """Input function over ImageNet TFRecords; see the module docstring.

    Args:
        files: comma-separated globs or a list of them (gs:// allowed).
        global_batch_size: examples per step over all replicas.
        training: training (shuffled, augmented, `(images, labels)`) or
            evaluation (`(images, labels, weights)`, weight 0 on padding).
        image_size: output height and width.
        num_classes: labels in the files must lie in [1, num_classes].
        num_examples: records in `files`; 0 counts them (reads every file
            and checks it whole). A wrong count is an error when the input
            reads past it or runs short (training: unless the files are
            sharded over several input pipelines).
        seed: seed of file order, shuffling and augmentation.
        shuffle_buffer: records in the shuffle buffer (serialised: ~110 KB
            each for ImageNet).
        cycle_length: files read in parallel per input pipeline.
        files_flag, count_flag: names for error messages.
        log: a `print`-like function for the note that the files are being
            counted (`None`: no note).
    """

    def __init__(self, files, global_batch_size, training, image_size=224,
                 num_classes=1000, num_examples=0, seed=0,
                 shuffle_buffer=10000, cycle_length=16,
                 files_flag="--train_files",
                 count_flag="--num_train_examples", log=None):
        for name, value in (("image_size", image_size),
                            ("num_classes", num_classes)):
            if value < 1:
                raise run_state.FlagError(
                    f"{name} must be >= 1. Received: {value}.")
        if num_examples < 0:
            raise run_state.FlagError(
                f"{count_flag} must be >= 0 (0: count the records). "
                f"Received: {num_examples}.")
        self.files = expand_globs(files, files_flag)
        self.files_flag = files_flag
        self.count_flag = count_flag
        # Each file's size: a file whose records do not add up to it is
        # truncated or corrupt (`records.checked_records`).
        self.sizes = records.file_sizes(self.files)
        super().__init__(
            resolve_count(self.files, num_examples, files_flag, count_flag,
                          log, self.sizes),
            global_batch_size, training, files_flag)
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.cycle_length = cycle_length

    def __call__(self, input_context=None, epoch=0, start_step=0):
        share = data._pipeline_share(input_context, self.global_batch_size)
        if self.training:
            return self._training(epoch, start_step, *share)
        return self._evaluation(*share)

    def _records(self, files):
        """`(file, record index, serialised example)`, files interleaved in
        a fixed order, read in parallel; a file that is truncated or
        corrupt stops the input with an error naming it and the record
        (`records.checked_records`)."""
        import tensorflow as tf
        flag = self.files_flag

        def read(file, size):
            return records.checked_records(file, size, flag).map(
                lambda index, record: (file, index, record))

        files = list(files)
        sizes = np.array([self.sizes[f] for f in files], np.int64)  # > 2 GB
        return tf.data.Dataset.from_tensor_slices((files, sizes)).interleave(
            read, cycle_length=min(self.cycle_length, len(files)),
            block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def _parse(self, file, record, serialized):
        """`(jpeg bytes, 0-based label)`, checked."""
        import tensorflow as tf
        features = tf.io.parse_single_example(serialized, {
            ENCODED_KEY: tf.io.FixedLenFeature([], tf.string, ""),
            LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, -1),
        })
        encoded, label = features[ENCODED_KEY], features[LABEL_KEY]
        where = _where(self.files_flag, file, record)
        label = _checked(label, [
            (tf.strings.length(encoded) > 0,
             tf.strings.join([where, f"no {ENCODED_KEY} (or an empty one)."])),
            (label != -1, tf.strings.join([where, f"no {LABEL_KEY}."])),
            (tf.logical_or(label == -1, tf.logical_and(
                label >= 1, label <= self.num_classes)),
             tf.strings.join([
                 where, f"{LABEL_KEY} ", tf.strings.as_string(label),
                 f" is outside [1, {self.num_classes}] (labels in the files "
                 f"are 1-based; --num_classes={self.num_classes})."])),
        ])
        return encoded, tf.cast(label - 1, tf.int32)

    def _decode(self, fn, args, file, record):
        import tensorflow as tf
        size = self.image_size
        image, decoded = _or_failed(fn, args, tf.zeros([size, size, 3]))
        return _checked(image, [(decoded, tf.strings.join([
            _where(self.files_flag, file, record),
            f"{ENCODED_KEY} does not decode as a JPEG."]))])

    def _training(self, epoch, start_step, per_replica, replicas, pipelines,
                  pipeline_id):
        import tensorflow as tf
        files = np.array(self.files)
        files = files[np.random.default_rng([self.seed, epoch]).permutation(
            len(files))]
        shard_files = pipelines > 1 and len(files) >= pipelines
        if shard_files:
            files = files[pipeline_id::pipelines]
        ds = self._records(files)
        if not shard_files:
            # This pipeline's share of the records is known: a count that
            # differs from --num_train_examples stops the input.
            if pipelines > 1:
                ds = ds.shard(pipelines, pipeline_id)
            ds = self._count_checked(
                ds, len(range(pipeline_id, self.num_examples, pipelines)),
                pipelines, pipeline_id)
        base = self.seed * 100003 + epoch
        # Shuffle, then repeat(): an epoch is a permutation of the pipeline's
        # records, and a pipeline whose files hold a few records fewer than
        # its share wraps around instead of running dry.
        ds = ds.shuffle(
            self.shuffle_buffer, seed=base, reshuffle_each_iteration=False
        ).repeat().enumerate()
        ds = ds.skip(start_step * per_replica * replicas)
        size = self.image_size

        def load(position, example):
            file, record, serialized = example
            encoded, label = self._parse(file, record, serialized)
            seed = tf.stack([tf.constant(base, tf.int64), position])
            image = self._decode(
                lambda e, s: decode_train(e, s, size), (encoded, seed),
                file, record,
            )
            return image, label

        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(per_replica, drop_remainder=True)
        ds = ds.take((self.steps_per_epoch - start_step) * replicas)
        return _deterministic(ds)

    def _evaluation(self, per_replica, replicas, pipelines, pipeline_id):
        # Examples, not files, are sharded: each pipeline's share is known
        # from the count alone, and padding fills it up to whole batches.
        import tensorflow as tf
        ds = self._records(self.files)
        if pipelines > 1:
            ds = ds.shard(pipelines, pipeline_id)
        share = len(range(pipeline_id, self.num_examples, pipelines))
        ds = self._count_checked(ds, share, pipelines, pipeline_id)
        size = self.image_size

        def load(file, record, serialized):
            encoded, label = self._parse(file, record, serialized)
            image = self._decode(lambda e: decode_eval(e, size), (encoded,),
                                 file, record)
            return image, label, tf.constant(1.0)

        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        padding = tf.data.Dataset.from_tensors((
            tf.zeros([size, size, 3]), tf.constant(0), tf.constant(0.0),
        )).repeat()
        ds = ds.concatenate(padding).take(
            self.steps_per_epoch * per_replica * replicas
        )
        return _deterministic(ds.batch(per_replica, drop_remainder=True))

    def _count_checked(self, ds, share, pipelines, pipeline_id):
        """`ds` (this pipeline's `share` records), each record let through
        only once the next one (or the end) has been seen: a count that is
        too small or too large is an error before the last record leaves."""
        import tensorflow as tf
        end = tf.data.Dataset.from_tensors(
            (tf.constant(""), tf.constant(-1, tf.int64), tf.constant(""),
             tf.constant(True))
        )
        ds = ds.take(share + 1).map(
            lambda *record: record + (tf.constant(False),)
        ).concatenate(end).enumerate()
        short = (f"{records.MARKER}{self.files_flag}: input pipeline {pipeline_id} of "
                 f"{pipelines} expected {share} records "
                 f"({self.count_flag}={self.num_examples}) and found only ")
        more = (f"{records.MARKER}{self.files_flag} hold more records than "
                f"{self.count_flag}={self.num_examples} (input pipeline "
                f"{pipeline_id} of {pipelines} found more than {share}). "
                f"Give the right count, or 0 to count them.")

        def delay(previous, item):
            index, (file, record, serialized, is_end) = item
            current = _checked((file, record, serialized, tf.constant(True)), [
                (tf.logical_or(is_end, index < share), more),
                (tf.logical_or(tf.logical_not(is_end), index >= share),
                 tf.strings.join([short, tf.strings.as_string(index), "."])),
            ])
            return current, previous

        start = (tf.constant(""), tf.constant(-1, tf.int64), tf.constant(""),
                 tf.constant(False))
        ds = ds.scan(start, delay).filter(lambda *record: record[-1])
        return ds.map(lambda file, record, serialized, _: (
            file, record, serialized))


def _deterministic(ds):
    import tensorflow as tf
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class SyntheticInput(data.InputSpec):
    """Synthetic ImageNet: `(indices, labels)` batches for training,
    `(indices, labels, weights)` for evaluation (padding weighted 0). The
    images are made from the indices on the device: `synthetic_images`.

    Args:
        num_examples: examples per epoch.
        image_size, num_classes: the shapes of the real data.
    """

    def __init__(self, num_examples, global_batch_size, training,
                 image_size=224, num_classes=1000, seed=0):
        super().__init__(num_examples, global_batch_size, training)
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed

    def __call__(self, input_context=None, epoch=0, start_step=0):
        import tensorflow as tf
        per_replica, replicas, pipelines, pipeline_id = data._pipeline_share(
            input_context, self.global_batch_size
        )
        steps, n = self.steps_per_epoch, self.num_examples
        first = (epoch * steps + start_step) * self.global_batch_size
        count = (steps - start_step) * self.global_batch_size
        ds = tf.data.Dataset.range(first, first + count)
        ds = ds.shard(pipelines, pipeline_id)
        seed, classes = self.seed, self.num_classes

        def example(index):
            label = tf.random.stateless_uniform(
                [], tf.stack([tf.constant(seed, tf.int64), index]),
                maxval=classes, dtype=tf.int32,
            )
            if self.training:
                return index, label
            return index, label, tf.cast(index < n, tf.float32)

        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
        return _deterministic(ds.batch(per_replica, drop_remainder=True))

    def numpy_batches(self, epoch=0, start_step=0, process_count=1,
                      process_index=0):
        """This process's share of each global batch, as NumPy (the JAX
        engine; no TensorFlow): example indices (int32) and labels (plus
        weights for evaluation); the images are made on the device."""
        start, stop = data.process_share(self.global_batch_size,
                                         process_count, process_index)
        return self._numpy_batches(epoch, start_step, start, stop)

    def _numpy_batches(self, epoch, start_step, start, stop):
        batch, n = self.global_batch_size, self.num_examples
        for step in range(start_step, self.steps_per_epoch):
            first = (epoch * self.steps_per_epoch + step) * batch
            indices = np.arange(first + start, first + stop, dtype=np.int64)
            if indices[-1] >= 2 ** 31:
                raise run_state.FlagError(
                    "Synthetic data on JAX numbers examples in int32: "
                    f"{indices[-1]} examples is past it. Lower --epochs or "
                    "--num_train_examples.")
            labels = synthetic_labels(indices, self.seed, self.num_classes)
            if self.training:
                yield indices.astype(np.int32), labels
            else:
                yield (indices.astype(np.int32), labels,
                       (indices < n).astype(np.float32))


def synthetic_labels(indices, seed, num_classes):
    """Labels of synthetic examples, a hash of `(seed, index)` (NumPy: the
    JAX engine's input; the TensorFlow pipeline draws its own)."""
    x = (indices.astype(np.uint64) + np.uint64(seed) * np.uint64(
        0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    # splitmix64's finaliser
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_classes)).astype(np.int32)


def synthetic_images(indices, image_size, seed=0):
    """Random normal images `[len(indices), size, size, 3]` (the statistics
    of normalised images), made where this runs (on the device)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        key = jax.random.fold_in(jax.random.key(seed), indices[0])
        return jax.random.normal(
            key, (indices.shape[0], image_size, image_size, 3))
    import tensorflow as tf
    return tf.random.stateless_normal(
        [tf.shape(indices)[0], image_size, image_size, 3],
        tf.stack([tf.constant(seed, tf.int64), indices[0]]),
    )


class SyntheticImagesTask:
    """A trainer `Task` for `SyntheticInput`: wraps a classification task
    (`tpu_scripts.trainer.ClassificationTask`) and, inside the replica's
    step, replaces each batch's indices by `synthetic_images`. Labels and
    weights keep their places, so metrics and padding work unchanged."""

    def __init__(self, task, image_size, seed=0):
        self.task = task
        self.image_size = image_size
        self.seed = seed

    def __getattr__(self, name):  # build_model, update_metrics, ...
        return getattr(self.task, name)

    def compute_loss(self, model, batch, training):
        images = synthetic_images(batch[0], self.image_size, self.seed)
        return self.task.compute_loss(
            model, (images,) + tuple(batch[1:]), training
        )
