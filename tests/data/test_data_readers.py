"""tfpar.data readers: image folders, TFRecords, numpy; all visible to FILE sharding when on disk."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import tfpar.data as td
from tfpar.datasets import load_digits


def _write_image(path, value, shape=(10, 12, 3)):
    pixels = np.full(shape, value, np.uint8)
    encode = tf.io.encode_png if path.endswith(".png") else tf.io.encode_jpeg
    tf.io.write_file(path, encode(pixels))


@pytest.fixture
def image_folder(tmp_path):
    # Class folders in reverse creation order; values 10*class + index identify every image.
    for label, name in enumerate(["cat", "dog"]):
        os.makedirs(tmp_path / name / "nested")
        for i in range(3):
            _write_image(str(tmp_path / name / f"{i}.png"), 10 * label + i)
        _write_image(str(tmp_path / name / "nested" / "9.png"), 10 * label + 9)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def _pixel_and_label(dataset):
    return [(int(round(float(x[0, 0, 0]))), int(y)) for x, y in dataset.as_numpy_iterator()]


def test_image_folder_classes_labels_and_order(image_folder):
    dataset = td.read_images(str(image_folder), image_size=(6, 6))
    assert dataset.element_spec[0].shape == (6, 6, 3)
    assert dataset.element_spec[0].dtype == tf.float32
    got = _pixel_and_label(dataset)
    assert got == [(0, 0), (1, 0), (2, 0), (9, 0), (10, 1), (11, 1), (12, 1), (19, 1)]
    assert td.image_class_names(str(image_folder)) == ["cat", "dog"]


def test_image_folder_matches_keras_labels(image_folder):
    import keras

    reference = keras.utils.image_dataset_from_directory(
        str(image_folder), image_size=(6, 6), shuffle=False, batch_size=None
    )
    keras_pairs = sorted(
        (int(round(float(x[0, 0, 0]))), int(y)) for x, y in reference.as_numpy_iterator()
    )
    assert sorted(_pixel_and_label(td.read_images(str(image_folder), image_size=(6, 6)))) == keras_pairs
    assert reference.class_names == td.image_class_names(str(image_folder))


def test_image_options(image_folder):
    gray = td.read_images(str(image_folder), image_size=None, color_mode="grayscale",
                          label_mode="categorical", class_names=["dog", "cat"])
    image, label = next(iter(gray))
    assert image.shape == (10, 12, 1)
    assert label.numpy().tolist() == [1.0, 0.0]  # first file is a dog (class 0 of this order)
    images_only = td.read_images(str(image_folder), image_size=(4, 4), label_mode=None)
    assert images_only.element_spec.shape == (4, 4, 3)


def test_image_file_list_form_and_jpeg(image_folder):
    _write_image(str(image_folder / "dog" / "late.jpg"), 200)
    files = [str(image_folder / "dog" / "late.jpg"), str(image_folder / "cat" / "0.png")]
    dataset = td.read_images(files, image_size=(5, 5), class_names=["cat", "dog"])
    pairs = _pixel_and_label(dataset)
    assert pairs[0] == (0, 0) and pairs[1][1] == 1 and abs(pairs[1][0] - 200) <= 3


def test_image_folders_are_file_shardable(image_folder):
    dataset = td.read_images(str(image_folder), image_size=(4, 4))
    assert len(td.source_files(dataset)) == 8
    assert td.choose_policy(dataset, 8) == "file"
    shards = [_pixel_and_label(td.shard(dataset, 4, i, policy="file")) for i in range(4)]
    flat = [p for s in shards for p in s]
    assert sorted(flat) == sorted(_pixel_and_label(dataset)) and len(set(flat)) == 8
    # Shard i holds files i, i + 4 of the reading order: whole files, no decode of the others.
    order = _pixel_and_label(dataset)
    assert shards[1] == [order[1], order[5]]
    # TensorFlow's own rewrite cannot shard read_file maps, so its policy is DATA.
    assert td.set_auto_shard_policy(dataset, 2).options().experimental_distribute.auto_shard_policy == (
        tf.data.experimental.AutoShardPolicy.DATA)


def test_image_file_sharding_needs_the_dataset_as_returned(image_folder):
    mapped = td.read_images(str(image_folder), image_size=(4, 4)).map(lambda x, y: (x / 255.0, y))
    assert td.source_files(mapped) == []
    with pytest.raises(ValueError, match="before any map"):
        td.shard(mapped, 2, 0, policy="file")
    assert td.choose_policy(mapped, 2) == "data"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"color_mode": "bgr"}, ValueError, "color_mode"),
        ({"label_mode": "binary"}, ValueError, "label_mode"),
        ({"image_size": (0, 4)}, ValueError, "image_size"),
        ({"class_names": ["cat"]}, ValueError, r"match the sub-folders .*\['cat', 'dog'\]"),
        ({"interpolation": "cubic"}, ValueError, "interpolation"),
    ],
)
def test_image_argument_errors(image_folder, kwargs, error, match):
    with pytest.raises(error, match=match):
        td.read_images(str(image_folder), **kwargs)


def test_image_source_errors(tmp_path):
    with pytest.raises(ValueError, match="existing directory"):
        td.read_images(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty_class")
    with pytest.raises(ValueError, match="Found no images"):
        td.read_images(str(tmp_path))
    with pytest.raises(TypeError, match="directory path or a list"):
        td.read_images(42)
    _write_image(str(tmp_path / "empty_class" / "a.png"), 1)
    with pytest.raises(ValueError, match="unknown classes"):
        td.read_images([str(tmp_path / "empty_class" / "a.png")], class_names=["other"])


def test_tfrecords_round_trip_with_shapes(tmp_path):
    images, labels = load_digits()
    paths = td.write_tfrecords({"x": images[:50], "y": labels[:50]}, str(tmp_path), num_files=4,
                               prefix="digits")
    assert [os.path.basename(p) for p in paths] == [f"digits-{k:05d}-of-00004.tfrecord" for k in range(4)]
    dataset = td.read_tfrecords(str(tmp_path / "digits-*.tfrecord"), features="infer")
    assert dataset.element_spec["x"].shape == (8, 8, 1)
    assert dataset.element_spec["y"].shape == ()
    got = {int(e["y"]) * 10_000 + int(e["x"].sum()) for e in dataset.as_numpy_iterator()}
    expected = {int(y) * 10_000 + int(x.sum()) for x, y in zip(images[:50], labels[:50])}
    assert got == expected and sum(1 for _ in dataset) == 50


def test_tfrecords_features_parse_fn_raw_and_compression(tmp_path):
    td.write_tfrecords({"v": np.arange(6)}, str(tmp_path), num_files=2, compression_type="GZIP")
    pattern = str(tmp_path / "*.tfrecord")
    spec = {"v": tf.io.FixedLenFeature([1], tf.int64)}
    parsed = td.read_tfrecords(pattern, features=spec, compression_type="GZIP")
    assert sorted(int(e["v"][0]) for e in parsed) == list(range(6))
    custom = td.read_tfrecords(pattern, compression_type="GZIP",
                               parse_fn=lambda r: tf.io.parse_single_example(r, spec)["v"][0] * 2)
    assert sorted(int(v) for v in custom) == [0, 2, 4, 6, 8, 10]
    raw = td.read_tfrecords(pattern, compression_type="GZIP")
    assert raw.element_spec.dtype == tf.string and sum(1 for _ in raw) == 6
    # Read order: files interleaved, deterministic (file 0 holds rows 0,2,4; file 1 rows 1,3,5).
    assert [int(e["v"][0]) for e in parsed] == [0, 1, 2, 3, 4, 5]


def test_tfrecord_errors(tmp_path):
    with pytest.raises(ValueError, match="No files match"):
        td.read_tfrecords(str(tmp_path / "*.tfrecord"))
    td.write_tfrecords({"v": np.arange(3)}, str(tmp_path), num_files=1)
    pattern = str(tmp_path / "*.tfrecord")
    with pytest.raises(ValueError, match="not both"):
        td.read_tfrecords(pattern, features="infer", parse_fn=lambda r: r)
    with pytest.raises(ValueError, match="compression_type"):
        td.read_tfrecords(pattern, compression_type="BZIP2")
    with pytest.raises(TypeError, match="glob, a path, or a list"):
        td.read_tfrecords(7)
    with pytest.raises(ValueError, match="num_files <= 3"):
        td.write_tfrecords({"v": np.arange(3)}, str(tmp_path), num_files=4)
    with pytest.raises(ValueError, match="one length"):
        td.write_tfrecords({"a": np.arange(3), "b": np.arange(4)}, str(tmp_path), num_files=1)
    with open(tmp_path / "plain.tfrecord", "wb"):
        pass
    with pytest.raises(ValueError, match="empty file"):
        td.read_tfrecords(str(tmp_path / "plain.tfrecord"), features="infer")


def test_numpy_reader(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6)
    dataset = td.from_numpy(x, y, sample_weight=np.ones(6))
    assert len(dataset.element_spec) == 3 and sum(1 for _ in dataset) == 6
    assert [d["a"].tolist() for d in td.from_numpy({"a": y}).as_numpy_iterator()] == y.tolist()
    with pytest.raises(ValueError, match="one length"):
        td.from_numpy(x, y[:5])
    with pytest.raises(ValueError, match="needs `y`"):
        td.from_numpy(x, sample_weight=np.ones(6))
    np.savez(tmp_path / "train.npz", x=x, y=y)
    pairs = list(td.read_numpy(str(tmp_path / "train.npz")).as_numpy_iterator())
    assert [p[1] for p in pairs] == y.tolist()
    with pytest.raises(ValueError, match="holds \\['x', 'y'\\]"):
        td.read_numpy(str(tmp_path / "train.npz"), x_key="features")
    np.save(tmp_path / "x.npy", x)
    assert sum(1 for _ in td.read_numpy(str(tmp_path / "x.npy"))) == 6


def test_read_dispatches_on_the_path(tmp_path, image_folder):
    assert td.read(str(image_folder), image_size=(4, 4)).element_spec[0].shape == (4, 4, 3)
    records = tmp_path / "records"
    td.write_tfrecords({"x": np.ones((4, 2)), "y": np.arange(4)}, str(records), num_files=2)
    assert set(td.read(str(records)).element_spec) == {"x", "y"}
    np.savez(tmp_path / "d.npz", x=np.ones((3, 2)))
    assert td.read(str(tmp_path / "d.npz")).element_spec.shape == (2,)
    empty = tmp_path / "nothing"
    os.makedirs(empty)
    with pytest.raises(ValueError, match="Found neither class sub-folders"):
        td.read(str(empty))
