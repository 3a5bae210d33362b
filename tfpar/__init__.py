"""tfpar: one-line, correct data and model parallelism for TensorFlow / Keras 3.

Example:
    import tfpar
    with tfpar.scope("mirrored"):
        model = tfpar.models.alexnet(input_shape=(64, 64, 3), num_classes=10)
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64)

Names are loaded on first use (PEP 562), so ``import tfpar`` does not import TensorFlow until a
tfpar function is touched; the ``tfpar`` command uses that to configure TensorFlow's logging first.
"""

from __future__ import annotations

import importlib
from typing import Any

from tfpar.version import __version__

# name -> (module, attribute or None for the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "available_strategies": ("tfpar.strategies", "available_strategies"),
    "configure_virtual_devices": ("tfpar.devices", "configure_virtual_devices"),
    "get_strategy": ("tfpar.strategies", "get_strategy"),
    "register_strategy": ("tfpar.strategies", "register_strategy"),
    "scope": ("tfpar.strategies", "scope"),
    "local_cluster": ("tfpar.cluster", "local_cluster"),
    "cluster": ("tfpar.cluster", None),
    "coordinator": ("tfpar.coordinator", None),
    "data": ("tfpar.data", None),
    "datasets": ("tfpar.datasets", None),
    "devices": ("tfpar.devices", None),
    "doctor": ("tfpar.doctor", None),
    "job": ("tfpar.job", None),
    "launch": ("tfpar.launch", None),
    "models": ("tfpar.models", None),
    "parallel": ("tfpar.parallel", None),
    "profiling": ("tfpar.profiling", None),
    "strategies": ("tfpar.strategies", None),
    "training": ("tfpar.training", None),
    "tuning": ("tfpar.tuning", None),
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfpar' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
