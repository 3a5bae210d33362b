"""Splitting: partition one dataset into train / validation / test parts, sequentially or randomly.

Both modes give parts that are disjoint and together complete, with exact sizes (the largest
remainder rounding of ``fractions * n``), stable across epochs (iterating a part twice gives the
same elements in the same order) and identical in every process:

* ``"sequential"``: the first ``n0`` elements, the next ``n1``, ... (``skip`` / ``take``);
* ``"random"``: a seeded permutation assigns every element index to a part; each part keeps its
  elements in their original order (``enumerate`` + ``filter`` on a lookup table of ``n`` bytes).

Both address elements by position, so the input's order must be deterministic: an unseeded shuffle
or a ``deterministic=False`` parallel op before the split is refused (the same check as DATA
sharding, see :mod:`tfpar.data._dataset_graph`). Split first, then shuffle each part.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Literal, cast

import numpy as np
import tensorflow as tf

from tfpar._validation import check_int

# The package re-exports a *function* named `shard`, which shadows the submodule attribute.
shard_lib = importlib.import_module("tfpar.data.shard")

MODES = ("sequential", "random")

# The logger keeps the name it had before the module was renamed (users may configure it).
logger = logging.getLogger("tfpar.data.split")


def split(
    dataset: tf.data.Dataset,
    fractions: Sequence[float] | float,
    mode: Literal["sequential", "random"] = "sequential",
    seed: int | None = None,
) -> tuple[tf.data.Dataset, ...]:
    """Splits a finite dataset into disjoint parts of the given fractions.

    Args:
        dataset: A finite, deterministically ordered dataset (unbatched, so parts count elements).
            If its cardinality is unknown (e.g. after ``filter``), it is counted with one pass.
        fractions: Positive fractions summing to 1, e.g. ``(0.8, 0.1, 0.1)``; a single float ``f``
            means ``(f, 1 - f)``.
        mode: ``"sequential"`` (contiguous parts, in order) or ``"random"`` (a seeded random
            assignment of elements to parts).
        seed: Seed of the random assignment (``mode="random"`` only). None draws one and logs it;
            pass a seed when several processes must agree on the split.

    Returns:
        One dataset per fraction, in order.

    Raises:
        TypeError: If `dataset` is not a ``tf.data.Dataset`` or `fractions` / `seed` have the
            wrong type.
        ValueError: If the fractions are not positive or do not sum to 1, `mode` is unknown, a
            seed is given with ``mode="sequential"``, the dataset is infinite, a part would be
            empty, or the dataset's order is not deterministic.

    Example:
    >>> train, val = tfpar.data.split(tf.data.Dataset.range(10), (0.8, 0.2), mode="random", seed=0)
    >>> sorted(train.concatenate(val).as_numpy_iterator()) == list(range(10))
    True
    """
    shard_lib.check_dataset(dataset)
    parts = _check_fractions(fractions)
    if mode not in MODES:
        raise ValueError(f"Expected mode to be one of {list(MODES)}. Received: mode={mode!r}")
    if seed is not None:
        check_int("seed", seed, allow_none=True)
        if mode == "sequential":
            raise ValueError(
                "A seed only applies to mode='random'; a sequential split is already "
                f"reproducible. Received: mode='sequential', seed={seed}"
            )
        if seed < 0:
            raise ValueError(f"Expected `seed` >= 0. Received: seed={seed}")
    shard_lib.check_deterministic(dataset, "Splitting")
    total = _count(dataset)
    sizes = _sizes(parts, total)
    if mode == "sequential":
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return tuple(dataset.skip(int(s)).take(int(n)) for s, n in zip(starts, sizes))
    if seed is None:
        seed = int(cast(int, np.random.SeedSequence().entropy) % (2**63))  # drawn entropy is an int
        logger.info("tfpar.data.split: mode='random' drew seed=%d (pass seed= to reproduce)", seed)
    blocks = np.repeat(np.arange(len(sizes), dtype=np.uint8), sizes)
    table = tf.constant(np.random.default_rng(seed).permutation(blocks))
    return tuple(_part(dataset, table, k) for k in range(len(sizes)))


def _part(dataset: tf.data.Dataset, table: tf.Tensor, k: int) -> tf.data.Dataset:
    # enumerate -> keep the indices assigned to part k -> drop the index. Order is preserved.
    part = dataset.enumerate().filter(lambda i, element: tf.gather(table, i) == k)
    return part.map(lambda i, element: element)


def _check_fractions(fractions: object) -> list[float]:
    if isinstance(fractions, numbers.Real) and not isinstance(fractions, bool):
        if not 0 < float(fractions) < 1:
            raise ValueError(
                f"A single fraction f means (f, 1 - f), so 0 < f < 1. Received: fractions={fractions}"
            )
        return [float(fractions), 1.0 - float(fractions)]
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence):
        raise TypeError(
            "Expected `fractions` to be a sequence of floats such as (0.8, 0.2) or one float. "
            f"Received: fractions={fractions!r} (of type {type(fractions).__name__})"
        )
    values = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, numbers.Real):
            raise TypeError(
                f"Expected every fraction to be a number. Received: fractions={fractions!r}"
            )
        values.append(float(f))
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"Expected positive fractions. Received: fractions={list(fractions)}")
    if len(values) > 255:
        raise ValueError(f"Expected at most 255 parts. Received {len(values)} fractions.")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(
            "Expected fractions that sum to 1 so the parts are complete, e.g. (0.8, 0.1, 0.1). "
            f"Received: fractions={list(fractions)} (sum {sum(values):.6g})"
        )
    return values


def _count(dataset: tf.data.Dataset) -> int:
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "Cannot split an infinite dataset. Fix: split before .repeat(). "
            f"Received: dataset with infinite cardinality ({dataset.element_spec})"
        )
    if cardinality >= 0:
        return cardinality
    logger.info("tfpar.data.split: cardinality unknown, counting the elements with one pass")
    return int(dataset.reduce(np.int64(0), lambda count, *_: count + 1))


def _sizes(fractions: list[float], total: int) -> list[int]:
    exact = [f * total for f in fractions]
    sizes = [math.floor(e) for e in exact]
    # Largest remainder: hand the leftover elements to the parts that lost the most to rounding.
    order = sorted(range(len(exact)), key=lambda k: (sizes[k] - exact[k], k))
    for k in order[: total - sum(sizes)]:
        sizes[k] += 1
    if 0 in sizes:
        empty = [k for k, n in enumerate(sizes) if n == 0]
        raise ValueError(
            f"With {total} elements, part(s) {empty} of fractions={fractions} would be empty. "
            "Fix: use larger fractions for those parts, or more data."
        )
    return sizes
