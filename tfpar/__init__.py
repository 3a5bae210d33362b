"""tfpar: one-line, correct data and model parallelism for TensorFlow / Keras 3."""

from tfpar import devices
from tfpar.devices import configure_virtual_devices
from tfpar.version import __version__

__all__ = ["__version__", "configure_virtual_devices", "devices"]
