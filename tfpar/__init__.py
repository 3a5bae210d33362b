"""tfpar: one-line, correct data and model parallelism for TensorFlow / Keras 3.

Example:
    import tfpar
    with tfpar.scope("mirrored"):
        model = tfpar.models.alexnet(input_shape=(64, 64, 3), num_classes=10)
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64)
"""

from tfpar import datasets, devices, models, strategies, training
from tfpar.devices import configure_virtual_devices
from tfpar.strategies import (
    available_strategies,
    get_strategy,
    register_strategy,
    scope,
)
from tfpar.version import __version__

__all__ = [
    "__version__",
    "available_strategies",
    "configure_virtual_devices",
    "datasets",
    "devices",
    "get_strategy",
    "models",
    "register_strategy",
    "scope",
    "strategies",
    "training",
]
