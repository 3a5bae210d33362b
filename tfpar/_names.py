"""Names the ``tfpar`` command offers before TensorFlow loads (no imports at all).

The argument parser needs the choices of ``--model``, ``--strategy`` and ``--mixed-precision``
and the virtual-device limit, but the registries that own them import TensorFlow (6-10 s). These
tables are copies of the built-in entries; ``tests/test_cli.py`` checks that each equals what its
registry reports (``tfpar.models.available()``, ``tfpar.available_strategies()``,
``tfpar.strategies.MIXED_PRECISION_POLICIES``, ``tfpar.devices.MAX_VIRTUAL_DEVICES``), so they
cannot drift. Add a built-in model or strategy here too.
"""

from __future__ import annotations

__all__ = ["MAX_VIRTUAL_DEVICES", "MIXED_PRECISION_POLICIES", "MODELS", "STRATEGIES"]

#: ``tfpar.models.available()`` with only the built-in models registered (sorted).
MODELS = (
    "alexnet",
    "resnet50",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
)

#: ``tfpar.available_strategies()`` with only the built-in strategies registered (sorted,
#: aliases included).
STRATEGIES = (
    "auto",
    "central_storage",
    "default",
    "mirrored",
    "multi_worker",
    "multi_worker_mirrored",
    "one_device",
    "parameter_server",
    "ps",
)

#: ``tfpar.strategies.MIXED_PRECISION_POLICIES``.
MIXED_PRECISION_POLICIES = ("mixed_float16", "mixed_bfloat16")

#: ``tfpar.devices.MAX_VIRTUAL_DEVICES``: the most virtual devices ``--devices`` may create.
MAX_VIRTUAL_DEVICES = 64
