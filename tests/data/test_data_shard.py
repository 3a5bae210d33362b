"""tfpar.data.shard: disjoint, complete shards; explicit FILE/DATA choice; refusals with the fix."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import tfpar.data as td

NUM_RECORDS = 60
NUM_FILES = 5


@pytest.fixture(autouse=True)
def _no_global_seed():
    # A global seed (keras.utils.set_random_seed in another test) seeds "unseeded" shuffles,
    # which tfpar then rightly accepts; these tests need truly unseeded ones.
    tf.random.set_seed(None)


@pytest.fixture(scope="module")
def record_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("records")
    return td.write_tfrecords({"id": np.arange(NUM_RECORDS)}, str(directory), num_files=NUM_FILES)


@pytest.fixture(scope="module")
def records(record_files):
    return td.read_tfrecords(record_files, features="infer").map(lambda e: e["id"])


def _ids(dataset):
    return [int(v) for v in dataset.as_numpy_iterator()]


def _assert_partition(shards, expected):
    flat = [v for s in shards for v in s]
    assert sorted(flat) == sorted(expected), "shards are not complete or overlap"
    assert len(flat) == len(set(flat)), "an element appears in two shards"


@pytest.mark.parametrize("num_shards", range(1, 9))
@pytest.mark.parametrize("policy", ["auto", "data"])
def test_in_memory_shards_are_disjoint_and_complete(num_shards, policy):
    dataset = tf.data.Dataset.range(37).map(lambda x: x * 3)
    shards = [_ids(td.shard(dataset, num_shards, i, policy=policy)) for i in range(num_shards)]
    _assert_partition(shards, [3 * i for i in range(37)])
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("num_shards", range(1, 9))
@pytest.mark.parametrize("policy", ["auto", "file", "data"])
def test_file_shards_are_disjoint_and_complete(records, record_files, num_shards, policy):
    if policy == "file" and num_shards > NUM_FILES:
        with pytest.raises(ValueError, match=f"reads {NUM_FILES} file"):
            td.shard(records, num_shards, 0, policy=policy)
        return
    shards = [_ids(td.shard(records, num_shards, i, policy=policy)) for i in range(num_shards)]
    _assert_partition(shards, range(NUM_RECORDS))


def test_file_shards_hold_whole_files(records, record_files):
    # write_tfrecords puts record i in file i % NUM_FILES, so a FILE shard holds whole residues.
    for index in range(2):
        ids = _ids(td.shard(records, 2, index, policy="file"))
        assert {i % NUM_FILES for i in ids} == set(range(index, NUM_FILES, 2))


def test_auto_picks_file_with_enough_files_and_data_otherwise(records, caplog):
    assert td.choose_policy(records, NUM_FILES) == "file"
    assert td.choose_policy(records, NUM_FILES + 1) == "data"
    assert td.choose_policy(tf.data.Dataset.range(10), 2) == "data"
    with caplog.at_level(logging.INFO, logger="tfpar.data.shard"):
        td.shard(records, NUM_FILES + 1, 0)
    assert "DATA sharding" in caplog.text and f"only {NUM_FILES} files" in caplog.text


def test_file_policy_with_too_few_files_names_counts_and_fix(records):
    with pytest.raises(ValueError) as error:
        td.shard(records, 8, 3, policy="file")
    message = str(error.value)
    assert "5 file(s)" in message and "num_shards=8" in message
    assert "num_files=8" in message and "policy='data'" in message


def test_file_policy_on_in_memory_data_is_refused():
    with pytest.raises(ValueError, match="in-memory or generated source"):
        td.shard(tf.data.Dataset.range(10), 2, 0, policy="file")


def test_file_policy_refuses_ops_the_rewrite_cannot_pass(records):
    with pytest.raises(ValueError, match="IgnoreErrorsDataset"):
        td.shard(records.ignore_errors(), 2, 0, policy="file")
    # auto falls back to DATA, which is still a correct partition
    shards = [_ids(td.shard(records.ignore_errors(), 2, i)) for i in range(2)]
    _assert_partition(shards, range(NUM_RECORDS))


def test_unseeded_file_list_shuffle_is_fine_for_file_sharding(record_files):
    pattern = os.path.join(os.path.dirname(record_files[0]), "*.tfrecord")
    dataset = tf.data.Dataset.list_files(pattern).interleave(
        tf.data.TFRecordDataset, num_parallel_calls=2
    )
    dataset = dataset.map(lambda r: tf.io.parse_single_example(r, {"id": tf.io.FixedLenFeature([], tf.int64)})["id"])
    for _ in range(2):  # different random file orders; FILE shards still partition the data
        shards = [_ids(td.shard(dataset, 2, i, policy="file")) for i in range(2)]
        _assert_partition(shards, range(NUM_RECORDS))


def test_data_sharding_after_unseeded_shuffle_is_refused():
    dataset = tf.data.Dataset.range(100).shuffle(100)
    with pytest.raises(ValueError, match="shuffle has no seed") as error:
        td.shard(dataset, 2, 0)
    assert "seed=" in str(error.value)


def test_the_refusal_guards_against_real_overlap():
    # Without tfpar's check, plain Dataset.shard after an unseeded shuffle overlaps.
    dataset = tf.data.Dataset.range(200).shuffle(200)
    halves = [set(_ids(dataset.shard(2, i))) for i in range(2)]
    assert halves[0] & halves[1]


def test_data_sharding_after_seeded_shuffle_partitions_every_epoch():
    # One dataset object per shard, as on separate workers.
    shards = [td.shard(tf.data.Dataset.range(50).shuffle(50, seed=7), 3, i) for i in range(3)]
    epochs = [[_ids(s) for s in shards] for _ in range(2)]
    for epoch in epochs:  # reshuffled each epoch, identically in every shard
        _assert_partition(epoch, range(50))
    assert epochs[0] != epochs[1]


def test_shards_of_one_reshuffling_object_warn():
    dataset = tf.data.Dataset.range(50).shuffle(50, seed=7)
    td.shard(dataset, 2, 0)
    with pytest.warns(UserWarning, match="share that shuffle's random state"):
        td.shard(dataset, 2, 1)
    fixed = tf.data.Dataset.range(50).shuffle(50, seed=7, reshuffle_each_iteration=False)
    shards = [td.shard(fixed, 2, i) for i in range(2)]  # no shared state to worry about
    _assert_partition([_ids(s) for s in shards], range(50))


def test_global_seed_counts_as_a_seed():
    tf.random.set_seed(3)
    try:
        dataset = tf.data.Dataset.range(40).shuffle(40, reshuffle_each_iteration=False)
        _assert_partition([_ids(td.shard(dataset, 2, i)) for i in range(2)], range(40))
    finally:
        tf.random.set_seed(None)


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda d: d.map(lambda x: x, num_parallel_calls=2, deterministic=False), "deterministic=False"),
        (lambda d: d.filter(lambda x: tf.random.uniform([]) < 0.5), "unseeded random op"),
        (lambda d: tf.data.Dataset.sample_from_datasets([d, d]), "RandomDataset"),
        (lambda d: tf.data.Dataset.random().take(20), "RandomDataset"),  # the random stream is the data
        (  # an unseeded random subsample: the zipped random value decides which examples stay
            lambda d: tf.data.Dataset.zip(d, tf.data.Dataset.random())
            .filter(lambda x, r: r % 4 != 0).map(lambda x, r: x),
            "RandomDataset",
        ),
        (lambda d: d.interleave(lambda x: tf.data.Dataset.range(3).shuffle(3)), "inside function"),
    ],
)
def test_other_nondeterminism_is_refused(make, problem):
    with pytest.raises(ValueError, match=problem):
        td.shard(make(tf.data.Dataset.range(20)), 2, 0, policy="data")


def test_unseeded_random_values_zipped_to_the_data_do_not_block_a_data_shard():
    # A seeded augment_fn without seed=: tfpar zips an unseeded Dataset.random() in as per-example
    # seeds. It changes the values, never which examples a shard gets.
    augment = lambda x, seed: tf.cast(x, tf.float32) + tf.random.stateless_uniform([], seed)  # noqa: E731
    built = td.pipeline(tf.data.Dataset.range(12), augment_fn=augment, deterministic=True)
    shards = [td.shard(built, 3, i, policy="data") for i in range(3)]
    _assert_partition([sorted(int(v) for v in s.as_numpy_iterator()) for s in shards], range(12))
    zipped = tf.data.Dataset.zip(tf.data.Dataset.range(12), tf.data.Dataset.random().batch(2))
    _assert_partition([[int(x) for x, _ in td.shard(zipped, 2, i).as_numpy_iterator()] for i in range(2)],
                      range(12))


def test_nondeterministic_options_are_refused():
    options = tf.data.Options()
    options.deterministic = False
    dataset = tf.data.Dataset.range(20).map(lambda x: x, num_parallel_calls=2).with_options(options)
    with pytest.raises(ValueError, match="Options.deterministic=False"):
        td.shard(dataset, 2, 0)


def test_memory_cache_before_file_shard_is_refused_and_auto_uses_data(records):
    cached = records.cache()
    with pytest.raises(ValueError, match="cache"):
        td.shard(cached, 2, 0, policy="file")
    assert td.choose_policy(cached, 2) == "data"
    _assert_partition([_ids(td.shard(cached, 2, i)) for i in range(2)], range(NUM_RECORDS))


def test_data_shard_smaller_than_shards_is_refused():
    with pytest.raises(ValueError, match="3 elements into num_shards=4"):
        td.shard(tf.data.Dataset.range(3), 4, 0)


def test_shards_switch_off_tensorflow_auto_sharding(records):
    off = tf.data.experimental.AutoShardPolicy.OFF
    for dataset in (records, tf.data.Dataset.range(8)):
        for n in (1, 2):
            shard = td.shard(dataset, n, 0)
            assert shard.options().experimental_distribute.auto_shard_policy == off


def test_set_auto_shard_policy_is_explicit(records):
    policy = tf.data.experimental.AutoShardPolicy
    get = lambda d: d.options().experimental_distribute.auto_shard_policy  # noqa: E731
    assert get(td.set_auto_shard_policy(records, 1)) == policy.OFF
    assert get(td.set_auto_shard_policy(records, 2)) == policy.FILE
    assert get(td.set_auto_shard_policy(records, 8)) == policy.DATA
    assert get(td.set_auto_shard_policy(tf.data.Dataset.range(8), 2)) == policy.DATA
    with pytest.raises(ValueError, match="shuffle has no seed"):
        td.set_auto_shard_policy(tf.data.Dataset.range(8).shuffle(8), 2)
    kept = td.shard(records, 2, 0)  # OFF already set: kept
    assert get(td.set_auto_shard_policy(kept, 2)) == policy.OFF


def test_source_files(records, record_files):
    assert td.source_files(records) == sorted(record_files)
    assert td.source_files(tf.data.Dataset.range(3)) == []
    zipped = tf.data.Dataset.zip((records, tf.data.TFRecordDataset(record_files[:2])))
    assert td.source_files(zipped) == sorted(record_files)
    # zip: FILE needs each source to have enough files (2 here)
    assert td.choose_policy(zipped, 2) == "file"
    assert td.choose_policy(zipped, 3) == "data"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dataset": [1, 2]}, TypeError, "Expected a tf.data.Dataset"),
        ({"num_shards": 2.0}, TypeError, "num_shards"),
        ({"num_shards": 0}, ValueError, "`num_shards` to be an int >= 1"),
        ({"index": 2}, ValueError, "Valid indices are 0..1"),
        ({"index": -1}, ValueError, "`index` to be an int >= 0"),
        ({"policy": "files"}, ValueError, r"\['auto', 'file', 'data'\]"),
    ],
)
def test_argument_errors(kwargs, error, match):
    arguments = {"dataset": tf.data.Dataset.range(4), "num_shards": 2, "index": 0, "policy": "auto"}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        td.shard(**arguments)


def test_seed_unseeded_gives_every_worker_the_same_order_and_a_new_one_each_epoch():
    """What the shared-shuffle interception does to a multi-worker tutorial's input."""
    from tfpar.data import _dataset_graph, _reseed

    def worker_input():  # each worker builds its own dataset object, with its own random seed
        return tf.data.Dataset.range(12).shuffle(12).repeat().batch(4)

    orders = []
    for _ in range(2):
        seeded, count = _reseed.seed_unseeded(worker_input(), seed=11)
        assert count == 1 and _dataset_graph.find_nondeterminism(seeded) == ([], [])
        iterator = iter(seeded)
        orders.append([next(iterator).numpy().tolist() for _ in range(6)])
    assert orders[0] == orders[1]
    first_epoch, second_epoch = sum(orders[0][:3], []), sum(orders[0][3:], [])
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(12))
    assert first_epoch != second_epoch  # still reshuffled every epoch
    other, _ = _reseed.seed_unseeded(worker_input(), seed=12)
    iterator = iter(other)
    assert [next(iterator).numpy().tolist() for _ in range(6)] != orders[0]
    seeded_by_user = tf.data.Dataset.range(12).shuffle(12, seed=3)
    assert _reseed.seed_unseeded(seeded_by_user, seed=11) == (seeded_by_user, 0)
