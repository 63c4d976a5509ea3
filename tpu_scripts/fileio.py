"""File I/O for the scripts: local paths and gs:// (any filesystem of
`tf.io.gfile` or `fsspec`), with or without TensorFlow.

One small layer, so that run state, results, IDX files and checkpoint
bookkeeping work the same under both engines:

- in a process that has imported TensorFlow (the TensorFlow engine, or the
  JAX engine reading TFRecords with `tf.data`), every path of a scheme
  TensorFlow has (local, gs://, its `ram://`, which the tests use for
  gs://) goes through `tf.io.gfile`;
- otherwise local paths use the operating system directly, and other
  schemes (`gs://`, `s3://`, ...) use `fsspec` (gs:// needs `gcsfs`); where
  `fsspec` has no implementation installed and TensorFlow is installed,
  `tf.io.gfile` serves instead.

Errors are Python's: a missing file raises `FileNotFoundError`, every other
failure `OSError` (errno `ENOSPC` for a full disk), whichever library was
underneath.
"""

import errno
import glob as _glob
import os
import shutil
import sys

__all__ = [
    "GFile", "exists", "glob", "isdir", "listdir", "makedirs", "remove",
    "rename", "rmtree", "size",
]


def _tf_gfile(path):
    """`tf.io.gfile` when this process uses TensorFlow for `path`, else
    `None`."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and (_is_local(path) or _tf_knows(tf, path)
                           or not _fsspec_protocol_available(path)):
        return tf.io.gfile
    if _is_local(path) or _fsspec_protocol_available(path):
        return None
    try:
        import tensorflow as tf  # installed: its filesystems serve
    except ImportError:
        return None
    return tf.io.gfile


def _tf_knows(tf, path):
    """Whether TensorFlow has a filesystem for `path`'s scheme (gs://,
    ram://, ...; fsspec's memory://, for one, it has not)."""
    schemes = getattr(tf.io.gfile, "get_registered_schemes", None)
    return schemes is None or str(path).split("://", 1)[0] in schemes()


def _is_local(path):
    return "://" not in str(path) or str(path).startswith("file://")


def _fsspec_protocol_available(path):
    try:
        import fsspec
    except ImportError:
        return False
    protocol = str(path).split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return False
    return True


def _fs(path):
    """The `fsspec` filesystem of a non-local `path`."""
    try:
        import fsspec
    except ImportError:
        raise OSError(errno.ENOSYS, f"Cannot open {path}: install fsspec "
                      "(and gcsfs for gs://), or TensorFlow.") from None
    protocol = str(path).split("://", 1)[0]
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
        hint = " (pip install gcsfs)" if protocol in ("gs", "gcs") else ""
        raise OSError(errno.ENOSYS, f"Cannot open {path}: no filesystem "
                      f"for {protocol}://{hint}: {e}") from None


def _translated(fn):
    """Runs `fn()`, turning TensorFlow's file errors into Python's."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 translated below
        tf = sys.modules.get("tensorflow")
        if tf is None or not isinstance(e, tf.errors.OpError):
            raise
        message = getattr(e, "message", None) or str(e)
        if isinstance(e, tf.errors.NotFoundError):
            raise FileNotFoundError(errno.ENOENT, message) from None
        if "No space left on device" in message:
            raise OSError(errno.ENOSPC, message) from None
        if isinstance(e, tf.errors.AlreadyExistsError):
            raise FileExistsError(errno.EEXIST, message) from None
        raise OSError(errno.EIO, message) from None


def _local(path):
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def exists(path):
    gfile = _tf_gfile(path)
    if gfile is not None:
        return _translated(lambda: gfile.exists(path))
    if _is_local(path):
        return os.path.exists(_local(path))
    return _fs(path).exists(path)


def isdir(path):
    gfile = _tf_gfile(path)
    if gfile is not None:
        return _translated(lambda: gfile.isdir(path))
    if _is_local(path):
        return os.path.isdir(_local(path))
    return _fs(path).isdir(path)


def makedirs(path):
    gfile = _tf_gfile(path)
    if gfile is not None:
        return _translated(lambda: gfile.makedirs(path))
    if _is_local(path):
        return os.makedirs(_local(path), exist_ok=True)
    return _fs(path).makedirs(path, exist_ok=True)


def listdir(path):
    """The names (not paths) in directory `path`."""
    gfile = _tf_gfile(path)
    if gfile is not None:
        return [name.rstrip("/") for name in
                _translated(lambda: gfile.listdir(path))]
    if _is_local(path):
        return os.listdir(_local(path))
    fs = _fs(path)
    if not fs.isdir(path):
        raise FileNotFoundError(errno.ENOENT, f"No directory {path}")
    return [entry.rstrip("/").rsplit("/", 1)[-1]
            for entry in fs.ls(path, detail=False)]


def glob(pattern):
    """Sorted paths matching `pattern` (same scheme as the pattern)."""
    gfile = _tf_gfile(pattern)
    if gfile is not None:
        return sorted(_translated(lambda: gfile.glob(pattern)))
    if _is_local(pattern):
        return sorted(_glob.glob(_local(pattern)))
    fs = _fs(pattern)
    return sorted(p if "://" in p else fs.unstrip_protocol(p)
                  for p in fs.glob(pattern))


def remove(path):
    gfile = _tf_gfile(path)
    if gfile is not None:
        return _translated(lambda: gfile.remove(path))
    if _is_local(path):
        return os.remove(_local(path))
    fs = _fs(path)
    if not fs.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"No file {path}")
    return fs.rm(path)


def rmtree(path):
    gfile = _tf_gfile(path)
    if gfile is not None:
        return _translated(lambda: gfile.rmtree(path))
    if _is_local(path):
        return shutil.rmtree(_local(path))
    return _fs(path).rm(path, recursive=True)


def rename(source, destination, overwrite=False):
    """Renames a file; with `overwrite=False` an existing `destination`
    raises `FileExistsError` (atomic on local filesystems)."""
    gfile = _tf_gfile(source)
    if gfile is not None:
        return _translated(
            lambda: gfile.rename(source, destination, overwrite=overwrite))
    if _is_local(source):
        source, destination = _local(source), _local(destination)
        if overwrite:
            return os.replace(source, destination)
        try:  # a hard link fails if the destination exists: no race
            os.link(source, destination)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{destination} exists") \
                from None
        except OSError:  # a filesystem without hard links
            if os.path.exists(destination):
                raise FileExistsError(errno.EEXIST, f"{destination} exists") \
                    from None
            return os.rename(source, destination)
        os.remove(source)
        return None
    fs = _fs(source)
    if not overwrite and fs.exists(destination):
        raise FileExistsError(errno.EEXIST, f"{destination} exists")
    return fs.mv(source, destination)


def size(path):
    """The size of file `path` in bytes."""
    gfile = _tf_gfile(path)
    if gfile is not None:
        return _translated(lambda: gfile.stat(path).length)
    if _is_local(path):
        return os.path.getsize(_local(path))
    return _fs(path).size(path)


class GFile:
    """An open file (`with GFile(path, "rb") as f`), local or remote;
    modes `r`, `rb`, `w`, `wb`, `a`."""

    def __init__(self, path, mode="r"):
        self.path = path
        gfile = _tf_gfile(path)
        if gfile is not None:
            self._file = _translated(lambda: gfile.GFile(path, mode))
            if "r" in mode:  # TensorFlow opens lazily: fail here, not later
                if not _translated(lambda: gfile.exists(path)):
                    raise FileNotFoundError(errno.ENOENT, f"No file {path}")
        elif _is_local(path):
            self._file = open(_local(path), mode,
                              **({} if "b" in mode else {"encoding": "utf-8"}))
        else:
            self._file = _fs(path).open(path, mode)

    def read(self, *args):
        return _translated(lambda: self._file.read(*args))

    def write(self, data):
        return _translated(lambda: self._file.write(data))

    def flush(self):
        return _translated(self._file.flush)

    def fileno(self):
        return self._file.fileno()

    def close(self):
        return _translated(self._file.close)

    def __iter__(self):
        return iter(self.read().splitlines(keepends=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
