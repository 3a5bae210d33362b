"""Optimal contiguous partition of a chain of layer costs into pipeline stages (pure, no TF).

The problem ("chains-on-chains", or linear partition): split costs ``c[0..n)`` into ``k`` contiguous,
non-empty stages, stage ``j`` running on a device of relative speed ``speed[j]``, so that the
bottleneck ``max_j sum(stage j) / speed[j]`` is as small as possible, subject to each stage's memory
``sum(memory of stage j) <= limit[j]``. A pipeline's steady-state throughput is one micro-batch per
bottleneck, so this is the quantity to minimize (Pinar & Aykanat, JPDC 2004).

:func:`optimal_sizes` solves it exactly by dynamic programming,
``F[j][i] = min_l max(F[j-1][l], load_j(l, i))``, in ``O(k n^2)`` vectorized numpy steps. Many splits
often share the optimal bottleneck; among them it returns the most even one (smallest sum of
squared stage loads, a second exact dynamic program), and among those the one with the earliest
cuts, so the answer is deterministic. Every stage gets at least one layer.

For comparison, :func:`uniform_sizes` and :func:`deepspeed_balanced_sizes` re-implement DeepSpeed's
``partition_method="uniform"`` and ``"parameters"`` partitioners (``deepspeed/runtime/utils.py``:
``partition_uniform`` after PR #4053, and ``partition_balanced`` after PR #4312, which minimizes
max - min rather than the max).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from tfpar._validation import check_int

# value(j, starts, end) -> the value of stage j covering layers [start, end) for each start.
_StageValue = Callable[[int, np.ndarray, int], np.ndarray]


def optimal_sizes(
    costs: Sequence[float],
    num_stages: int,
    *,
    speeds: Sequence[float] | None = None,
    memory: Sequence[float] | None = None,
    memory_limits: Sequence[float | None] | None = None,
) -> tuple[int, ...] | None:
    """Stage sizes minimizing the bottleneck load, or None if no split fits the memory limits.

    Args:
        costs: Non-negative cost of each layer, in pipeline order.
        num_stages: Number of stages ``k``, ``1 <= k <= len(costs)``.
        speeds: Relative speed of each stage's device (default all 1): a stage's load is its cost
            divided by its speed.
        memory: Memory of each layer (any unit; required with `memory_limits`).
        memory_limits: Limit of each stage's device in the unit of `memory` (None: unlimited).

    Returns:
        ``k`` positive stage sizes summing to ``len(costs)``.

    Raises:
        ValueError: If the arguments are inconsistent (see :func:`check_inputs`).

    Example:
    >>> tfpar.parallel.partition.optimal_sizes([1, 1, 1, 1, 1], 4)
    (1, 1, 1, 2)
    """
    check_inputs(costs, num_stages, speeds, memory, memory_limits)
    value = _load_value(costs, num_stages, speeds, memory, memory_limits)
    best, sizes = _minmax(len(costs), num_stages, value)
    return sizes if best != math.inf else None


def least_overflow_sizes(
    memory: Sequence[float], memory_limits: Sequence[float | None]
) -> tuple[int, ...]:
    """Stage sizes minimizing the largest memory overflow ``memory_j - limit_j``.

    Used to explain an impossible plan: the returned split is the closest one to fitting, and its
    stages with a positive overflow are the ones to report.

    Example:
    >>> tfpar.parallel.partition.least_overflow_sizes([4, 4, 4], [5, 5])
    (1, 2)
    """
    k = len(memory_limits)
    check_inputs([0.0] * len(memory), k, None, memory, memory_limits)
    prefix = _prefix(memory)
    limits = [math.inf if lim is None else float(lim) for lim in memory_limits]

    def value(j: int, starts: np.ndarray, end: int) -> np.ndarray:
        return (prefix[end] - prefix[starts]) - limits[j]

    return _minmax(len(memory), k, value, spread=False)[1]


def stage_loads(
    costs: Sequence[float], sizes: Sequence[int], speeds: Sequence[float] | None = None
) -> tuple[float, ...]:
    """Load (sum of costs / speed) of each stage of a split given by its sizes.

    Example:
    >>> tfpar.parallel.partition.stage_loads([1, 2, 3], [2, 1])
    (3.0, 3.0)
    """
    prefix = _prefix(costs)
    speeds = [1.0] * len(sizes) if speeds is None else speeds
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return tuple(
        float((prefix[bounds[j + 1]] - prefix[bounds[j]]) / float(speeds[j])) for j in range(len(sizes))
    )


def brute_force_sizes(
    costs: Sequence[float],
    num_stages: int,
    *,
    speeds: Sequence[float] | None = None,
    memory: Sequence[float] | None = None,
    memory_limits: Sequence[float | None] | None = None,
) -> tuple[int, ...] | None:
    """Exhaustive reference for :func:`optimal_sizes` (same objective and tie-breaks); for tests.

    Example:
    >>> tfpar.parallel.partition.brute_force_sizes([1, 1, 1, 1, 1], 4)
    (1, 1, 1, 2)
    """
    check_inputs(costs, num_stages, speeds, memory, memory_limits)
    n = len(costs)
    value = _load_value(costs, num_stages, speeds, memory, memory_limits)
    best, best_spread, best_sizes = math.inf, math.inf, None
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = (0, *cuts, n)
        values = [float(value(j, np.array([bounds[j]]), bounds[j + 1])[0]) for j in range(num_stages)]
        worst = max(values)
        spread = 0.0
        for v in reversed(values):  # summed right to left, as the dynamic program does
            spread = v * v + spread
        if worst < best or (worst == best and spread < best_spread):
            best, best_spread = worst, spread
            best_sizes = tuple(bounds[j + 1] - bounds[j] for j in range(num_stages))
    return best_sizes if math.isfinite(best) else None


def uniform_sizes(num_items: int, num_stages: int) -> tuple[int, ...]:
    """DeepSpeed's ``partition_method="uniform"``: equal layer counts, the remainder to the first.

    Example:
    >>> tfpar.parallel.partition.uniform_sizes(38, 8)
    (5, 5, 5, 5, 5, 5, 4, 4)
    """
    if num_items <= num_stages:
        return tuple(1 if p < num_items else 0 for p in range(num_stages))
    chunk, residual = divmod(num_items, num_stages)
    return tuple(chunk + (1 if p < residual else 0) for p in range(num_stages))


def deepspeed_balanced_sizes(weights: Sequence[float], num_stages: int) -> tuple[int, ...]:
    """DeepSpeed's ``partition_balanced`` (used by ``partition_method="parameters"``).

    Since deepspeedai/DeepSpeed#4312 it is a dynamic program minimizing ``max - min`` of the stage
    weights (ties to the later split point), not the bottleneck; it is re-implemented here only to
    compare against.

    Example:
    >>> tfpar.parallel.partition.deepspeed_balanced_sizes([1, 1, 1, 1, 1], 4)
    (2, 1, 1, 1)
    """
    n, m = len(weights), num_stages
    if n <= m:
        return uniform_sizes(n, m)
    prefix = _prefix(weights)
    inf = math.inf
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    dp_max[0][0] = 0.0
    dp_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = float(prefix[i] - prefix[k])
                high = max(dp_max[k][j - 1], part)
                low = min(dp_min[k][j - 1], part)
                cost = high - low
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j], dp_max[i][j], dp_min[i][j] = cost, high, low
                    position[i][j] = k
    bounds = [n]
    for j in range(m, 0, -1):
        bounds.append(position[bounds[-1]][j])
    bounds.reverse()
    return tuple(bounds[j + 1] - bounds[j] for j in range(m))


def check_inputs(
    costs: Sequence[float],
    num_stages: int,
    speeds: Sequence[float] | None,
    memory: Sequence[float] | None,
    memory_limits: Sequence[float | None] | None,
) -> None:
    """Validates partition arguments; ValueError/TypeError saying what was expected.

    Example:
    >>> tfpar.parallel.partition.check_inputs([1.0, 2.0], 3, None, None, None)
    Traceback (most recent call last):
    ValueError: Expected between 1 and 2 stages ...
    """
    check_int("num_stages", num_stages)
    n = len(costs)
    if n == 0:
        raise ValueError("Expected at least one layer cost. Received: costs=[]")
    if not 1 <= num_stages <= n:
        raise ValueError(
            f"Expected between 1 and {n} stages (every stage needs at least one layer and there are "
            f"{n} layers). Received: num_stages={num_stages}. Fix: use fewer devices."
        )
    _check_values("costs", costs, n, allow_none=False)
    if speeds is not None:
        _check_values("speeds", speeds, num_stages, allow_none=False)
        if any(float(s) <= 0 for s in speeds):
            raise ValueError(f"Expected every speed to be > 0. Received: speeds={list(speeds)}")
    if memory_limits is not None:
        _check_values("memory_limits", memory_limits, num_stages, allow_none=True)
        if memory is None:
            raise ValueError("Expected per-layer `memory` together with memory_limits. Received: memory=None")
    if memory is not None:
        _check_values("memory", memory, n, allow_none=False)


def _check_values(name: str, values: Sequence[float | None], length: int, *, allow_none: bool) -> None:
    if len(values) != length:
        raise ValueError(
            f"Expected {length} values for {name}. Received: {len(values)} ({name}={list(values)!r})"
        )
    for v in values:
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"Expected numbers in {name}. Received: {v!r} (of type {type(v).__name__})")
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"Expected finite, non-negative values in {name}. Received: {v!r}")


def _prefix(values: Sequence[float]) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])


def _load_value(
    costs: Sequence[float],
    k: int,
    speeds: Sequence[float] | None,
    memory: Sequence[float] | None,
    memory_limits: Sequence[float | None] | None,
) -> _StageValue:
    cost_prefix = _prefix(costs)
    speed = [1.0] * k if speeds is None else [float(s) for s in speeds]
    mem_prefix = _prefix(memory) if memory is not None else None
    limits = None
    if memory_limits is not None:
        limits = [math.inf if lim is None else float(lim) for lim in memory_limits]

    def value(j: int, starts: np.ndarray, end: int) -> np.ndarray:
        load = (cost_prefix[end] - cost_prefix[starts]) / speed[j]
        if limits is not None and mem_prefix is not None:
            load = np.where(mem_prefix[end] - mem_prefix[starts] <= limits[j], load, np.inf)
        return load

    return value


def _minmax(n: int, k: int, value: _StageValue, *, spread: bool = True) -> tuple[float, tuple[int, ...]]:
    """min over contiguous k-splits of max_j value(j, stage j), and one split achieving it.

    With `spread`, among the optimal splits the one with the smallest sum of squared stage values
    is returned (the most even one), and among those the earliest cuts; without it, the earliest
    cuts among all optimal splits.
    """
    # best[j][i]: the smallest bottleneck of stages 0..j covering layers [0, i).
    best = np.full((k, n + 1), np.inf)
    first_ends = range(1, n - k + 2)
    best[0, 1 : n - k + 2] = [float(value(0, np.array([0]), i)[0]) for i in first_ends]
    for j in range(1, k):
        for i in range(j + 1, n - (k - 1 - j) + 1):
            starts = np.arange(j, i)
            best[j, i] = np.min(np.maximum(best[j - 1, starts], value(j, starts, i)))
    optimum = float(best[k - 1, n])
    if optimum == math.inf:
        return optimum, ()
    # rest[j][l]: over splits of layers [l, n) into stages j..k-1 with every value <= optimum, the
    # smallest sum of squared values (spread) or 0 if one exists (no spread); inf if none does.
    rest = np.full((k + 1, n + 1), np.inf)
    rest[k, n] = 0.0
    for j in range(k - 1, -1, -1):
        last_start = n - (k - 1 - j) - 1
        for end in range(j + 1, last_start + 2):
            if rest[j + 1, end] == np.inf:
                continue
            starts = np.arange(j, min(end, last_start + 1))
            v = value(j, starts, end)
            step = v * v + rest[j + 1, end] if spread else np.zeros_like(v)
            rest[j, starts] = np.minimum(rest[j, starts], np.where(v <= optimum, step, np.inf))
    sizes: list[int] = []
    start = 0
    for j in range(k):
        end = start + 1
        while True:
            v = value(j, np.array([start]), end)[0]
            step = v * v + rest[j + 1, end] if spread else (0.0 if rest[j + 1, end] < np.inf else np.inf)
            if v <= optimum and step == rest[j, start]:
                break
            end += 1
        sizes.append(end - start)
        start = end
    return optimum, tuple(sizes)
