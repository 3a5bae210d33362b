"""GPipe schedule, bubble and simulation; micro-batch slicing."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfpar.parallel import bubble_fraction, gpipe


@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 1), (2, 4), (4, 8), (8, 16), (3, 5)])
def test_bubble_counted_in_schedule_slots_equals_formula(p, m):
    table = gpipe.schedule(p, m)
    slots = len(table[0])
    assert slots == 2 * (m + p - 1)
    for s, row in enumerate(table):
        # Each stage runs every micro-batch forward once and backward once, in GPipe order.
        assert sorted(x for x in row if x) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        forward_at = {x[1]: t for t, x in enumerate(row) if x and x[0] == "F"}
        backward_at = {x[1]: t for t, x in enumerate(row) if x and x[0] == "B"}
        for i in range(m):
            if s > 0:  # a micro-batch enters a stage after leaving the previous one
                assert forward_at[i] > {x[1]: t for t, x in enumerate(table[s - 1]) if x and x[0] == "F"}[i]
            assert backward_at[i] > forward_at[i]
    idle = sum(x is None for row in table for x in row)
    assert idle / (p * slots) == pytest.approx(bubble_fraction(p, m))
    assert bubble_fraction(p, m) == pytest.approx((p - 1) / (m + p - 1))


def test_simulation_matches_bubble_for_equal_stages_and_penalizes_imbalance():
    for p, m in [(2, 1), (2, 8), (4, 4), (8, 32)]:
        sim = gpipe.simulate([1.0] * p, m)
        assert sim.bubble == pytest.approx(bubble_fraction(p, m))
        # makespan = (m + p - 1) slots of (1 + 2) / m each
        assert sim.makespan == pytest.approx((m + p - 1) * 3.0 / m)
    balanced = gpipe.simulate([2.0, 2.0], 8).makespan
    skewed = gpipe.simulate([1.0, 3.0], 8).makespan
    assert skewed > balanced
    # More micro-batches shrink the step time toward the bottleneck.
    times = [gpipe.simulate([1.0, 1.0, 1.0], m).makespan for m in (1, 2, 4, 8, 16)]
    assert times == sorted(times, reverse=True)


def test_microbatch_bounds_and_split_cover_the_batch():
    x = tf.reshape(tf.range(14), (7, 2))
    bounds = gpipe.microbatch_bounds(tf.shape(x)[0], 3)
    parts = gpipe.split_batch(x, bounds)
    assert [int(p.shape[0]) for p in parts] == [2, 2, 3]
    np.testing.assert_array_equal(tf.concat(parts, 0), x)
    tiny = gpipe.split_batch(x[:2], gpipe.microbatch_bounds(2, 4))
    assert [int(p.shape[0]) for p in tiny] == [0, 1, 0, 1]


def test_invalid_microbatches():
    with pytest.raises(ValueError, match=r"`microbatches` to be an int >= 1 or 'auto'\. Received: microbatches=0"):
        gpipe.check_microbatches(0)
    with pytest.raises(TypeError, match="Received: microbatches='many'"):
        gpipe.check_microbatches("many")
    with pytest.raises(ValueError, match="`num_stages` to be an int >= 1"):
        bubble_fraction(0, 4)
    # A wrong type raises TypeError (ValueError before the validation helper).
    with pytest.raises(TypeError, match=r"`microbatches` to be an int >= 1\. Received: microbatches=2\.0 \(of type float\)"):
        bubble_fraction(2, 2.0)


def test_tune_microbatches_interleaves_candidates_and_skips_too_many():
    calls = []

    def step_for(m):
        def step():
            calls.append(m)
            return tf.constant(float(m))

        return step

    timings = gpipe.tune_microbatches(step_for, batch_size=4, repeats=3)
    assert sorted(timings) == [1, 2, 4]
    assert all(t >= 0 for t in timings.values())
    # two warm-up calls each, then three rounds that visit every candidate in turn
    assert calls[6:] == [1, 2, 4] * 3
