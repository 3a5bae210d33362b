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
    with pytest.raises(ValueError, match=r"plain.tfrecord': it is an empty TFRecord file \(no records\)"):
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


# === undecodable files: named, or skipped and counted (on_error) ===


@pytest.fixture
def damaged_folder(image_folder):
    """image_folder plus a non-image saved as .jpg (found up front) and a truncated PNG (lazily)."""
    (image_folder / "dog" / "0.5.jpg").write_bytes(b"<!DOCTYPE html><title>404</title>")
    whole = tf.io.encode_png(np.full((10, 12, 3), 7, np.uint8)).numpy()
    (image_folder / "cat" / "5.png").write_bytes(whole[: len(whole) // 2])
    return image_folder


def test_a_non_image_is_named_up_front(damaged_folder):
    with pytest.raises(ValueError, match=r"1 of 10 files are not readable images: '\S*dog/0.5.jpg' is not a "
                                         r"JPEG, PNG, GIF, BMP, WebP or JPEG XL image \(it starts with b'<!DOCTYPE"):
        td.read_images(str(damaged_folder))


def test_a_truncated_image_is_named_when_read(damaged_folder):
    os.remove(damaged_folder / "dog" / "0.5.jpg")
    dataset = td.read_images(str(damaged_folder), image_size=(4, 4))
    assert int(dataset.cardinality()) == 9  # known: every file decodes, or iteration fails
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"cannot decode the image file\] \[\S*cat/5.png\]"):
        _pixel_and_label(dataset)


def test_skip_leaves_undecodable_files_out_and_counts_them(damaged_folder, capfd):
    with pytest.warns(UserWarning, match=r"skipped 1 of 10 files that are not readable images "
                                         r"\(on_error='skip'\): '\S*dog/0.5.jpg'"):
        dataset = td.read_images(str(damaged_folder), image_size=(4, 4), on_error="skip")
    capfd.readouterr()
    for _ in range(2):  # every pass reports what it skipped
        assert _pixel_and_label(dataset) == [(0, 0), (1, 0), (2, 0), (9, 0), (10, 1), (11, 1), (12, 1), (19, 1)]
        assert "tfpar.data.read_images: skipped 1 of 9 image files that could not be read or decoded" in (
            capfd.readouterr().err)
    assert int(dataset.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    # The files skipped up front are not part of the dataset's files (FILE sharding).
    assert len(td.source_files(dataset)) == 9


def test_skip_of_the_last_file_and_of_every_file(damaged_folder, capfd):
    os.remove(damaged_folder / "dog" / "0.5.jpg")
    only = damaged_folder / "only"
    os.makedirs(only / "x")
    os.rename(damaged_folder / "cat" / "5.png", only / "x" / "5.png")
    assert _pixel_and_label(td.read_images(str(only), image_size=(4, 4), on_error="skip")) == []
    assert "skipped 1 of 1 image files" in capfd.readouterr().err
    (only / "x" / "bad.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"None of the 1 files is a readable image: '\S*bad.png' is empty"):
        td.read_images([str(only / "x" / "bad.png")], on_error="skip")


def test_every_supported_format_passes_the_header_check(tmp_path):
    image = pytest.importorskip("PIL.Image")
    pixels = np.full((6, 6, 3), 40, np.uint8)
    os.makedirs(tmp_path / "c")
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP"):
        image.fromarray(pixels).save(tmp_path / "c" / f"a.{fmt.lower()}", format=fmt)
    os.rename(tmp_path / "c" / "a.webp", tmp_path / "c" / "webp-named.png")  # decode_image goes by content
    os.rename(tmp_path / "c" / "a.png", tmp_path / "c" / "png-named.jpg")
    dataset = td.read_images(str(tmp_path), image_size=(6, 6))
    values = [float(x[0, 0, 0]) for x, _ in dataset.as_numpy_iterator()]
    assert len(values) == 5 and all(abs(v - 40) < 3 for v in values)


def test_file_shards_with_undecodable_files_name_them_too(damaged_folder):
    os.remove(damaged_folder / "dog" / "0.5.jpg")
    dataset = td.read_images(str(damaged_folder), image_size=(4, 4))
    # cat/5.png is file 3 (from 0) in reading order: shard 1 of 2 holds files 1, 3, 5, 7.
    assert _pixel_and_label(td.shard(dataset, 2, 0, policy="file")) == [(0, 0), (2, 0), (9, 0), (11, 1), (19, 1)]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"cannot decode the image file\] \[\S*cat/5.png"):
        _pixel_and_label(td.shard(dataset, 2, 1, policy="file"))


# === files that are not what read() expects: named, with what was expected ===


def test_read_names_files_that_are_not_tfrecords(tmp_path):
    (tmp_path / "x.txt").write_text("name,value\n" * 50)
    with pytest.raises(ValueError, match=r"'\S*x.txt' is not a TFRecord file: it does not start with a TFRecord "
                                         r"record header \(it starts with b'name,value\\n"):
        td.read(str(tmp_path / "x.txt"))
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"short.txt' is not a TFRecord file.*Expected an image folder"):
        td.read(str(tmp_path / "short.txt"))
    paths = td.write_tfrecords({"v": np.arange(3)}, str(tmp_path / "gz"), num_files=1, compression_type="GZIP")
    with pytest.raises(ValueError, match=r"GZIP-compressed: pass compression_type='GZIP'"):
        td.read(paths[0])
    assert sum(1 for _ in td.read(paths[0], compression_type="GZIP")) == 3
    with pytest.raises(ValueError, match=r"x.txt' is not a TFRecord file: it is not ZLIB-compressed"):
        td.read_tfrecords(str(tmp_path / "x.txt"), compression_type="ZLIB")
    # Every local file is checked, not only the first.
    plain = td.write_tfrecords({"v": np.arange(3)}, str(tmp_path / "plain"), num_files=1)
    with pytest.raises(ValueError, match=r"x.txt' is not a TFRecord file"):
        td.read_tfrecords([plain[0], str(tmp_path / "x.txt")], features=None)
    assert td.readers.source_kind(plain[0]) == "tfrecords"


def test_read_names_numpy_files_it_cannot_load(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"\x00\x01 not a zip" * 8)
    with pytest.raises(ValueError, match=r"'\S*junk.npz' is not a .npz file \(a zip archive, starting with b'PK'\)"):
        td.read(str(tmp_path / "junk.npz"))
    (tmp_path / "junk.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"junk.npy' is not a .npy file .*\(it is empty\)"):
        td.read_numpy(str(tmp_path / "junk.npy"))
    np.savez(tmp_path / "objects.npz", x=np.array([None, {}], dtype=object))
    with pytest.raises(ValueError, match=r"objects.npz' holds object arrays .*allow_pickle=True"):
        td.read(str(tmp_path / "objects.npz"))
    np.savez(tmp_path / "good.npz", x=np.ones((3, 2)), y=np.arange(3))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"Cannot read '\S*cut.npz' as a numpy file: .*truncated or damaged"):
        td.read(str(tmp_path / "cut.npz"))


def test_source_kind_checks_without_reading_data(tmp_path, image_folder):
    assert td.readers.source_kind(str(image_folder)) == "images"
    os.makedirs(tmp_path / "docs" / "a")
    (tmp_path / "docs" / "a" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"Found class sub-folders \['a'\] in \S*docs' but no image files"):
        td.readers.source_kind(str(tmp_path / "docs"))
    with pytest.raises(ValueError, match=r"Nothing matches .*Received: path='\S*none\*' \(not found\)"):
        td.readers.source_kind(str(tmp_path / "none*"))
    with pytest.raises(TypeError, match="Expected a path"):
        td.readers.source_kind(3)
