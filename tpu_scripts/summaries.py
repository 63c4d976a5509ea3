"""TensorBoard scalars for both engines.

`create_writer(log_dir)` returns a writer with `write(scalars, step)`,
`flush()` and `close()`:

- in a process that has imported TensorFlow, TensorFlow's own summary op
  writes (so training needs no `tensorboard` package; viewing does);
- otherwise `tensorboardX`'s record writer and protos write the same
  event files, synchronously (the JAX engine without TensorFlow; `pip
  install tensorboardX`);
- with neither, a writer that writes nothing, and says so once.

Writes go through the filesystems of the library underneath (TensorFlow's
gfile, or tensorboardX's local/gs:// support).
"""

import os
import sys


class _TensorFlowWriter:
    def __init__(self, log_dir):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._writer = tf.summary.create_file_writer(log_dir)
        # TensorBoard's scalar format, written with TensorFlow's own op.
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )

    def write(self, scalars, step):
        tf = self._tf
        with self._writer.as_default():
            for name, value in scalars.items():
                tf.summary.write(name, tf.constant(value, tf.float32),
                                 step=step, metadata=self._metadata)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class _TensorBoardXWriter:
    """Event files written with tensorboardX's record writer and protos,
    synchronously: every failure (a full disk) surfaces in `write` or
    `flush`, where the engine turns summaries off, instead of in a
    background thread."""

    def __init__(self, log_dir):
        import socket
        import time

        from tensorboardX.proto import event_pb2
        from tensorboardX.record_writer import RecordWriter, directory_check

        self._event_pb2 = event_pb2
        directory_check(log_dir)
        self._writer = RecordWriter(os.path.join(
            log_dir, f"events.out.tfevents.{int(time.time())}."
            f"{socket.gethostname()}.{os.getpid()}"))
        self._write_event(file_version="brain.Event:2")

    def _write_event(self, **fields):
        import time

        event = self._event_pb2.Event(wall_time=time.time(), **fields)
        self._writer.write(event.SerializeToString())

    def write(self, scalars, step):
        from tensorboardX.summary import scalar

        for name, value in scalars.items():
            self._write_event(step=int(step),
                              summary=scalar(name, float(value)))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class NullWriter:
    """Writes nothing."""

    def write(self, scalars, step):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def create_writer(log_dir, log=print):
    """A scalar writer for `log_dir` (see the module docstring)."""
    if sys.modules.get("tensorflow") is not None:
        return _TensorFlowWriter(log_dir)
    try:
        return _TensorBoardXWriter(log_dir)
    except ImportError:
        log(f"TensorBoard summaries are off ({log_dir}): without TensorFlow "
            "they need tensorboardX (pip install tensorboardX). "
            "results.json and the progress lines are written.")
        return NullWriter()
