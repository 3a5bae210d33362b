"""Optimal contiguous partition: exact against brute force, edge cases, baselines, errors."""

from __future__ import annotations

import random

import pytest

from tfpar.parallel import partition


def _random_case(rng: random.Random, *, integer: bool):
    n = rng.randint(1, 9)
    k = rng.randint(1, n)
    costs = [rng.randint(0, 9) if integer else rng.uniform(0, 10) for _ in range(n)]
    speeds = [rng.choice([0.5, 1.0, 2.0, 3.0]) for _ in range(k)] if rng.random() < 0.5 else None
    memory = [rng.randint(0, 9) for _ in range(n)]
    limits = None
    if rng.random() < 0.6:
        limits = [rng.choice([None, rng.randint(0, 25)]) for _ in range(k)]
    return costs, k, speeds, memory, limits


@pytest.mark.parametrize("integer", [True, False])
def test_optimal_equals_brute_force_with_speeds_and_memory_limits(integer):
    rng = random.Random(1234 if integer else 99)
    infeasible = feasible = 0
    for _ in range(400):
        costs, k, speeds, memory, limits = _random_case(rng, integer=integer)
        got = partition.optimal_sizes(costs, k, speeds=speeds, memory=memory, memory_limits=limits)
        want = partition.brute_force_sizes(costs, k, speeds=speeds, memory=memory, memory_limits=limits)
        # Same split, hence same bottleneck, and the same (earliest-cut) tie-break.
        assert got == want, (costs, k, speeds, memory, limits)
        if got is None:
            infeasible += 1
            continue
        feasible += 1
        assert len(got) == k and min(got) >= 1 and sum(got) == len(costs)
        bounds = [0]
        for size in got:
            bounds.append(bounds[-1] + size)
        for j, limit in enumerate(limits or []):
            if limit is not None:
                assert sum(memory[bounds[j]:bounds[j + 1]]) <= limit
    # Both outcomes were exercised.
    assert infeasible > 10 and feasible > 200


def test_edge_cases():
    # DeepSpeed issue #4312: [1]*5 into 4 gave an empty stage; here every stage has a layer.
    assert partition.optimal_sizes([1, 1, 1, 1, 1], 4) == (1, 1, 1, 2)
    # One huge layer gets a stage of its own wherever it is.
    assert partition.optimal_sizes([1, 1, 1, 100], 2) == (3, 1)
    assert partition.optimal_sizes([100, 1, 1, 1], 2) == (1, 3)
    assert partition.optimal_sizes([1, 100, 1, 1, 1], 3) == (1, 1, 3)
    # 38 layers on 8 stages (DeepSpeed PR #4053): balanced counts, remainder to the first stages.
    assert partition.uniform_sizes(38, 8) == (5, 5, 5, 5, 5, 5, 4, 4)
    assert partition.optimal_sizes([1.0] * 38, 8) == (4, 4, 5, 5, 5, 5, 5, 5)
    assert max(partition.stage_loads([1.0] * 38, partition.optimal_sizes([1.0] * 38, 8))) == 5
    # As many stages as layers, and a single stage.
    assert partition.optimal_sizes([3, 1, 2], 3) == (1, 1, 1)
    assert partition.optimal_sizes([3, 1, 2], 1) == (3,)
    # All-zero costs: ties everywhere, earliest cuts.
    assert partition.optimal_sizes([0, 0, 0, 0], 2) == (1, 3)


def test_device_speeds_shift_load_to_the_fast_device():
    costs = [1.0] * 12
    assert partition.optimal_sizes(costs, 2) == (6, 6)
    sizes = partition.optimal_sizes(costs, 2, speeds=[1.0, 3.0])
    assert sizes == (3, 9)
    assert partition.stage_loads(costs, sizes, [1.0, 3.0]) == (3.0, 3.0)


def test_memory_limits_force_a_different_split():
    costs = [10.0, 1.0, 1.0, 1.0]
    memory = [1.0, 1.0, 1.0, 5.0]
    assert partition.optimal_sizes(costs, 2) == (1, 3)
    # The second device can hold at most 5 units: the last layer alone.
    sizes = partition.optimal_sizes(costs, 2, memory=memory, memory_limits=[None, 5.0])
    assert sizes == (3, 1)
    assert partition.optimal_sizes(costs, 2, memory=memory, memory_limits=[2.0, 2.0]) is None
    # Closest split: stage 0 over by 1, stage 1 over by 3 (the alternatives overflow by 4 and 5).
    assert partition.least_overflow_sizes(memory, [2.0, 2.0]) == (3, 1)


def test_optimum_beats_or_ties_deepspeed_baselines():
    rng = random.Random(5)
    strictly_better = 0
    for _ in range(200):
        n = rng.randint(2, 40)
        k = rng.randint(1, min(n, 8))
        costs = [rng.uniform(0, 10) ** 2 for _ in range(n)]
        params = [rng.uniform(0, 10) for _ in range(n)]
        best = max(partition.stage_loads(costs, partition.optimal_sizes(costs, k)))
        uniform = max(partition.stage_loads(costs, partition.uniform_sizes(n, k)))
        by_params = max(partition.stage_loads(costs, partition.deepspeed_balanced_sizes(params, k)))
        assert best <= uniform + 1e-9 and best <= by_params + 1e-9
        strictly_better += best < min(uniform, by_params) - 1e-9
    assert strictly_better > 100


def test_deepspeed_reimplementation_matches_its_documented_behaviour():
    # DeepSpeed's DP minimizes max - min with ties to the later split.
    assert partition.deepspeed_balanced_sizes([1, 1, 1, 1, 1], 4) == (2, 1, 1, 1)
    assert partition.deepspeed_balanced_sizes([1, 2], 4) == (1, 1, 0, 0)
    assert partition.uniform_sizes(3, 5) == (1, 1, 1, 0, 0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"between 1 and 3 stages.*Received: num_stages=4"):
        partition.optimal_sizes([1, 2, 3], 4)
    with pytest.raises(ValueError, match="Received: costs=\\[\\]"):
        partition.optimal_sizes([], 1)
    with pytest.raises(TypeError, match="`num_stages` to be an int"):
        partition.optimal_sizes([1, 2], 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        partition.optimal_sizes([1, -2], 1)
    with pytest.raises(ValueError, match="speed to be > 0"):
        partition.optimal_sizes([1, 2], 2, speeds=[1, 0])
    with pytest.raises(ValueError, match="Expected 2 values for memory_limits"):
        partition.optimal_sizes([1, 2], 2, memory=[1, 1], memory_limits=[1])
    with pytest.raises(ValueError, match="per-layer `memory`"):
        partition.optimal_sizes([1, 2], 2, memory_limits=[1, 1])
