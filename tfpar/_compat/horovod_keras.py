"""Read-only accessors of Keras optimizer internals for ``tfpar.horovod.keras`` (nothing is patched).

``tfpar.horovod.keras.callbacks`` applies Horovod's momentum correction by scaling an optimizer's
momentum slots; Keras 3 keeps them under a public name in ``SGD`` (``momentums``) and a private one
in ``RMSprop`` (``_momentums``). Reading them here keeps private names out of tfpar.horovod.
"""

from __future__ import annotations

from typing import Any

__all__ = ["momentum_slots"]

_SLOT_ATTRIBUTES = ("momentums", "_momentums")


def momentum_slots(optimizer: Any) -> list[Any]:
    """The momentum (velocity) variables of a built Keras 3 optimizer that has them, else ``[]``.

    Args:
        optimizer: A Keras 3 optimizer (``SGD`` with ``momentum > 0``, ``RMSprop`` with
            ``momentum > 0``; others have none).

    Returns:
        The variables, one per trainable variable (``None`` entries dropped).
    """
    for attribute in _SLOT_ATTRIBUTES:
        slots = getattr(optimizer, attribute, None)
        if slots:
            return [slot for slot in slots if slot is not None]
    return []
