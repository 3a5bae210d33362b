"""The model registry: a model name (``"alexnet"``, ``"vgg16"``, ``"resnet50"``, ...) -> a builder.

``tfpar train --model NAME`` and ``tfpar plan NAME`` build any registered model from a string.
Names are matched case-insensitively and without ``-``/``_``/space separators (``"VGG-16"`` is
``"vgg16"``); an unknown name lists the available ones and suggests the closest.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import keras

from tfpar._registry import Registry
from tfpar.models import _blocks

# name -> (builder, preset options). Filled by tfpar/models/__init__.py through register(). An
# alias with options (``"vgg16_bn"``) is an entry whose preset fixes them.
_REGISTRY: Registry[tuple[Callable[..., keras.Model], dict[str, Any]]] = Registry("model")


def register(
    name: str,
    builder: Callable[..., keras.Model],
    *,
    preset: dict[str, Any] | None = None,
    override: bool = False,
) -> None:
    """Registers a model builder under a name, for `tfpar.models.get` and ``tfpar train --model``.

    Args:
        name: The model name (letters, digits, ``_``, ``-``); matched case-insensitively and
            without separators, so ``"vgg16_bn"`` is also found as ``"VGG16-BN"``.
        builder: A callable taking keyword options and returning a ``keras.Model``.
        preset: Options fixed by this name (an alias), e.g. ``{"batch_norm": True}`` for
            ``"vgg16_bn"``; callers cannot override them.
        override: Replace an existing entry of the same name instead of raising.

    Raises:
        TypeError: If `name` is not a string, `builder` is not callable or `preset` not a dict.
        ValueError: If `name` is empty or malformed, or already registered and
            ``override=False``.

    Example:
        >>> tfpar.models.register("vgg16_small", tfpar.models.vgg16, preset={"width": 0.25})
        >>> model = tfpar.models.get("vgg16_small", input_shape=(32, 32, 3), num_classes=10)
    """
    if not isinstance(name, str):
        raise TypeError(
            "Expected the model `name` to be a string such as 'alexnet'. "
            f"Received: name={name!r} (of type {type(name).__name__})"
        )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(
            "Expected the model `name` to start with a letter or digit and contain only letters, "
            f"digits, '_' and '-'. Received: name={name!r}"
        )
    if not callable(builder):
        raise TypeError(
            "Expected `builder` to be a callable returning a keras.Model. "
            f"Received: builder={builder!r} (of type {type(builder).__name__})"
        )
    if preset is not None and not isinstance(preset, dict):
        raise TypeError(
            "Expected `preset` to be a dict of options or None. "
            f"Received: preset={preset!r} (of type {type(preset).__name__})"
        )
    _REGISTRY.register(name, (builder, dict(preset or {})), override=override)


def available() -> list[str]:
    """Lists the registered model names, sorted.

    Returns:
        The names accepted by `tfpar.models.get`, e.g. ``["alexnet", "resnet50", "vgg11", ...]``.

    Example:
        >>> "vgg16" in tfpar.models.available()
        True
    """
    return _REGISTRY.names()


def accepted_options(name: str) -> list[str]:
    """Lists the options the model `name` accepts in `tfpar.models.get` (presets excluded).

    Args:
        name: A registered model name.

    Returns:
        The option names, in the builder's signature order.

    Raises:
        TypeError: If `name` is not a string.
        ValueError: If `name` is not registered (the error lists the available names).

    Example:
        >>> "width" in tfpar.models.accepted_options("vgg16")
        True
    """
    builder, preset = _REGISTRY.get(name)
    return [p for p in _parameters(builder) if p not in preset]


def min_input_size(name: str) -> int | None:
    """The smallest image side (height and width, in pixels) the model `name` accepts.

    Args:
        name: A registered model name.

    Returns:
        The minimum side, or None for a model registered without a declared minimum.

    Raises:
        TypeError: If `name` is not a string.
        ValueError: If `name` is not registered (the error lists the available names).

    Example:
        >>> tfpar.models.min_input_size("alexnet"), tfpar.models.min_input_size("vgg16")
        (55, 32)
    """
    builder, _ = _REGISTRY.get(name)
    entry = _blocks.MIN_INPUT_SIZES.get(builder)
    return None if entry is None else entry[0]


def check_input_shape(name: str, input_shape: Any) -> tuple[int, ...]:
    """Checks an input shape for the model `name` without building anything.

    Runs the same checks, with the same messages, as the model's builder: three positive ints
    (height, width, channels) at least :func:`min_input_size` pixels high and wide, with a hint
    when the shape looks channels-first. Cheap and free of TensorFlow side effects, so
    ``tfpar train`` / ``tfpar plan`` refuse a bad size before they build models or read data.

    Args:
        name: A registered model name.
        input_shape: The shape to check, e.g. ``(64, 64, 3)``.

    Returns:
        The shape as a tuple of ints (unchecked for a model registered without a declared
        minimum size).

    Raises:
        TypeError: If `name` is not a string or `input_shape` is not a tuple or list.
        ValueError: If `name` is unknown, or the shape is malformed or too small.

    Example:
        >>> tfpar.models.check_input_shape("alexnet", (64, 64, 3))
        (64, 64, 3)
        >>> tfpar.models.check_input_shape("alexnet", (8, 8, 3))
        Traceback (most recent call last):
        ValueError: alexnet needs an input of at least 55x55 pixels ...
    """
    key = _REGISTRY.resolve(name)
    builder, _ = _REGISTRY.get(key)
    entry = _blocks.MIN_INPUT_SIZES.get(builder)
    if entry is None:
        return tuple(input_shape)
    shape = _blocks.check_image_shape(input_shape, key)
    _blocks.check_min_size(shape, entry[0], key, entry[1])
    return shape


def get(name: str, **options: Any) -> keras.Model:
    """Builds the registered model `name` with the given options.

    Args:
        name: A model name from `tfpar.models.available()` (case and ``-``/``_`` insensitive).
        **options: Keyword options of that builder, e.g. ``input_shape``, ``num_classes``,
            ``width``; `tfpar.models.accepted_options(name)` lists them.

    Returns:
        A new ``keras.Model``.

    Raises:
        TypeError: If `name` is not a string or an option is not accepted by the model.
        ValueError: If `name` is unknown (the error lists the available names and suggests the
            closest), an option overrides a preset of the name, or the builder rejects a value.

    Example:
        >>> model = tfpar.models.get("vgg11", input_shape=(32, 32, 3), num_classes=10, width=0.125)
    """
    key = _REGISTRY.resolve(name)
    builder, preset = _REGISTRY.get(key)
    clashing = sorted(set(options) & set(preset))
    if clashing:
        fixed = ", ".join(f"{k}={preset[k]!r}" for k in clashing)
        received = ", ".join(f"{k}={options[k]!r}" for k in clashing)
        raise ValueError(
            f"Model {key!r} fixes {fixed}; pick the registered name that has the value you want "
            f"(tfpar.models.available() lists them). Received: {received}"
        )
    accepted = _parameters(builder)
    unknown = sorted(set(options) - set(accepted))
    if unknown and not _takes_any_keyword(builder):
        received = ", ".join(f"{k}={options[k]!r}" for k in unknown)
        raise TypeError(
            f"Model {key!r} does not accept option(s) {unknown}. Accepted options: "
            f"{[p for p in accepted if p not in preset]}. Received: {received}"
        )
    return builder(**preset, **options)


def _parameters(builder: Callable[..., Any]) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(builder).parameters.values() if p.kind in kinds]


def _takes_any_keyword(builder: Callable[..., Any]) -> bool:
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(builder).parameters.values()
    )
