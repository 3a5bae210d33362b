"""Argument checks with one rule and one message format, for every tfpar module.

A wrong *type* raises ``TypeError``, a wrong *value* of the right type raises ``ValueError``
(DESIGN.md's convention), and both say what was expected, then what was received, Keras-style:
``Expected `batch_size` to be an int >= 1. Received: batch_size=0 (of type int)``. ``bool`` is
never accepted as a number. Imports nothing from tfpar and no TensorFlow.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, cast

__all__ = ["check_choice", "check_fraction", "check_int", "check_positive_number", "received"]


def received(name: str, value: Any) -> str:
    """The ``Received: name=value (of type T)`` tail of every message.

    Example:
        >>> tfpar._validation.received("seed", "1")
        "Received: seed='1' (of type str)"
    """
    return f"Received: {name}={value!r} (of type {type(value).__name__})"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    expected: str | None = None,
    hint: str = "",
) -> Any:
    """Returns `value` as an ``int`` (or None, if allowed) after checking it.

    Args:
        name: The argument's name, for the message.
        value: The value to check; any integral number except ``bool``.
        minimum: The smallest accepted value, if any.
        maximum: The largest accepted value, if any.
        allow_none: Accept None (and return it).
        expected: What the message says is expected, when an int is not all the caller accepts,
            e.g. ``"an int >= 1 or 'auto'"``; default: ``"an int"`` and the bounds.
        hint: A sentence appended to the message of either error (the fix).

    Returns:
        ``int(value)``, or None.

    Raises:
        TypeError: If `value` is not an integer (``bool`` included).
        ValueError: If `value` is outside ``[minimum, maximum]``.

    Example:
        >>> tfpar._validation.check_int("epochs", 3, minimum=1)
        3
        >>> tfpar._validation.check_int("epochs", 0, minimum=1)
        Traceback (most recent call last):
        ValueError: Expected `epochs` to be an int >= 1. Received: epochs=0 (of type int)
    """
    if value is None and allow_none:
        return None
    if expected is None:
        expected = f"an int{_bounds(minimum, maximum)}{' or None' if allow_none else ''}"
    sentence = f"Expected `{name}` to be {expected}."
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(_message(sentence, name, value, hint))
    number = int(value)  # exact for an Integral; typeshed's numbers.Integral has no comparison operators
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(_message(sentence, name, value, hint))
    return int(value)


def check_positive_number(name: str, value: Any, *, allow_zero: bool = False, hint: str = "") -> float:
    """Returns `value` as a ``float`` after checking it is a finite number > 0 (>= 0 with `allow_zero`).

    Args:
        name: The argument's name, for the message.
        value: The value to check; any real number except ``bool``.
        allow_zero: Accept 0.
        hint: A sentence appended to the message of either error.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: If `value` is not a real number.
        ValueError: If it is NaN, infinite, negative, or zero without `allow_zero`.

    Example:
        >>> tfpar._validation.check_positive_number("learning_rate", 0.1)
        0.1
    """
    bound = ">= 0" if allow_zero else "> 0"
    expected = f"Expected `{name}` to be a finite number {bound}."
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(_message(expected, name, value, hint))
    real = cast(float, value)  # typeshed's numbers.Real has no comparison operators; compare the value itself
    if not math.isfinite(real) or (real < 0 if allow_zero else real <= 0):
        raise ValueError(_message(expected, name, value, hint))
    return float(value)


def check_fraction(name: str, value: Any, *, hint: str = "") -> float:
    """Returns `value` as a ``float`` after checking it is a number in ``[0, 1]``.

    Raises:
        TypeError: If `value` is not a real number.
        ValueError: If it is NaN or outside ``[0, 1]``.

    Example:
        >>> tfpar._validation.check_fraction("validation_split", 0.2)
        0.2
    """
    expected = f"Expected `{name}` to be a fraction in [0, 1]."
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(_message(expected, name, value, hint))
    real = cast(float, value)  # typeshed's numbers.Real has no comparison operators; compare the value itself
    if not 0.0 <= real <= 1.0:  # False for NaN too
        raise ValueError(_message(expected, name, value, hint))
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any], *, hint: str = "") -> Any:
    """Returns `value` after checking it is one of `choices`.

    Raises:
        TypeError: If every choice is a string and `value` is not.
        ValueError: If `value` is not one of `choices`.

    Example:
        >>> tfpar._validation.check_choice("mode", "random", ("sequential", "random"))
        'random'
    """
    options = tuple(choices)
    expected = f"Expected `{name}` to be one of {', '.join(repr(c) for c in options)}."
    if all(isinstance(c, str) for c in options) and not isinstance(value, str):
        raise TypeError(_message(expected, name, value, hint))
    if value not in options:
        raise ValueError(_message(expected, name, value, hint))
    return value


def _bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _message(expected: str, name: str, value: Any, hint: str) -> str:
    return f"{expected} {received(name, value)}" + (f". {hint}" if hint else "")
