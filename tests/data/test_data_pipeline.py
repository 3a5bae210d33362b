"""tfpar.data.pipeline: step order, cache correctness, augmentation after the cache, determinism."""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar.data as td


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for label in range(2):
        os.makedirs(root / f"class{label}")
        for i in range(6):
            pixels = np.full((8, 8, 3), 20 * i + label, np.uint8)
            tf.io.write_file(str(root / f"class{label}" / f"{i}.png"), tf.io.encode_png(pixels))
    return root


def _keys(dataset):
    return sorted(int(round(float(x[0, 0, 0]))) * 10 + int(y) for x, y in dataset.as_numpy_iterator())


@pytest.mark.parametrize("cache", [True, "file"])
def test_second_epoch_reads_no_files(image_folder, tmp_path, cache):
    cache = str(tmp_path / "cache" / "c") if cache == "file" else cache
    if isinstance(cache, str):
        os.makedirs(os.path.dirname(cache))
    dataset = td.pipeline(td.read_images(str(image_folder), image_size=(8, 8)), cache=cache)
    first = _keys(dataset)
    shutil.rmtree(image_folder)  # every source file is gone
    assert _keys(dataset) == first and len(first) == 12


def test_without_cache_the_files_are_read_again(image_folder):
    dataset = td.pipeline(td.read_images(str(image_folder), image_size=(8, 8)), cache=False)
    assert len(_keys(dataset)) == 12
    shutil.rmtree(image_folder)
    with pytest.raises(tf.errors.NotFoundError):
        _keys(dataset)


def test_map_runs_once_and_augment_every_epoch():
    calls = {"map": 0, "augment": 0}

    def count(name):
        def fn(x):
            calls[name] += 1
            return x

        return lambda x: tf.py_function(fn, [x], tf.int64)

    dataset = td.pipeline(tf.data.Dataset.range(10), map_fn=count("map"), augment_fn=count("augment"))
    for _ in range(3):
        assert sorted(int(v) for v in dataset) == list(range(10))
    assert calls == {"map": 10, "augment": 30}


@pytest.mark.parametrize("form", ["stateful, no global seed", "seeded, global seed"])
def test_random_augmentation_is_not_frozen_in_the_cache(form):
    if form == "seeded, global seed":
        keras.utils.set_random_seed(0)
        augment = lambda x, seed: x + tf.random.stateless_uniform([], seed)  # noqa: E731
    else:
        # With a global seed (set by other tests) TensorFlow may restart stateful random ops
        # from the same seed every epoch, which is what the seeded form exists for.
        tf.random.set_seed(None)
        augment = lambda x: x + tf.random.uniform([])  # noqa: E731
    dataset = td.pipeline(
        tf.data.Dataset.range(20),
        map_fn=lambda x: tf.cast(x, tf.float32),
        augment_fn=augment,
        deterministic=True,
    )
    epoch1, epoch2 = list(dataset.as_numpy_iterator()), list(dataset.as_numpy_iterator())
    assert np.array_equal(np.floor(epoch1), np.arange(20))  # same examples, same order
    assert not np.allclose(epoch1, epoch2)  # new augmentation each epoch


def test_batching_shuffling_and_determinism():
    def build(seed):
        return td.pipeline(tf.data.Dataset.range(50), batch_size=8, shuffle=50, seed=seed,
                           deterministic=True, drop_remainder=True)

    a, b = build(1), build(1)
    epochs_a = [[x.tolist() for x in a.as_numpy_iterator()] for _ in range(2)]
    epochs_b = [[x.tolist() for x in b.as_numpy_iterator()] for _ in range(2)]
    assert epochs_a == epochs_b  # reproducible run to run
    assert epochs_a[0] != epochs_a[1]  # reshuffled every epoch
    assert all(len(batch) == 8 for batch in epochs_a[0]) and len(epochs_a[0]) == 6
    assert sorted(v for batch in epochs_a[0] for v in batch) != list(range(48))  # shuffled
    last = td.pipeline(tf.data.Dataset.range(50), batch_size=8)
    assert [len(x) for x in last.as_numpy_iterator()][-1] == 2


def test_fast_mode_keeps_upstream_steps_deterministic():
    # deterministic=False must not loosen the order of steps before the pipeline (a DATA shard
    # checked them), only of the steps it adds.
    source = tf.data.Dataset.range(30).map(lambda x: x, num_parallel_calls=4)
    dataset = td.pipeline(source, cache=False)
    assert dataset.options().deterministic is not False
    assert td.choose_policy(source, 2) == "data"


def test_pipeline_sets_auto_shard_off():
    dataset = td.pipeline(tf.data.Dataset.range(4), batch_size=2)
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.OFF


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "`batch_size` to be an int >= 1"),
        ({"shuffle": 10, "deterministic": True}, ValueError, "needs a seed"),
        ({"map_fn": "decode"}, TypeError, "map_fn"),
        ({"cache": 1}, TypeError, "cache"),
        ({"cache": ""}, TypeError, "cache"),
        ({"drop_remainder": "yes"}, TypeError, "drop_remainder"),
        ({"seed": 0.5}, TypeError, "seed"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        td.pipeline(tf.data.Dataset.range(4), **kwargs)


def test_caching_an_infinite_dataset_is_refused():
    with pytest.raises(ValueError, match="before .repeat"):
        td.pipeline(tf.data.Dataset.range(4).repeat())
    assert td.pipeline(tf.data.Dataset.range(4).repeat(), cache=False).take(9).cardinality() == 9


def _zeros(count=12):
    return tf.data.Dataset.from_tensor_slices((np.zeros((count, 4, 4, 3), np.float32), np.arange(count)))


def _brightness_draws(dataset):
    """Each example's brightness shift (all its pixels share it), in label order."""
    pairs = [(int(y), float(x[0, 0, 0])) for xs, ys in dataset.as_numpy_iterator() for x, y in zip(xs, ys)]
    return np.array([shift for _, shift in sorted(pairs)])


def test_seeded_augment_fn_gets_new_per_example_seeds_every_epoch():
    keras.utils.set_random_seed(0)

    def augment(image, label, seed):
        return tf.image.stateless_random_brightness(image, 50.0, seed), label

    def build():
        return td.pipeline(_zeros(), batch_size=4, shuffle=12, seed=3, augment_fn=augment,
                           deterministic=True)

    dataset = build()
    assert dataset.cardinality() == 3
    epoch1, epoch2 = _brightness_draws(dataset), _brightness_draws(dataset)
    assert len(np.unique(epoch1.round(4))) == 12  # every example its own draw
    assert np.abs(epoch1).max() <= 50.0
    assert not np.allclose(epoch1, epoch2)  # new draws every epoch
    again = build()  # reproducible from `seed`
    np.testing.assert_array_equal(_brightness_draws(again), epoch1)
    np.testing.assert_array_equal(_brightness_draws(again), epoch2)


def test_seeded_augment_fn_of_single_tensor_elements():
    seen = []

    def augment(x, *, seed):
        seen.append(seed.shape)
        return x + tf.cast(seed[0] * 0, x.dtype)

    dataset = td.pipeline(tf.data.Dataset.range(5), batch_size=5, augment_fn=augment)
    assert next(iter(dataset)).numpy().tolist() == [0, 1, 2, 3, 4]
    assert seen == [tf.TensorShape([2])]


# --- augment_fn vectorized over each batch (tf.vectorized_map) when that is exact ---


def _augment_order(dataset):
    """'per-batch' if the augment map reads batches, 'per-example' if a batch reads its output."""
    from tfpar.data import _dataset_graph

    graph = _dataset_graph.graph_of(dataset)
    node = graph.sink()
    while node is not None and node.input:
        below = graph.input_node(node.input[0])
        if "Map" in node.op and "Batch" in below.op:
            return "per-batch"
        if "Batch" in node.op and "Map" in below.op:
            return "per-example"
        node = below
    raise AssertionError("no map next to a batch in the pipeline graph")


def _stripes(n=64):
    """Images whose columns are 0..3, so a horizontal flip is visible in pixel [0, 0]."""
    x = np.tile(np.arange(4, dtype="float32")[None, None, :, None], (n, 4, 1, 3))
    return tf.data.Dataset.from_tensor_slices((x, np.arange(n)))


def test_random_augment_runs_per_batch_with_one_draw_per_example():
    flip = lambda x, y: (tf.image.random_flip_left_right(x), y)  # noqa: E731
    dataset = td.pipeline(_stripes(), batch_size=64, augment_fn=flip, seed=0)
    assert _augment_order(dataset) == "per-batch"
    images, labels = next(iter(dataset))
    flipped = float(np.mean(images.numpy()[:, 0, 0, 0] == 3))
    # One coin per example (64 coins): P(outside 0.2..0.8) < 1e-5. One coin per batch gives 0 or 1.
    assert 0.2 < flipped < 0.8
    np.testing.assert_array_equal(labels.numpy(), np.arange(64))


def test_vectorized_augment_equals_the_per_example_map_including_a_partial_batch():
    def augment(x, y):
        out = tf.reduce_sum(x, axis=[0, 1]) * tf.cast(y, tf.float32)
        if y % 2 == 0:  # Python control flow on a tensor: AutoGraph, per example
            out = -out
        return out, y * 2

    dataset = td.pipeline(_stripes(10), batch_size=4, augment_fn=augment, deterministic=True)
    assert _augment_order(dataset) == "per-batch"
    batches = list(dataset.as_numpy_iterator())
    assert [len(y) for _, y in batches] == [4, 4, 2]
    expected = list(_stripes(10).map(augment).batch(4).as_numpy_iterator())
    for (x, y), (ex, ey) in zip(batches, expected):
        np.testing.assert_allclose(x, ex)
        np.testing.assert_array_equal(y, ey)


@pytest.mark.parametrize(
    "case",
    ["keras-layer-with-seed-variable", "py_function", "variable-size-input", "seeded", "unbatched"],
)
def test_augment_stays_per_example_when_vectorizing_would_change_it(case):
    dataset, batch_size = _stripes(16), 16
    if case == "keras-layer-with-seed-variable":  # pfor would read the seed variable once per batch
        layer = keras.layers.RandomBrightness(0.5, value_range=(0, 3), seed=1)
        augment = lambda x, y: (layer(x, training=True), y)  # noqa: E731
    elif case == "py_function":  # pfor cannot convert it
        augment = lambda x, y: (tf.py_function(lambda a: a + 1, [x], tf.float32), y)  # noqa: E731
    elif case == "variable-size-input":  # cannot be batched before the augment crops it
        dataset = tf.data.Dataset.range(1, 17).map(lambda n: (tf.zeros([n + 3, 4, 3]), n))
        augment = lambda x, y: (tf.image.resize_with_crop_or_pad(x, 4, 4), y)  # noqa: E731
    elif case == "seeded":  # stateless ops with a per-example seed do not convert
        augment = lambda x, y, seed: (tf.image.stateless_random_flip_left_right(x, seed), y)  # noqa: E731
    else:
        batch_size = None
        augment = lambda x, y: (tf.image.random_flip_left_right(x), y)  # noqa: E731
    built = td.pipeline(dataset, batch_size=batch_size, augment_fn=augment, seed=0)
    if batch_size is None:
        assert built.element_spec[0].shape == (4, 4, 3)
        return
    assert _augment_order(built) == "per-example"
    images, _ = next(iter(built))
    assert images.shape == (16, 4, 4, 3)
    if case == "keras-layer-with-seed-variable":
        # Per example the layer draws a new brightness for every image.
        assert len(np.unique(np.round(images.numpy()[:, 0, 0, 0], 5))) > 1


def test_batched_input_is_refused_when_the_pipeline_batches(monkeypatch):
    """As tfpar.data.distribute refuses it: batching a batched dataset makes batches of batches."""
    batched = tf.data.Dataset.range(8).batch(2)
    for dataset in (batched, batched.map(lambda x: x + 1).shuffle(4, seed=0).prefetch(1)):
        with pytest.raises(ValueError, match=r"Expected unbatched examples: tfpar.data.pipeline\(batch_size=4\) "
                                             r"batches them itself.*BatchDatasetV2.*\.unbatch\(\)"):
            td.pipeline(dataset, batch_size=4)
    assert td.pipeline(batched, cache=False).element_spec.shape.as_list() == [None]  # batch_size=None: kept
    rebatched = td.pipeline(batched.unbatch(), batch_size=4, cache=False)
    assert [b.tolist() for b in rebatched.as_numpy_iterator()] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # (example, scalar label) cannot come from a batch: its graph (and embedded arrays) is not
    # serialized to check.
    from tfpar.data import _dataset_graph

    monkeypatch.setattr(_dataset_graph, "graph_of", lambda dataset: pytest.fail("serialized an unbatched dataset"))
    td.pipeline(_zeros(), batch_size=4)
