"""tfpar's interceptions of Keras / TensorFlow internals: the only place that touches them.

Each module fixes one upstream problem and declares it as an :class:`Interception` (slug,
targets, upstream issue, verified versions, the test that fails without it). :func:`manage`
installs them (once, through the one installer in ``_patching``) the first time a strategy is
handed to tfpar; they act only on models whose ``distribute_strategy`` tfpar manages, so a model
built under a plain ``tf.distribute.MirroredStrategy().scope()`` keeps upstream behaviour.
``batchnorm-default`` is installed by the first ``tfpar.scope(..., sync_batchnorm=True)``. The
parameter-server fixes live with the coordinator (``tfpar.coordinator``), which registers them
through the same installer. :func:`catalogue` lists every declared interception; docs,
``tfpar doctor`` and tests cite them by slug. The user-facing account is docs/interceptions.md.

Modules, in import order: ``_patching`` (the installer), ``internals`` (read-only accessors),
``_context`` (managed strategies, the per-thread fit context), then one module per fix.
"""

from __future__ import annotations

import tensorflow as tf

from tfpar._compat import (
    _context,
    _patching,
    batchnorm,
    chief_files,
    collective_keys,
    empty_batches,
    exact_gradients,
    optimizer_build,
    replica_build,
    resume,
    shared_shuffle,
    step_function,
    worker_logs,
)
from tfpar._compat._context import is_managed, is_managed_ps
from tfpar._compat._patching import VERIFIED_VERSIONS, Interception, declare, install, installed, layers

#: Installed by :func:`manage`, in this order (also the catalogue's order).
MANAGED = (
    exact_gradients.INTERCEPTION,
    step_function.INTERCEPTION,
    replica_build.INTERCEPTION,
    worker_logs.INTERCEPTION,
    shared_shuffle.INTERCEPTION,
    resume.INTERCEPTION,
    chief_files.INTERCEPTION,
    empty_batches.INTERCEPTION,
    collective_keys.INTERCEPTION,
    optimizer_build.INTERCEPTION,
)

bump_collective_key_base = collective_keys.bump_collective_key_base
synchronized_batchnorm = batchnorm.synchronized_batchnorm

__all__ = [
    "Interception",
    "MANAGED",
    "VERIFIED_VERSIONS",
    "bump_collective_key_base",
    "catalogue",
    "catalogue_markdown",
    "declare",
    "install",
    "installed",
    "is_managed",
    "is_managed_ps",
    "layers",
    "manage",
    "synchronized_batchnorm",
]


def manage(strategy: tf.distribute.Strategy) -> tf.distribute.Strategy:
    """Installs tfpar's interceptions (once) and applies them to models of `strategy`.

    A ParameterServerStrategy also needs the coordinator's interceptions:
    ``tfpar.coordinator.enable(strategy)`` calls this and installs them.

    Args:
        strategy: The strategy whose models get tfpar's fixes.

    Returns:
        `strategy` itself.

    Example:
    >>> strategy = tfpar._compat.manage(tf.distribute.MirroredStrategy(["cpu:0", "cpu:1"]))
    >>> tfpar._compat.is_managed(strategy)
    True
    """
    install(*MANAGED)
    _context.add_managed(strategy)
    return strategy


def catalogue() -> tuple[Interception, ...]:
    """Every declared interception: these modules', then those of packages that registered theirs.

    The parameter-server interceptions are declared when ``tfpar.coordinator`` is imported
    (``tfpar doctor`` imports it).

    Example:
    >>> [interception.slug for interception in tfpar._compat.catalogue()][:2]
    ['exact-gradients', 'step-function']
    """
    ours = (*MANAGED, batchnorm.INTERCEPTION)
    return ours + tuple(i for i in _patching.catalogue() if i not in ours)


def catalogue_markdown(interceptions: tuple[Interception, ...] | None = None) -> str:
    """The catalogue as a Markdown table (docs/interceptions.md holds it; a test compares).

    Example:
    >>> print(tfpar._compat.catalogue_markdown().splitlines()[0])
    | Slug | What it fixes | Upstream | Verified on | Test that fails without it |
    """
    rows = [
        "| Slug | What it fixes | Upstream | Verified on | Test that fails without it |",
        "|---|---|---|---|---|",
    ]
    for item in catalogue() if interceptions is None else interceptions:
        verified = ", ".join(f"{name} {version}" for name, version in item.verified_versions.items())
        rows.append(f"| `{item.slug}` | {item.summary} | {item.upstream_issue} | {verified} | `{item.test}` |")
    return "\n".join(rows) + "\n"
