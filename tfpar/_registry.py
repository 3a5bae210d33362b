"""One name -> entry registry for tfpar's registries (models; strategies can adopt it).

A :class:`Registry` gives every registry the same rules: one name normalization (case, spaces,
``-`` and ``_`` do not matter: ``"VGG-16"`` is ``"vgg16"``), aliases that follow their target,
``override=`` to replace an entry, and one unknown-name error that lists the available names and
suggests the closest. What an entry is (a builder with presets, a strategy spec) is up to the
registry that uses it. Imports nothing from tfpar and no TensorFlow.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "normalize"]

T = TypeVar("T")

_SEPARATORS = re.compile(r"[\s_\-]")


def normalize(name: str) -> str:
    """The lookup key of a name: lower case, without whitespace, ``-`` or ``_``.

    Args:
        name: A registry name as a user spells it.

    Returns:
        The key two spellings share when they mean the same entry.

    Example:
        >>> tfpar._registry.normalize(" VGG-16_bn ")
        'vgg16bn'
    """
    return _SEPARATORS.sub("", name.lower())


class Registry(Generic[T]):
    """Registered names -> entries, looked up with :func:`normalize`.

    Args:
        kind: What the names name, for messages: ``"model"``, ``"strategy"``.
        argument: The name of the caller's argument, for ``Received: <argument>=...``.

    Example:
        >>> builders = tfpar._registry.Registry("model")
        >>> builders.register("vgg16", "the VGG-16 builder")
        >>> builders.alias("vgg", "vgg16")
        >>> builders.resolve("VGG-16"), builders.get("vgg")
        ('vgg16', 'the VGG-16 builder')
    """

    def __init__(self, kind: str, *, argument: str = "name") -> None:
        self.kind = kind
        self.argument = argument
        self._entries: dict[str, T] = {}  # registered spelling -> entry
        self._aliases: dict[str, str] = {}  # alias spelling -> target spelling

    def register(self, name: str, entry: T, *, override: bool = False) -> None:
        """Adds `entry` under `name`; with ``override=True`` it replaces the entry of that name.

        Raises:
            TypeError: If `name` is not a string.
            ValueError: If `name` is empty, or already taken (by a name or an alias with the same
                key) and `override` is False.
        """
        key = self._key(name)
        existing = self._find(key)
        if existing is not None and not override:
            raise ValueError(
                f"A {self.kind} named {existing!r} is already registered. Pass override=True to "
                f"replace it. Received: {self.argument}={name!r}"
            )
        if existing in self._entries:
            del self._entries[existing]
        elif existing is not None:
            del self._aliases[existing]
        self._entries[name] = entry

    def alias(self, alias: str, target: str) -> None:
        """Makes `alias` another name of `target`, resolved at lookup time (it follows an override).

        An alias is listed and found only while its target is registered; a registered name with
        the same key wins over it.

        Raises:
            TypeError: If `alias` or `target` is not a string.
            ValueError: If either is empty.
        """
        self._key(alias)
        self._key(target)
        self._aliases[alias] = target

    def unregister(self, name: str) -> None:
        """Removes a registered name (an alias cannot be removed on its own).

        Raises:
            TypeError: If `name` is not a string.
            ValueError: If `name` is unknown or an alias.
        """
        canonical = self.resolve(name)
        if self._key(name) != normalize(canonical):
            raise ValueError(
                f"{name!r} is an alias of {canonical!r}; it cannot be removed on its own."
            )
        del self._entries[canonical]

    def names(self) -> list[str]:
        """The registered names and the aliases whose target is registered, sorted."""
        live = [alias for alias in self._aliases if self._live(alias)]
        return sorted([*self._entries, *live])

    def resolve(self, name: Any) -> str:
        """The registered spelling `name` refers to (through an alias if it is one).

        Raises:
            TypeError: If `name` is not a string.
            ValueError: If `name` is unknown: the message lists the available names and suggests
                the closest.
        """
        if not isinstance(name, str):
            raise TypeError(
                f"Expected a {self.kind} name (str). "
                f"Received: {self.argument}={name!r} (of type {type(name).__name__})"
            )
        found = self._find(normalize(name))
        if found in self._aliases:
            found = self._target(found)
        if found is None or found not in self._entries:
            raise self.unknown_name_error(name)
        return found

    def get(self, name: Any) -> T:
        """The entry `name` refers to; raises as :meth:`resolve` does."""
        return self._entries[self.resolve(name)]

    def unknown_name_error(self, name: str) -> ValueError:
        """The error for an unknown `name`: the available names and the closest, if any."""
        names = self.names()
        by_key = {normalize(n): n for n in names}
        close = difflib.get_close_matches(normalize(name), sorted(by_key), n=1)
        hint = f" Did you mean {by_key[close[0]]!r}?" if close else ""
        return ValueError(
            f"Unknown {self.kind} {name!r}.{hint} Available names: {', '.join(names)}. "
            f"Received: {self.argument}={name!r}"
        )

    def copy(self) -> Registry[T]:
        """A registry with the same entries and aliases (tests register into a copy)."""
        twin: Registry[T] = Registry(self.kind, argument=self.argument)
        twin._entries = dict(self._entries)
        twin._aliases = dict(self._aliases)
        return twin

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        found = self._find(normalize(name))
        return found is not None and (found in self._entries or self._live(found))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def _key(self, name: Any) -> str:
        if not isinstance(name, str):
            raise TypeError(
                f"Expected the {self.kind} name to be a string. "
                f"Received: {self.argument}={name!r} (of type {type(name).__name__})"
            )
        key = normalize(name)
        if not key:
            raise ValueError(
                f"Expected the {self.kind} name to be a non-empty string. "
                f"Received: {self.argument}={name!r}"
            )
        return key

    def _find(self, key: str) -> str | None:
        """The registered name with `key`, else the alias with `key`, else None."""
        for registered in self._entries:
            if normalize(registered) == key:
                return registered
        for alias in self._aliases:
            if normalize(alias) == key:
                return alias
        return None

    def _target(self, alias: str) -> str | None:
        """The registered spelling of an alias's target (it may have been overridden), or None."""
        target = self._find(normalize(self._aliases[alias]))
        return target if target in self._entries else None

    def _live(self, alias: str) -> bool:
        return self._target(alias) is not None and self._find(normalize(alias)) == alias
