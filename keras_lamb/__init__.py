"""LAMB and LARS, the layer-wise adaptive large-batch optimizers, for Keras 3."""

from keras_lamb.lamb import LAMB
from keras_lamb.lars import LARS

# `plot` imports matplotlib (an optional dependency) only when it draws.
from keras_lamb import callbacks, plot, recipes, schedules  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LAMB",
    "LARS",
    "__version__",
    "callbacks",
    "plot",
    "recipes",
    "schedules",
]
