"""tfpar.data.split: complete, disjoint, exact-size, reproducible, epoch-stable parts."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tfpar.data as td


@pytest.fixture(autouse=True)
def _no_global_seed():
    # A global seed (keras.utils.set_random_seed in another test) seeds "unseeded" shuffles,
    # which tfpar then rightly accepts; these tests need truly unseeded ones.
    tf.random.set_seed(None)


def _values(dataset):
    return [v.tolist() if hasattr(v, "tolist") else v for v in dataset.as_numpy_iterator()]


@pytest.mark.parametrize("mode, seed", [("sequential", None), ("random", 0), ("random", 123)])
@pytest.mark.parametrize("n, fractions", [(103, (0.7, 0.2, 0.1)), (10, (0.5, 0.5)), (7, 0.6)])
def test_parts_are_complete_disjoint_and_exact(mode, seed, n, fractions):
    parts = td.split(tf.data.Dataset.range(n), fractions, mode=mode, seed=seed)
    values = [_values(p) for p in parts]
    flat = [v for part in values for v in part]
    assert sorted(flat) == list(range(n))
    fractions = (fractions, 1 - fractions) if isinstance(fractions, float) else fractions
    exact = [f * n for f in fractions]
    assert all(abs(len(p) - e) < 1 for p, e in zip(values, exact))
    for part in values:
        assert part == sorted(part)  # original order kept within a part
    assert [int(p.cardinality()) for p in parts] == (
        [len(v) for v in values] if mode == "sequential" else [-2] * len(values)
    )


def test_sequential_parts_are_contiguous():
    train, val, test = td.split(tf.data.Dataset.range(20), (0.5, 0.25, 0.25))
    assert _values(train) == list(range(10))
    assert _values(val) == list(range(10, 15))
    assert _values(test) == list(range(15, 20))


def test_random_split_is_reproducible_and_seed_dependent():
    first = [_values(p) for p in td.split(tf.data.Dataset.range(200), (0.8, 0.2), "random", 5)]
    again = [_values(p) for p in td.split(tf.data.Dataset.range(200), (0.8, 0.2), "random", 5)]
    other = [_values(p) for p in td.split(tf.data.Dataset.range(200), (0.8, 0.2), "random", 6)]
    assert first == again
    assert first != other
    assert first[1] != list(range(160, 200))  # not just a sequential split


def test_parts_are_stable_across_epochs_and_shuffles_after_the_split():
    train, val = td.split(tf.data.Dataset.range(100), (0.9, 0.1), "random", seed=1)
    shuffled = train.shuffle(100, seed=2)  # reshuffled every epoch, same membership
    epoch1, epoch2 = _values(shuffled), _values(shuffled)
    assert epoch1 != epoch2 and sorted(epoch1) == sorted(epoch2)
    assert set(epoch1).isdisjoint(_values(val))


def test_tuple_elements_and_unknown_cardinality():
    x = np.arange(30, dtype=np.float32)
    dataset = td.from_numpy(x, x.astype(np.int64) * 2).filter(lambda a, b: b % 3 != 0)
    assert int(dataset.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    left, right = td.split(dataset, (0.5, 0.5), mode="random", seed=0)
    pairs = _values(left) + _values(right)
    assert sorted(int(b) for _, b in pairs) == [b for b in range(0, 60, 2) if b % 3]
    assert all(b == 2 * a for a, b in pairs)


def test_split_of_shuffled_data_is_refused():
    with pytest.raises(ValueError, match="Splitting needs the same element order"):
        td.split(tf.data.Dataset.range(10).shuffle(10), (0.5, 0.5))


def test_random_without_seed_is_consistent_within_one_call(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="tfpar.data.split"):
        parts = td.split(tf.data.Dataset.range(50), (0.6, 0.4), mode="random")
    assert "drew seed=" in caplog.text
    values = [_values(p) for p in parts]
    assert sorted(values[0] + values[1]) == list(range(50))
    assert values == [_values(p) for p in parts]  # fixed at split time, stable afterwards


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"fractions": (0.5, 0.6)}, ValueError, "sum to 1"),
        ({"fractions": (1.0, 0.0)}, ValueError, "positive"),
        ({"fractions": 1.5}, ValueError, "0 < f < 1"),
        ({"fractions": "0.5"}, TypeError, "sequence of floats"),
        ({"mode": "stratified"}, ValueError, r"\['sequential', 'random'\]"),
        ({"seed": 3}, ValueError, "only applies to mode='random'"),
        ({"mode": "random", "seed": 1.5}, TypeError, "seed"),
        ({"fractions": (0.99, 0.01)}, ValueError, "would be empty"),
        ({"dataset": tf.data.Dataset.range(5).repeat()}, ValueError, "infinite"),
        ({"dataset": np.arange(5)}, TypeError, "tf.data.Dataset"),
    ],
)
def test_argument_errors(kwargs, error, match):
    arguments = {"dataset": tf.data.Dataset.range(10), "fractions": (0.5, 0.5)}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        td.split(**arguments)
