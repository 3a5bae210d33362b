"""The one installer of tfpar's interceptions of Keras / TensorFlow internals.

Every fix declares an :class:`Interception`: a slug, the internals it touches (``targets``), the
replacements it installs (``patches``), the upstream issue, the versions it was verified on and
the pytest node id of a test that fails without it. :func:`declare` adds it to the catalogue;
:func:`install` patches it in, once, under one lock, keeping what each patch replaced in one
table (:func:`original`). A target two interceptions patch (``TensorFlowTrainer.fit``: the
shared-shuffle fit state and the parameter-server loop) gets one layer per interception, in the
order they were installed (:func:`layers`); each layer passes the models it does not handle on to
the layer below, so the result does not depend on that order.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any

VERIFIED_VERSIONS: Mapping[str, str] = types.MappingProxyType({"tensorflow": "2.21.0", "keras": "3.15.1"})


@dataclasses.dataclass(frozen=True)
class Interception:
    """One fix of Keras / TensorFlow behaviour, declared for the installer and the catalogue.

    Attributes:
        slug: The stable name docs, tests and ``tfpar doctor`` cite (never a number).
        summary: One line: what goes wrong upstream and what tfpar does instead.
        targets: Every internal it touches, as ``"module:Qualified.name"`` (patched or read).
        upstream_issue: The upstream issue(s), or why there is none.
        test: The pytest node id of a test that fails without this interception.
        patches: ``{target: replacement}`` for the targets it replaces (a subset of `targets`).
        verified_versions: The package versions it was verified on.
        on_install: Called once after the patches are in (e.g. to register an ``atexit`` hook).
    """

    slug: str
    summary: str
    targets: tuple[str, ...]
    upstream_issue: str
    test: str
    patches: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    verified_versions: Mapping[str, str] = dataclasses.field(default_factory=lambda: VERIFIED_VERSIONS, compare=False)
    on_install: Callable[[], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.patches) - set(self.targets))
        if unknown:
            raise ValueError(
                f"Interception {self.slug!r} patches targets it does not declare. Expected each "
                f"patched target in `targets`. Received: {unknown}"
            )
        object.__setattr__(self, "patches", types.MappingProxyType(dict(self.patches)))

    def original(self, target: str) -> Callable[..., Any]:
        """What this interception's patch of `target` replaced (Keras's, or a layer below)."""
        return _ORIGINALS[(self.slug, target)]


LOCK = threading.RLock()  # guards every change tfpar makes to Keras / TensorFlow state
_DECLARED: dict[str, Interception] = {}
_ORIGINALS: dict[tuple[str, str], Any] = {}  # (slug, target) -> what that patch replaced
_INSTALLED: list[str] = []  # slugs, in install order


def declare(interception: Interception) -> Interception:
    """Adds `interception` to the catalogue (at import of its module) and returns it.

    Raises:
        ValueError: If another interception already has its slug.

    Example:
    >>> INTERCEPTION = declare(Interception(
    ...     slug="replica-build", summary="...", targets=(TARGET,), upstream_issue="keras-team/keras#20585",
    ...     test="tests/test_exactness.py::test_numpy_fit_matches_single_device", patches={TARGET: replacement}))
    """
    with LOCK:
        known = _DECLARED.get(interception.slug)
        if known is not None and known is not interception:
            raise ValueError(f"Interception slug {interception.slug!r} is declared twice.")
        _DECLARED[interception.slug] = interception
    return interception


def catalogue() -> tuple[Interception, ...]:
    """Every declared interception, in declaration order."""
    with LOCK:
        return tuple(_DECLARED.values())


def installed() -> tuple[str, ...]:
    """The slugs installed so far, in install order."""
    with LOCK:
        return tuple(_INSTALLED)


def layers(target: str) -> tuple[str, ...]:
    """The slugs whose patches of `target` are installed, innermost (closest to Keras) first."""
    with LOCK:
        return tuple(slug for slug in _INSTALLED if target in _DECLARED[slug].patches)


def unpatched(target: str) -> Any:
    """`target` as Keras / TensorFlow define it, before any tfpar patch."""
    with LOCK:
        for slug in _INSTALLED:
            if (slug, target) in _ORIGINALS:
                return _ORIGINALS[(slug, target)]
    owner, name = resolve(target)
    return getattr(owner, name)


def install(*interceptions: Interception) -> None:
    """Patches in every given interception not installed yet (all or none of them).

    Raises:
        RuntimeError: If a target is missing from the installed Keras / TensorFlow; the message
            names the targets and the versions the interceptions were verified on.

    Example:
    >>> install(exact_gradients.INTERCEPTION, step_function.INTERCEPTION)  # once; later calls do nothing
    """
    with LOCK:
        pending = [i for i in dict.fromkeys(interceptions) if i.slug not in _INSTALLED]
        if not pending:
            return
        _check_targets(pending)
        for interception in pending:
            declare(interception)
        for interception in pending:
            for target, replacement in interception.patches.items():
                owner, name = resolve(target)
                _ORIGINALS[(interception.slug, target)] = owner.__dict__.get(name, getattr(owner, name))
                setattr(owner, name, replacement)
            _INSTALLED.append(interception.slug)
            if interception.on_install is not None:
                interception.on_install()


def _check_targets(interceptions: list[Interception]) -> None:
    missing = []
    for interception in interceptions:
        for target in interception.targets:
            try:
                owner, name = resolve(target)
            except (ImportError, AttributeError):
                missing.append(f"{target} ({interception.slug})")
                continue
            if not hasattr(owner, name):
                missing.append(f"{target} ({interception.slug})")
    if not missing:
        return
    import keras
    import tensorflow as tf

    verified = sorted({
        f"TensorFlow {i.verified_versions['tensorflow']} / Keras {i.verified_versions['keras']}" for i in interceptions
    })
    raise RuntimeError(
        f"tfpar cannot install its fixes of Keras / TensorFlow internals: this Keras ({keras.__version__}) "
        f"/ TensorFlow ({tf.__version__}) has no {', '.join(missing)}. Expected the versions tfpar "
        f"was verified on: {'; '.join(verified)}. Install a release in that line "
        f"(pip install {_supported_range()})."
    )


def _supported_range() -> str:
    """tfpar's own TensorFlow / Keras requirements, as pip arguments (from its package metadata)."""
    try:
        requirements = importlib.metadata.requires("tfpar") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    pins = [f"'{r}'" for r in requirements if r.startswith(("tensorflow", "keras")) and ";" not in r]
    return " ".join(pins) or "'tensorflow' 'keras'"


def resolve(target: str) -> tuple[Any, str]:
    """``"module:A.b"`` -> (the object ``module.A``, ``"b"``)."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name
