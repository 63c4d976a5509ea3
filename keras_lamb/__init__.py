"""LAMB and LARS, the layer-wise adaptive large-batch optimizers, for Keras 3."""

from keras_lamb.lamb import LAMB
from keras_lamb.lars import LARS

__version__ = "0.1.0"

__all__ = ["LAMB", "LARS", "__version__"]
