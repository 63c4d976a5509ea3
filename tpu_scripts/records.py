"""TFRecord files checked whole: counts, truncation and corruption.

A TFRecord file is a sequence of records, each framed as

    uint64 length | uint32 masked_crc32c(length) | data[length] |
    uint32 masked_crc32c(data)

(little-endian; `masked_crc32c` is TensorFlow's rotated CRC-32C). TensorFlow's
reader checks both checksums, but at the end of a file it stops *silently*
on a record cut short (a copy or upload that did not finish): the run goes on
with fewer records. A file is whole when its records' frames add up to its
size, `sum(16 + length)`; that is what this module checks, at no cost beyond
the read itself (one size look-up per file).

- `count_records(files)`: the number of records, with every file read once
  (both checksums verified by TensorFlow's reader) and its size checked; a
  damaged file is a `run_state.DataError` naming the file, the record and the
  byte offset.
- `checked_records(file, size, flag)`: the records of one file as a
  `tf.data` pipeline that raises (in the graph) at the end of a damaged file,
  naming it: for input pipelines that read files without counting them first.
- `locate_damaged_record(files)`: the message naming the first damaged file
  and record, or `None` (for turning a bare `DataLossError` into a message).
- `data_error(error)`: the `DataError` carried by a `tf.errors.OpError` that
  one of these checks raised in a graph, or `None`.
"""

import re
import struct
import sys

from tpu_scripts import run_state

HEADER_BYTES = 12  # uint64 length, uint32 masked CRC of the length
FOOTER_BYTES = 4  # uint32 masked CRC of the data
READ_BUFFER_BYTES = 8 << 20
# Every message of a damaged or miscounted input raised in a graph starts with
# this, so that `data_error` can find it in a TensorFlow error's text.
MARKER = "Data error: "


# ----------------------------------------------------------------------------
# CRC-32C (Castagnoli), only ever over a 8-byte length: pure Python is enough.


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    """TensorFlow's masked CRC of `data` (`tensorflow/core/lib/hash/crc32c.h`)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------
# Diagnosis of one file


def file_size(path):
    import tensorflow as tf
    return tf.io.gfile.stat(path).length


def file_sizes(files):
    """`{file: size in bytes}`, looked up in parallel (a look-up on GCS
    takes tens of milliseconds; ImageNet has 1152 files)."""
    from concurrent.futures import ThreadPoolExecutor

    files = list(files)
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(files)))) as pool:
        return dict(zip(files, pool.map(file_size, files)))


def describe_damage(path, record, offset, size):
    """Why the frame of record `record`, starting at byte `offset` of `path`
    (a file of `size` bytes), cannot be read: one sentence."""
    import tensorflow as tf
    left = size - offset
    where = f"{path}, record {record} (byte {offset} of {size})"
    if left < HEADER_BYTES:
        return (f"{where}: the file ends inside the record's header "
                f"({left} of {HEADER_BYTES} bytes): the file is truncated.")
    with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(offset)
        header = f.read(HEADER_BYTES)
    length, length_crc = struct.unpack("<QI", header)
    if masked_crc32c(header[:8]) != length_crc:
        return (f"{where}: the checksum of the record's length does not "
                "match: the file is corrupt.")
    if left < HEADER_BYTES + length + FOOTER_BYTES:
        return (f"{where}: the record holds {length} bytes but the file "
                f"ends {left - HEADER_BYTES} bytes after its header: the "
                "file is truncated.")
    return (f"{where}: the checksum of the record's {length} bytes does not "
            "match (or the file could not be read to its end): the file is "
            "corrupt.")


def damage(path, records, consumed, size, flag=""):
    """The `DataError` of a file whose `records` whole records end at byte
    `consumed` of `size`."""
    prefix = f"{flag}: " if flag else ""
    return run_state.DataError(
        prefix + describe_damage(path, records, consumed, size)
        + f" {records} whole records precede it. Replace the file (or leave "
        "it out of the glob).")


# ----------------------------------------------------------------------------
# Counting and checking


def _file_totals(path):
    """`(records, bytes of their frames)` of `path`, read as far as
    TensorFlow's reader goes (a checksum error ends the read early)."""
    import tensorflow as tf
    records = tf.data.TFRecordDataset(
        path, buffer_size=READ_BUFFER_BYTES).ignore_errors(log_warning=False)
    return records.reduce(
        (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
        lambda totals, record: (
            totals[0] + 1,
            totals[1] + HEADER_BYTES + FOOTER_BYTES
            + tf.cast(tf.strings.length(record), tf.int64)),
    )


def count_records(files, flag="", sizes=None):
    """The number of records in `files`, each file read once (in parallel)
    and checked whole: both checksums of every record, and frames that add
    up to the file's size (`sizes`: `{file: size}`, looked up when not
    given). Raises `run_state.DataError` naming the first damaged file (in
    the order of `files`), the record and the byte."""
    import tensorflow as tf
    files = list(files)
    if not files:
        return 0
    sizes = sizes or file_sizes(files)
    sizes = [sizes[f] for f in files]

    def totals(path):
        return tf.data.Dataset.from_tensors(_file_totals(path))

    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        totals, cycle_length=min(16, len(files)), block_length=1,
        num_parallel_calls=min(16, len(files)), deterministic=True,
    )
    count = 0
    for path, size, (records, consumed) in zip(files, sizes, ds):
        records, consumed = int(records), int(consumed)
        if consumed != size:
            raise damage(path, records, consumed, size, flag)
        count += records
    return count


def checked_records(path, size, flag=""):
    """`(record index, serialised record)` of the file `path` (`size`
    bytes; tensors or Python values), which fails with an
    `InvalidArgumentError` whose message (`MARKER`, then the file, record
    and byte; `data_error` recovers it) says the file is damaged once its
    records are read and their frames do not add up to `size`: truncation
    or corruption anywhere in it. (Reading it costs nothing more.)"""
    import tensorflow as tf
    records = tf.data.TFRecordDataset(
        path, buffer_size=READ_BUFFER_BYTES).ignore_errors(log_warning=False)
    end = tf.data.Dataset.from_tensors((tf.constant(""), tf.constant(True)))
    records = records.map(lambda r: (r, tf.constant(False))).concatenate(end)
    size = tf.cast(size, tf.int64)
    start = (tf.constant(0, tf.int64), tf.constant(0, tf.int64))

    def step(state, item):
        index, consumed = state
        record, is_end = item
        whole = tf.logical_or(tf.logical_not(is_end), consumed == size)
        message = tf.strings.join([
            MARKER, f"{flag}: " if flag else "", path, ", record ",
            tf.strings.as_string(index), " (byte ", tf.strings.as_string(
                consumed), " of ", tf.strings.as_string(size),
            "): the file is truncated or corrupt (its records end or break "
            "before its last byte, or it could not be read to its end). "
            "Replace the file (or leave it out of the glob).",
        ])
        check = tf.debugging.Assert(whole, [message])
        with tf.control_dependencies([check]):
            index = tf.identity(index)
        consumed = consumed + HEADER_BYTES + FOOTER_BYTES + tf.cast(
            tf.strings.length(record), tf.int64)
        return (index + 1, consumed), (index, record, is_end)

    return records.scan(start, step).filter(
        lambda index, record, is_end: tf.logical_not(is_end)
    ).map(lambda index, record, is_end: (index, record))


def locate_damaged_record(files, flag=""):
    """The message naming the first damaged file of `files` (truncated, or
    a checksum that does not match), with its record and byte, or `None`
    when every file is whole. Reads every file once."""
    try:
        count_records(files, flag)
    except run_state.DataError as e:
        return str(e)
    return None


# In a TensorFlow error, an assertion's message reads `assertion failed:
# [<message>]`, then a newline, `[[{{node ...}}]]` or `[Op:...]`.
_ASSERT_MESSAGE = re.compile(
    re.escape(MARKER) + r"([^\n]*?)\](?=\s*(?:\n|$|\[\[|\[Op:))")


def data_error(error):
    """The `run_state.DataError` whose message a check of this module (or
    one that starts its message with `MARKER`) put into `error` (a
    `tf.errors.OpError` from a graph, or any exception), or `None`."""
    if isinstance(error, run_state.DataError):
        return error
    match = _ASSERT_MESSAGE.search(str(getattr(error, "message", error)))
    if match is None:
        return None
    return run_state.DataError(match.group(1).strip())


def data_errors_raised(fn):
    """`fn`, with a `tf.errors.OpError` that carries a data check's message
    (`data_error`) raised as that `run_state.DataError` instead."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 re-raised unless a data error
            tf = sys.modules.get("tensorflow")
            if tf is None or not isinstance(e, tf.errors.OpError):
                raise
            error = data_error(e)
            if error is None:
                raise
            raise error from None

    return wrapper
