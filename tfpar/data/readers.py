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

The public readers live here; their private parts are in :mod:`tfpar.data._formats` (header
sniffing), :mod:`tfpar.data._images` (image indexing, decoding errors) and
:mod:`tfpar.data._tfrecords` (file expansion, feature inference, ``tf.train.Example`` encoding).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from tfpar._validation import check_int
from tfpar.data._formats import (
    COMPRESSION_TYPES,
    IMAGE_EXTENSIONS,
    _check_numpy_file,
    _check_tfrecord_file,
    _has_image,
    _is_local,
)
from tfpar.data._images import (
    COLOR_MODES,
    INTERPOLATIONS,
    LABEL_MODES,
    ON_ERROR,
    _check_image_files,
    _check_image_size,
    _guard_decoding,
    _index_images,
)
from tfpar.data._tfrecords import _check_arrays, _example, expand_files, infer_features

# Files read concurrently. Fixed (not AUTOTUNE, which follows each machine's core count) so the
# element order is the same on every worker.
CYCLE_LENGTH = 8
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
