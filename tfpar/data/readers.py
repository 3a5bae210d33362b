"""Readers: turn what users have on disk or in memory into a ``tf.data.Dataset``.

* :func:`read_images`: a folder of class sub-folders, the ``keras.utils.image_dataset_from_directory``
  layout (``root/cat/1.jpg``, ``root/dog/7.png``), or a list of such files;
* :func:`read_tfrecords`: TFRecord files by glob or list (``tf.train.Example`` records or raw);
* :func:`from_numpy` / :func:`read_numpy`: arrays in memory, or ``.npy`` / ``.npz`` files;
* :func:`write_tfrecords`: numpy arrays into N TFRecord files that :func:`read_tfrecords` reads back,
  the fix when a dataset has fewer files than workers;
* :func:`read`: picks one of the above from a path (for ``tfpar train --data PATH``).

Every reader returns *unbatched* elements in a fixed order (sorted files, deterministic
interleaves with a fixed ``cycle_length``), so DATA sharding and index-based splitting mean the same
thing in every process.

FILE sharding: TFRecords are read by ``TFRecordDataset`` inside an ``interleave`` over the file
list, which TensorFlow's own FILE rewrite recognizes, also after further transformations. Image
files are read with a parallel ``map(tf.io.read_file)``, which TensorFlow cannot FILE-shard (its
rewrite only knows reader datasets, and reading each image through a one-record
``FixedLengthRecordDataset`` costs about 45% more CPU per 128x128 JPEG). So :func:`read_images`
registers how to rebuild its dataset from a subset of its files (:func:`file_source`), and
:func:`tfpar.data.shard` / :func:`tfpar.data.distribute` use that to give each worker its own image
files. This works on the dataset exactly as :func:`read_images` returned it: shard before mapping.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys
import warnings
import weakref
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from tfpar._validation import check_int

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
ON_ERROR = ("raise", "skip")
# The first bytes of every format tf.io.decode_image reads (it goes by content, not extension).
_IMAGE_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
)
_SIGNATURE_BYTES = 16
COLOR_MODES = {"grayscale": 1, "rgb": 3, "rgba": 4}
LABEL_MODES = ("int", "categorical", None)
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")
COMPRESSION_TYPES = (None, "", "ZLIB", "GZIP")
# Files read concurrently. Fixed (not AUTOTUNE, which follows each machine's core count) so the
# element order is the same on every worker.
CYCLE_LENGTH = 8
_SHAPE_PREFIX = "_shape/"
# Datasets returned by read_images -> how to rebuild them from a subset of their files.
_FILE_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def read_images(
    source: str | Sequence[str],
    *,
    image_size: tuple[int, int] | None = (256, 256),
    color_mode: Literal["grayscale", "rgb", "rgba"] = "rgb",
    label_mode: Literal["int", "categorical"] | None = "int",
    class_names: Sequence[str] | None = None,
    interpolation: str = "bilinear",
    on_error: Literal["raise", "skip"] = "raise",
) -> tf.data.Dataset:
    """Reads an image folder in the ``keras.utils.image_dataset_from_directory`` layout.

    Classes are the sub-folders of `source` in sorted order (or `class_names`' order); images are
    found recursively in each class folder (extensions: .bmp .gif .jpeg .jpg .png) and come out in
    sorted order, class by class. Unlike the Keras function it returns unbatched, unshuffled
    elements (shard, then :func:`tfpar.data.pipeline` shuffles and batches), and
    :func:`tfpar.data.shard` can give each worker its own image files (shard the dataset as
    returned, before any ``map``).

    Args:
        source: The root folder, or a list of image files whose parent folder names are their
            classes (the form incremental training uses for newly arrived files).
        image_size: ``(height, width)`` to resize to, or None to keep each image's size (elements
            then cannot be batched without resizing).
        color_mode: ``"grayscale"``, ``"rgb"`` or ``"rgba"`` (1, 3 or 4 channels).
        label_mode: ``"int"`` (int32 class index), ``"categorical"`` (float32 one-hot) or None
            (images only).
        class_names: The classes in label order. Required to match the sub-folders when given;
            with a list of files, the parent folder of every file must be one of them.
        interpolation: Resize method, as ``tf.image.resize`` names it.
        on_error: What to do with a file that is not a readable image: ``"raise"`` (default) or
            ``"skip"``. Files are checked twice. Here, up front: every file's first bytes must
            be the signature of a format ``tf.io.decode_image`` reads (JPEG, PNG, GIF, BMP,
            WebP, JPEG XL); an empty file, a text file or an HTML error page saved as ``.jpg``
            fails at once (one 16-byte read per file, about 15 us each from the page cache).
            Then lazily, when the dataset is iterated: a file whose signature is right but whose
            content does not decode (truncated, damaged, unreadable). With ``"raise"`` both
            raise an error that names the file; with ``"skip"`` such files are left out and
            counted: a warning names the files skipped up front, and every pass over the data
            that skips files prints their count to stderr. With ``"skip"`` the dataset's
            cardinality is unknown (a file that fails to decode is only found when read).

    Returns:
        A dataset of ``(image, label)`` (or ``image``), image float32 in 0..255 with shape
        ``(height, width, channels)``.

    Raises:
        TypeError: If `source` is neither a path nor a list of paths.
        ValueError: If the folder does not exist or holds no images, an option is invalid, the
            classes do not match `class_names`, or (``on_error="raise"``) a file is not an image
            (the message names it).
        tf.errors.InvalidArgumentError: When iterating, with ``on_error="raise"``, for a file
            that does not decode; the message names it. (A file deleted or made unreadable
            after this call raises TensorFlow's own error, e.g. NotFoundError, which names it.)

    Example:
    >>> ds = tfpar.data.read_images("/data/flowers", image_size=(64, 64))
    >>> ds.element_spec[0].shape
    TensorShape([64, 64, 3])
    """
    if color_mode not in COLOR_MODES:
        raise ValueError(
            f"Expected color_mode to be one of {list(COLOR_MODES)}. "
            f"Received: color_mode={color_mode!r}"
        )
    if label_mode not in LABEL_MODES:
        raise ValueError(
            f"Expected label_mode to be one of {list(LABEL_MODES)}. "
            f"Received: label_mode={label_mode!r}"
        )
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"Expected interpolation to be one of {list(INTERPOLATIONS)}. "
            f"Received: interpolation={interpolation!r}"
        )
    if on_error not in ON_ERROR:
        raise ValueError(
            f"Expected on_error to be one of {list(ON_ERROR)}. Received: on_error={on_error!r}"
        )
    size = _check_image_size(image_size)
    paths, labels, names = _index_images(source, class_names)
    paths, labels = _check_image_files(paths, labels, on_error)
    channels = COLOR_MODES[color_mode]
    num_classes = len(names)

    def decode(path, label, index):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        if size is None:
            image = tf.cast(image, tf.float32)
        else:
            image = tf.image.resize(image, size, method=interpolation)
            image.set_shape((*size, channels))
        if label_mode is None:
            return index, image
        if label_mode == "categorical":
            return index, (image, tf.one_hot(label, num_classes, dtype=tf.float32))
        return index, (image, label)

    label_of = dict(zip(paths, labels))

    def build(files: Sequence[str]) -> tf.data.Dataset:
        chosen = list(files)
        slices = (
            chosen,
            np.array([label_of[f] for f in chosen], np.int32),
            np.arange(len(chosen), dtype=np.int64),
        )
        dataset = tf.data.Dataset.from_tensor_slices(slices)
        dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _guard_decoding(dataset, chosen, on_error)

    dataset = build(paths)
    _FILE_SOURCES[dataset] = FileSource(tuple(paths), build)
    return dataset


@dataclasses.dataclass(frozen=True)
class FileSource:
    """How a reader's dataset can be rebuilt from a subset of its files (for FILE sharding).

    Attributes:
        files: All files, in reading order.
        build: Returns the same kind of dataset reading only the given files, in the given order.
    """

    files: tuple[str, ...]
    build: Callable[[Sequence[str]], tf.data.Dataset]


def file_source(dataset: tf.data.Dataset) -> FileSource | None:
    """The :class:`FileSource` of a dataset returned (unchanged) by a tfpar reader, else None.

    Example:
    >>> ds = tfpar.data.read_images("/data/flowers")
    >>> len(tfpar.data.readers.file_source(ds).files)
    3670
    >>> tfpar.data.readers.file_source(ds.map(lambda x, y: (x / 255, y))) is None
    True
    """
    return _FILE_SOURCES.get(dataset)


def image_class_names(source: str | Sequence[str]) -> list[str]:
    """Returns the class names :func:`read_images` would use for `source`.

    Example:
    >>> tfpar.data.image_class_names("/data/flowers")
    ['daisy', 'roses', 'tulips']
    """
    return _index_images(source, None)[2]


def read_tfrecords(
    files: str | Sequence[str],
    *,
    features: Mapping[str, Any] | Literal["infer"] | None = None,
    parse_fn: Callable[[tf.Tensor], Any] | None = None,
    compression_type: str | None = None,
) -> tf.data.Dataset:
    """Reads TFRecord files given by glob(s) or paths, in sorted order, files interleaved.

    Args:
        files: A glob such as ``"/data/train-*.tfrecord"``, a path, or a list of them.
        features: How to parse ``tf.train.Example`` records: a mapping for
            ``tf.io.parse_single_example`` (``{"x": tf.io.FixedLenFeature([64], tf.float32)}``),
            ``"infer"`` to build it from the first record (shapes written by
            :func:`write_tfrecords` are restored), or None.
        parse_fn: Instead of `features`, a function from one serialized record to an element.
        compression_type: None / ``""``, ``"ZLIB"`` or ``"GZIP"``.

    Returns:
        Parsed elements (a dict of tensors with `features`), or raw serialized records.

    Raises:
        TypeError: If `files` is not a string or a list of strings, or `parse_fn` is not callable.
        ValueError: If nothing matches, a file does not start with a TFRecord header (or the
            GZIP/ZLIB header of `compression_type`; the message names the file), both
            `features` and `parse_fn` are given, or an option is invalid.

    Example:
    >>> ds = tfpar.data.read_tfrecords("/data/train-*.tfrecord", features="infer")
    """
    if features is not None and parse_fn is not None:
        raise ValueError(
            "Pass either `features` or `parse_fn`, not both. "
            f"Received: features={features!r}, parse_fn={parse_fn!r}"
        )
    if parse_fn is not None and not callable(parse_fn):
        raise TypeError(f"Expected `parse_fn` to be callable. Received: parse_fn={parse_fn!r}")
    if features is not None and features != "infer" and not isinstance(features, Mapping):
        raise TypeError(
            "Expected `features` to be a mapping of name -> tf.io.FixedLenFeature/VarLenFeature, "
            f"'infer' or None. Received: features={features!r}"
        )
    if compression_type not in COMPRESSION_TYPES:
        raise ValueError(
            f"Expected compression_type to be one of {list(COMPRESSION_TYPES)}. "
            f"Received: compression_type={compression_type!r}"
        )
    paths = expand_files(files)
    # One 12-byte read per local file; remote files (gs://, s3://, hdfs://) cost a round trip
    # each, so only the first is checked there.
    for path in paths if all(_is_local(p) for p in paths) else paths[:1]:
        _check_tfrecord_file(path, compression_type)
    if features == "infer":
        features = infer_features(paths[0], compression_type=compression_type)
    compression = compression_type or ""

    def read_one(path):
        return tf.data.TFRecordDataset(path, compression_type=compression)

    records = tf.data.Dataset.from_tensor_slices(paths).interleave(
        read_one,
        cycle_length=min(len(paths), CYCLE_LENGTH),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if features is not None:
        spec = dict(features)
        return records.map(
            lambda record: tf.io.parse_single_example(record, spec),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    if parse_fn is not None:
        return records.map(parse_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return records


def expand_files(files: str | Sequence[str]) -> list[str]:
    """Expands globs and paths into a sorted list of distinct existing files.

    Raises:
        TypeError: If `files` is not a string or a sequence of strings.
        ValueError: If nothing matches.

    Example:
    >>> tfpar.data.readers.expand_files("/data/train-*.tfrecord")
    ['/data/train-0.tfrecord', '/data/train-1.tfrecord']
    """
    patterns = [files] if isinstance(files, (str, os.PathLike)) else files
    if not isinstance(patterns, Sequence) or not all(
        isinstance(p, (str, os.PathLike)) for p in patterns
    ):
        raise TypeError(
            "Expected a glob, a path, or a list of them. "
            f"Received: files={files!r} (of type {type(files).__name__})"
        )
    found: set[str] = set()
    for pattern in patterns:
        found.update(p for p in tf.io.gfile.glob(os.fspath(pattern)) if not tf.io.gfile.isdir(p))
    if not found:
        raise ValueError(
            f"No files match {files!r}. Check the path and the glob (e.g. '/data/train-*.tfrecord')."
        )
    return sorted(found)


def infer_features(path: str, *, compression_type: str | None = None) -> dict[str, Any]:
    """Builds a ``tf.io.parse_single_example`` spec from the first record of a TFRecord file.

    Each feature becomes a ``FixedLenFeature`` of its length in that record (float32, int64 or
    string); a shape written by :func:`write_tfrecords` (feature ``_shape/<name>``) is restored.

    Raises:
        ValueError: If the file is not a TFRecord file, is empty, or its first record is not a
            ``tf.train.Example`` (the message names the file).

    Example:
    >>> tfpar.data.readers.infer_features("/data/digits-00000-of-00004.tfrecord")
    {'x': FixedLenFeature(shape=[8, 8, 1], dtype=tf.float32, default_value=None), ...}
    """
    _check_tfrecord_file(path, compression_type)
    records = tf.data.TFRecordDataset(path, compression_type=compression_type or "")
    try:
        first = next(iter(records.take(1)), None)
    except tf.errors.DataLossError as error:
        raise ValueError(
            f"Cannot read the first record of {path!r}: {error.message}. Expected a TFRecord file "
            "(as tfpar.data.write_tfrecords or tf.io.TFRecordWriter writes). Received: "
            f"path={path!r}, compression_type={compression_type!r}"
        ) from None
    if first is None:
        raise ValueError(
            f"Cannot infer features from {path!r}: it is an empty TFRecord file (no records). "
            "Expected a file with at least one tf.train.Example; pass features= or parse_fn= to "
            f"read empty files. Received: path={path!r}"
        )
    example = tf.train.Example()
    try:
        example.ParseFromString(first.numpy())
    except Exception as error:  # protobuf raises its own DecodeError
        raise ValueError(
            f"The first record of {path!r} is not a tf.train.Example, so its features cannot be "
            "inferred. Pass features= or parse_fn= to tfpar.data.read_tfrecords."
        ) from error
    spec: dict[str, Any] = {}
    found = example.features.feature
    for name in sorted(found):
        if name.startswith(_SHAPE_PREFIX):
            continue
        feature = found[name]
        kind = feature.WhichOneof("kind")
        if kind is None:
            raise ValueError(f"Feature {name!r} of {path!r} has no value; cannot infer its type.")
        values = getattr(feature, kind).value
        dtype = {"float_list": tf.float32, "int64_list": tf.int64, "bytes_list": tf.string}[kind]
        shape = [len(values)]
        if _SHAPE_PREFIX + name in found:
            shape = list(found[_SHAPE_PREFIX + name].int64_list.value)
        spec[name] = tf.io.FixedLenFeature(shape, dtype)
    if not spec:
        raise ValueError(f"The first record of {path!r} has no features to infer.")
    return spec


def write_tfrecords(
    arrays: Mapping[str, np.ndarray],
    directory: str,
    *,
    num_files: int,
    prefix: str = "data",
    compression_type: str | None = None,
) -> list[str]:
    """Writes arrays as ``tf.train.Example`` records into `num_files` TFRecord files.

    Row ``i`` of every array goes to file ``i % num_files``, so each file holds an even spread of
    the data (every class, if the rows were sorted by class). Read them back with
    ``tfpar.data.read_tfrecords(paths, features="infer")``.

    Args:
        arrays: Same-length arrays by feature name, e.g. ``{"x": images, "y": labels}``. Floats are
            stored as float32, integers and bools as int64, strings/bytes as bytes.
        directory: Folder to write into (created if missing).
        num_files: Number of files, at most the number of rows.
        prefix: File name prefix: ``<prefix>-00000-of-00004.tfrecord``.
        compression_type: None / ``""``, ``"ZLIB"`` or ``"GZIP"``.

    Returns:
        The paths written, in order.

    Raises:
        TypeError: If `arrays` is not a mapping of arrays or `num_files` is not an int.
        ValueError: If the arrays are empty or differ in length, or `num_files` is out of range.

    Example:
    >>> images, labels = tfpar.datasets.load_digits()
    >>> paths = tfpar.data.write_tfrecords({"x": images, "y": labels}, "/tmp/digits", num_files=8)
    """
    columns = _check_arrays(arrays)
    rows = len(next(iter(columns.values())))
    check_int("num_files", num_files)
    if not 1 <= num_files <= rows:
        raise ValueError(
            f"Expected 1 <= num_files <= {rows} (the number of rows). Received: num_files={num_files}"
        )
    if compression_type not in COMPRESSION_TYPES:
        raise ValueError(
            f"Expected compression_type to be one of {list(COMPRESSION_TYPES)}. "
            f"Received: compression_type={compression_type!r}"
        )
    tf.io.gfile.makedirs(directory)
    paths = [
        os.path.join(directory, f"{prefix}-{k:05d}-of-{num_files:05d}.tfrecord")
        for k in range(num_files)
    ]
    options = tf.io.TFRecordOptions(compression_type=compression_type or "")
    writers = [tf.io.TFRecordWriter(p, options=options) for p in paths]
    try:
        for i in range(rows):
            writers[i % num_files].write(_example(columns, i))
    finally:
        for writer in writers:
            writer.close()
    return paths


def from_numpy(
    x: np.ndarray | Mapping[str, np.ndarray],
    y: np.ndarray | Mapping[str, np.ndarray] | None = None,
    *,
    sample_weight: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Slices in-memory arrays into a dataset of ``x``, ``(x, y)`` or ``(x, y, sample_weight)``.

    In-memory data has no files, so it is DATA-sharded. Arrays are embedded in the dataset's graph;
    for data larger than about 1 GB write TFRecords with :func:`write_tfrecords` instead.

    Raises:
        TypeError: If an argument is not an array (or a mapping of arrays for `x` / `y`).
        ValueError: If the arrays are empty or differ in length.

    Example:
    >>> images, labels = tfpar.datasets.load_digits()
    >>> ds = tfpar.data.from_numpy(images, labels)
    """
    parts: list[Any] = [x] + ([y] if y is not None else [])
    if sample_weight is not None:
        if y is None:
            raise ValueError("`sample_weight` needs `y`. Received: y=None with sample_weight given.")
        parts.append(sample_weight)
    names = ["x", "y", "sample_weight"]
    lengths = {}
    for name, part in zip(names, parts):
        columns = part if isinstance(part, Mapping) else {name: part}
        for key, column in columns.items():
            if not isinstance(column, (np.ndarray, list, tuple)) and not tf.is_tensor(column):
                raise TypeError(
                    f"Expected `{name}` to be an array or a mapping of arrays. "
                    f"Received: {name}={type(column).__name__}"
                )
            lengths[key if isinstance(part, Mapping) else name] = len(column)
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(
            f"Expected non-empty arrays of one length. Received lengths: {lengths}"
        )
    elements = parts[0] if len(parts) == 1 else tuple(parts)
    return tf.data.Dataset.from_tensor_slices(elements)


def read_numpy(path: str, *, x_key: str = "x", y_key: str | None = "y") -> tf.data.Dataset:
    """Reads a ``.npy`` file (``x`` only) or a ``.npz`` archive (``x`` and, if present, ``y``).

    Raises:
        TypeError: If `path` is not a path.
        ValueError: If the file does not exist, is not a .npy/.npz file (by name and by its first
            bytes), is damaged, holds pickled object arrays, or lacks `x_key`; the message names
            the path.

    Example:
    >>> ds = tfpar.data.read_numpy("/data/train.npz")
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected a path. Received: path={path!r} (of type {type(path).__name__})")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Expected an existing .npy or .npz file. Received: path={path!r} (not found)")
    if not path.endswith((".npy", ".npz")):
        raise ValueError(f"Expected a path ending in .npy or .npz. Received: path={path!r}")
    _check_numpy_file(path)
    try:
        if path.endswith(".npy"):
            return from_numpy(np.load(path))
        with np.load(path) as archive:
            if x_key not in archive:
                raise ValueError(
                    f"Expected array {x_key!r} in {path!r}; it holds {sorted(archive.files)}. "
                    f"Pass x_key=. Received: x_key={x_key!r}"
                )
            x = archive[x_key]
            y = archive[y_key] if y_key is not None and y_key in archive else None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"Cannot read {path!r} as a numpy file: {error}. The file may be truncated or damaged. "
            f"Received: path={path!r}"
        ) from error
    except ValueError as error:
        if "pickle" not in str(error):
            raise
        raise ValueError(
            f"{path!r} holds object arrays (pickled Python objects), which tfpar does not load: "
            "loading a pickle can run code. Expected numeric, bool or string arrays. If you trust "
            "the file: np.load(path, allow_pickle=True) and pass the arrays to "
            f"tfpar.data.from_numpy. Received: path={path!r}"
        ) from None
    return from_numpy(x, y)


def read(path: str, **options: Any) -> tf.data.Dataset:
    """Reads `path` with the reader that fits it.

    * a folder of class sub-folders with images -> :func:`read_images`;
    * a ``.npy`` / ``.npz`` file -> :func:`read_numpy`;
    * a folder of ``*.tfrecord`` files, a TFRecord file or a glob -> :func:`read_tfrecords` with
      ``features="infer"`` unless `options` say otherwise.

    Args:
        path: The path or glob.
        **options: Passed to the chosen reader.

    Raises:
        TypeError: If `path` is not a path.
        ValueError: If nothing readable is found (see :func:`source_kind`; the message names the
            path and what was expected), or the chosen reader refuses the data.

    Example:
    >>> ds = tfpar.data.read("/data/flowers", image_size=(64, 64))
    """
    kind = source_kind(path, compression_type=options.get("compression_type"))
    path = os.fspath(path)
    if kind == "images":
        return read_images(path, **options)
    if kind == "numpy":
        return read_numpy(path, **options)
    options.setdefault("features", None if "parse_fn" in options else "infer")
    if os.path.isdir(path):
        return read_tfrecords(tf.io.gfile.glob(os.path.join(path, "*.tfrecord*")), **options)
    return read_tfrecords(path, **options)


def source_kind(
    path: str | os.PathLike, *, compression_type: str | None = None
) -> Literal["images", "tfrecords", "numpy"]:
    """Which reader :func:`read` would use for `path`, after checking that it has something to read.

    Cheap and free of TensorFlow ops (it lists folders and reads a few bytes of one file), so it
    can check a ``--data`` argument before TensorFlow initializes:

    * a folder with class sub-folders, at least one of which holds an image file -> ``"images"``;
    * a ``.npy`` / ``.npz`` file whose first bytes are a numpy / zip header -> ``"numpy"``;
    * a folder of ``*.tfrecord*`` files, or a file or glob whose first match starts with a
      TFRecord header (or the GZIP/ZLIB header of `compression_type`) -> ``"tfrecords"``.

    Args:
        path: A folder, file or glob.
        compression_type: The TFRecord compression (None / ``""``, ``"ZLIB"``, ``"GZIP"``).

    Returns:
        ``"images"``, ``"tfrecords"`` or ``"numpy"``.

    Raises:
        TypeError: If `path` is not a path.
        ValueError: If there is nothing readable at `path`: the message names the path, what was
            found and what was expected.

    Example:
    >>> tfpar.data.readers.source_kind("/data/flowers")
    'images'
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected a path. Received: path={path!r} (of type {type(path).__name__})")
    path = os.fspath(path)
    expected = (
        "Expected an image folder (root/<class name>/<image files>, the keras "
        "image_dataset_from_directory layout), TFRecord files, or a .npy/.npz file."
    )
    if os.path.isdir(path):
        subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if subdirs:
            if not any(_has_image(os.path.join(path, d)) for d in subdirs):
                raise ValueError(
                    f"Found class sub-folders {subdirs[:5]} in {path!r} but no image files "
                    f"({', '.join(IMAGE_EXTENSIONS)}) in them. {expected} Received: path={path!r}"
                )
            return "images"
        if tf.io.gfile.glob(os.path.join(path, "*.tfrecord*")):
            return "tfrecords"
        raise ValueError(
            f"Found neither class sub-folders of images nor *.tfrecord files in {path!r}. "
            f"{expected} Received: path={path!r}"
        )
    if path.endswith((".npy", ".npz")):
        if not os.path.isfile(path):
            raise ValueError(f"Expected an existing .npy or .npz file. Received: path={path!r} (not found)")
        _check_numpy_file(path)
        return "numpy"
    if compression_type not in COMPRESSION_TYPES:
        raise ValueError(
            f"Expected compression_type to be one of {list(COMPRESSION_TYPES)}. "
            f"Received: compression_type={compression_type!r}"
        )
    files = sorted(p for p in tf.io.gfile.glob(path) if not tf.io.gfile.isdir(p))
    if not files:
        raise ValueError(f"Nothing matches {path!r}. {expected} Received: path={path!r} (not found)")
    _check_tfrecord_file(files[0], compression_type, expected=expected)
    return "tfrecords"


# === internals ===


def _is_local(path: str) -> bool:
    return "://" not in path


def _has_image(folder: str) -> bool:
    """Whether `folder` holds an image file at any depth (stops at the first one)."""
    return any(_is_image(f) for _, _, files in os.walk(folder) for f in files)


def _head(path: str, size: int) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as file:
        return file.read(size)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    """The checksum a TFRecord header stores for its 8 length bytes (TFRecord's masked CRC32C)."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord_problem(path: str, compression_type: str | None) -> str | None:
    """Why `path` cannot be a TFRecord file (from its first 12 bytes), or None if it may be one."""
    try:
        head = _head(path, 12)
    except (OSError, tf.errors.OpError) as error:
        return f"cannot be opened: {getattr(error, 'message', None) or error}"
    if compression_type == "GZIP":
        return None if head[:2] == b"\x1f\x8b" else f"is not GZIP-compressed (it starts with {head!r})"
    if compression_type == "ZLIB":
        zlib_header = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] * 256 + head[1]) % 31 == 0
        return None if zlib_header else f"is not ZLIB-compressed (it starts with {head!r})"
    if not head:
        return None  # an empty TFRecord file: no records
    if head[:2] == b"\x1f\x8b":
        return "is GZIP-compressed: pass compression_type='GZIP'"
    image = _image_format(head)
    if image is not None:
        return (
            f"is a {image} image: for images pass their folder (class sub-folders) or use "
            "tfpar.data.read_images([...])"
        )
    if len(head) < 12 or _masked_crc32c(head[:8]) != struct.unpack("<I", head[8:12])[0]:
        return f"does not start with a TFRecord record header (it starts with {head!r})"
    return None


def _check_tfrecord_file(path: str, compression_type: str | None, *, expected: str = "") -> None:
    problem = _tfrecord_problem(path, compression_type)
    if problem is not None:
        raise ValueError(
            f"{path!r} is not a TFRecord file: it {problem}. "
            f"{expected or 'Expected TFRecord files, as tfpar.data.write_tfrecords or tf.io.TFRecordWriter write them.'} "
            f"Received: path={path!r}"
        )


def _check_numpy_file(path: str) -> None:
    """Raises unless `path` starts like a .npy file (``\\x93NUMPY``) or a .npz (zip) archive."""
    with open(path, "rb") as file:
        head = file.read(8)
    if path.endswith(".npy"):
        ok, kind = head.startswith(b"\x93NUMPY"), "a .npy file (it starts with b'\\x93NUMPY')"
    else:
        ok, kind = head[:4] in (b"PK\x03\x04", b"PK\x05\x06"), "a .npz file (a zip archive, starting with b'PK')"
    if not ok:
        raise ValueError(
            f"{path!r} is not {kind}: it starts with {head!r}"
            f"{' (it is empty)' if not head else ''}. Expected a file written by "
            f"{'np.save' if path.endswith('.npy') else 'np.savez'}. Received: path={path!r}"
        )


def _check_image_size(image_size: object) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        raise ValueError(
            "Expected image_size to be (height, width) with positive ints, or None. "
            f"Received: image_size={image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _image_format(head: bytes) -> str | None:
    """The image format whose signature `head` (a file's first bytes) starts with, or None."""
    for signature, name in _IMAGE_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _image_file_problem(path: str) -> str | None:
    """Why `path` cannot be a readable image (from its first bytes), or None if it may be one."""
    try:
        with open(path, "rb") as file:
            head = file.read(_SIGNATURE_BYTES)
    except OSError as error:
        return f"cannot be opened: {error.strerror or error}"
    if not head:
        return "is empty (0 bytes)"
    if _image_format(head) is None:
        return f"is not a JPEG, PNG, GIF, BMP, WebP or JPEG XL image (it starts with {head!r})"
    return None


def _check_image_files(
    paths: list[str], labels: list[int], on_error: str
) -> tuple[list[str], list[int]]:
    """Checks every file's signature; raises naming bad files, or drops them with a warning."""
    bad = [(p, problem) for p in paths if (problem := _image_file_problem(p)) is not None]
    if not bad:
        return paths, labels
    listed = "; ".join(f"{p!r} {problem}" for p, problem in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    if on_error == "raise":
        raise ValueError(
            f"{len(bad)} of {len(paths)} files are not readable images: {listed}{more}. "
            "Fix: remove or replace them, or pass on_error='skip' to leave such files out."
        )
    dropped = {p for p, _ in bad}
    kept = [(p, label) for p, label in zip(paths, labels) if p not in dropped]
    if not kept:
        raise ValueError(
            f"None of the {len(paths)} files is a readable image: {listed}{more}. Expected JPEG, "
            "PNG, GIF, BMP, WebP or JPEG XL files."
        )
    message = (
        f"tfpar.data.read_images: skipped {len(bad)} of {len(paths)} files that are not "
        f"readable images (on_error='skip'): {listed}{more}"
    )
    warnings.warn(message, stacklevel=3)
    return [p for p, _ in kept], [label for _, label in kept]


def _guard_decoding(dataset: tf.data.Dataset, files: Sequence[str], on_error: str) -> tf.data.Dataset:
    """Names (``"raise"``) or counts (``"skip"``) the files of `dataset` that fail to decode.

    `dataset` yields ``(index, element)``, ``index`` being the file's position in `files`.
    ``ignore_errors`` drops the elements whose reading or decoding failed; ``enumerate`` then
    counts the elements that remain, so at the first dropped file the count falls behind the
    index, and the file at position ``count`` is the one that failed. An end marker (index
    ``len(files)``) after the last element catches failures of the last files and carries the
    number skipped. Returns a dataset of the elements alone.
    """
    count = len(files)
    names = tf.constant(list(files) or [""])
    filler = tf.nest.map_structure(
        lambda spec: tf.zeros([1 if d is None else d for d in spec.shape], spec.dtype),
        dataset.element_spec[1],
    )
    end = tf.data.Dataset.from_tensors((tf.constant(count, tf.int64), filler))
    dataset = dataset.ignore_errors().concatenate(end).enumerate()
    if on_error == "raise":

        def check(position, indexed):
            index, element = indexed

            def fail():
                failed = tf.gather(names, tf.minimum(position, max(count - 1, 0)))
                # A file that cannot be read (deleted, no permission) fails here with
                # TensorFlow's own error (NotFoundError, ...), which names it. The Assert takes
                # the read as data: a control dependency would not order it after the read.
                readable = tf.strings.length(tf.io.read_file(failed)) >= 0
                verdict = tf.debugging.Assert(
                    tf.logical_and(readable, tf.equal(position, index)),
                    [
                        "tfpar.data.read_images: cannot decode the image file",
                        failed,
                        # (no quotes: TensorFlow escapes them in the error message)
                        "(truncated or damaged; tf.io.decode_image(tf.io.read_file(path)) gives "
                        "the reason from TensorFlow). Fix: remove or replace it, or skip such "
                        "files with on_error=skip.",
                    ],
                    summarize=1,
                )
                with tf.control_dependencies([verdict]):
                    return tf.constant(False)

            decoded = tf.cond(tf.equal(position, index), lambda: tf.constant(True), fail)
            with tf.control_dependencies([decoded]):
                return tf.nest.map_structure(tf.identity, element)

        # One sequential map (cheaper than a parallel one for a few small ops). take() stops
        # before the end marker, which is only reached when a file was dropped, and then fails
        # the check; so the cardinality stays exactly len(files).
        dataset = dataset.map(check).take(count)
        return dataset.apply(tf.data.experimental.assert_cardinality(count))

    def report(position, indexed):
        index, element = indexed
        skipped = index - position

        def warn():
            printed = tf.print(
                "tfpar.data.read_images: skipped", skipped, "of", count,
                "image files that could not be read or decoded in this pass (on_error='skip')",
                output_stream=sys.stderr,
            )
            with tf.control_dependencies([printed]):
                return tf.constant(True)

        done = tf.cond(tf.logical_and(tf.equal(index, count), skipped > 0), warn, lambda: tf.constant(True))
        with tf.control_dependencies([done]):
            return tf.identity(index), element

    dataset = dataset.map(report).filter(lambda index, element: index < count)
    return dataset.map(lambda index, element: element)


def _index_images(
    source: str | Sequence[str], class_names: Sequence[str] | None
) -> tuple[list[str], list[int], list[str]]:
    if class_names is not None and (
        isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names)
    ):
        raise TypeError(f"Expected class_names to be a list of strings. Received: {class_names!r}")
    if isinstance(source, (str, os.PathLike)):
        root = os.fspath(source)
        if not os.path.isdir(root):
            raise ValueError(f"Expected an existing directory. Received: source={root!r}")
        folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if class_names is not None and set(class_names) != set(folders):
            raise ValueError(
                f"Expected class_names to match the sub-folders of {root!r}: {folders}. "
                f"Received: class_names={list(class_names)}"
            )
        names = list(class_names) if class_names is not None else folders
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(names):
            found: list[str] = []
            for folder, _, files in os.walk(os.path.join(root, name)):
                found.extend(os.path.join(folder, f) for f in files if _is_image(f))
            paths.extend(sorted(found))
            labels.extend([label] * len(found))
        where = f"the class sub-folders of {root!r}"
    elif isinstance(source, Sequence) and all(isinstance(p, (str, os.PathLike)) for p in source):
        paths = sorted(os.fspath(p) for p in source)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"Expected existing image files. Received missing files: {missing[:5]}")
        parents = [os.path.basename(os.path.dirname(p)) for p in paths]
        names = list(class_names) if class_names is not None else sorted(set(parents))
        unknown = sorted(set(parents) - set(names))
        if unknown:
            raise ValueError(
                f"Every file's parent folder must be one of class_names={names}. Received files "
                f"in unknown classes: {unknown}. Pass the full class_names list."
            )
        not_images = [p for p in paths if not _is_image(p)]
        if not_images:
            raise ValueError(
                f"Expected image files ({', '.join(IMAGE_EXTENSIONS)}). Received: {not_images[:5]}"
            )
        labels = [names.index(p) for p in parents]
        where = "the given list"
    else:
        raise TypeError(
            "Expected a directory path or a list of image file paths. "
            f"Received: source={source!r} (of type {type(source).__name__})"
        )
    if not paths:
        raise ValueError(
            f"Found no images ({', '.join(IMAGE_EXTENSIONS)}) in {where}. Expected "
            "root/<class name>/<image files>, the keras image_dataset_from_directory layout."
        )
    return paths, labels, names


def _check_arrays(arrays: object) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping) or not arrays:
        raise TypeError(
            "Expected a non-empty mapping of feature name -> array, e.g. {'x': x, 'y': y}. "
            f"Received: arrays={type(arrays).__name__}"
        )
    columns = {str(k): np.asarray(v) for k, v in arrays.items()}
    bad = [k for k in columns if k.startswith(_SHAPE_PREFIX)]
    if bad:
        raise ValueError(f"Feature names may not start with {_SHAPE_PREFIX!r}. Received: {bad}")
    lengths = {k: (len(v) if v.ndim else 0) for k, v in columns.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"Expected non-empty arrays of one length. Received lengths: {lengths}")
    for key, column in columns.items():
        if column.dtype.kind not in "fiubSUO":
            raise TypeError(
                f"Expected numeric, bool or string arrays. Received: {key} of dtype {column.dtype}"
            )
    return columns


def _example(columns: dict[str, np.ndarray], row: int) -> bytes:
    feature = {}
    for key, column in columns.items():
        value = column[row]
        flat = np.asarray(value).reshape(-1)
        kind = column.dtype.kind
        if kind == "f":
            feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=flat))
        elif kind in "iub":
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=flat.astype(np.int64)))
        else:
            data = [v if isinstance(v, bytes) else str(v).encode() for v in flat]
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=data))
        shape = np.shape(value)
        if len(shape) != 1:
            feature[_SHAPE_PREFIX + key] = tf.train.Feature(
                int64_list=tf.train.Int64List(value=list(shape))
            )
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
