"""TFRecord helpers for the readers: file expansion, feature inference, ``tf.train.Example`` encoding.

Private to :mod:`tfpar.data`; :func:`expand_files` and :func:`infer_features` are re-exported by
:mod:`tfpar.data.readers`, where the readers that use them live.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfpar.data._formats import _check_tfrecord_file

_SHAPE_PREFIX = "_shape/"


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
