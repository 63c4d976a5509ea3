"""TensorBoard scalars for both engines.

`create_writer(log_dir)` returns a writer with `write(scalars, step)` and
`flush()`:

- in a process that has imported TensorFlow, TensorFlow's own summary op
  writes (so training needs no `tensorboard` package; viewing does);
- otherwise `tensorboardX` writes the same event files (the JAX engine
  without TensorFlow; `pip install tensorboardX`);
- with neither, a writer that writes nothing, and says so once.

Writes go through the filesystems of the library underneath (TensorFlow's
gfile, or tensorboardX's local/gs:// support).
"""

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


class _TensorBoardXWriter:
    def __init__(self, log_dir):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(log_dir, flush_secs=60)

    def write(self, scalars, step):
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), int(step))

    def flush(self):
        self._writer.flush()


class NullWriter:
    """Writes nothing."""

    def write(self, scalars, step):
        pass

    def flush(self):
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
