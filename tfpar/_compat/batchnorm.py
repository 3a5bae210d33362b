"""batchnorm-default: synchronized BatchNormalization inside ``tfpar.scope(..., sync_batchnorm=True)``.

Unsynchronized BatchNormalization computes batch statistics per replica, so moving mean and
variance depend on the replica count (13.2 apart on 2 replicas, 4e-6 with ``synchronized=True``).
Keras 3 leaves ``synchronized=False`` by default. While the scope option is open,
``keras.layers.BatchNormalization(...)`` defaults to ``synchronized=True``; an explicit argument
wins. Installed the first time the option is used. Fit under a multi-replica strategy warns once
per model that still has unsynchronized layers (:func:`warn_unsynchronized_batchnorm`).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any

import tensorflow as tf

from tfpar._compat import _patching, internals

INIT = "keras:layers.BatchNormalization.__init__"

_DEPTH = threading.local()  # open sync_batchnorm scopes in this thread
_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()


def _batchnorm_init(self: Any, *args: Any, **kwargs: Any) -> None:
    if getattr(_DEPTH, "depth", 0) > 0 and "synchronized" not in kwargs:
        kwargs["synchronized"] = True
    INTERCEPTION.original(INIT)(self, *args, **kwargs)


class synchronized_batchnorm:  # noqa: N801 (a context manager used like a function)
    """Makes BatchNormalization layers created inside default to ``synchronized=True``."""

    def __enter__(self) -> None:
        _patching.install(INTERCEPTION)
        _DEPTH.depth = getattr(_DEPTH, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _DEPTH.depth -= 1


def warn_unsynchronized_batchnorm(model: Any, strategy: tf.distribute.Strategy) -> None:
    """Warns once per model that trains on several replicas with unsynchronized BatchNormalization."""
    if model in _WARNED:
        return
    names = [
        layer.name for layer in internals.batchnorm_layers(model) if not getattr(layer, "synchronized", False)
    ]
    if names:
        _WARNED.add(model)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        warnings.warn(
            f"Model {model.name!r} trains on {strategy.num_replicas_in_sync} replicas with "
            f"{len(names)} unsynchronized BatchNormalization layer(s) ({shown}): their batch "
            "statistics are computed per replica, so moving mean/variance depend on the replica "
            "count. Build the model under tfpar.scope(..., sync_batchnorm=True) or pass "
            "BatchNormalization(synchronized=True) to match single-device training.",
            stacklevel=4,
        )


INTERCEPTION = _patching.declare(_patching.Interception(
    slug="batchnorm-default",
    summary="BatchNormalization defaults to synchronized=True inside tfpar.scope(..., sync_batchnorm=True), "
    "so batch statistics do not depend on the replica count; a one-time warning otherwise",
    targets=(INIT,),
    upstream_issue="none: Keras 3 leaves BatchNormalization(synchronized=False) by default",
    test="tests/test_batchnorm.py::test_sync_batchnorm_scope_option_matches_single_device",
    patches={INIT: _batchnorm_init},
))
