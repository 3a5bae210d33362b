"""Image folders for :func:`tfpar.data.read_images`: indexing, option checks, on_error handling.

Private to :mod:`tfpar.data`; the public reader is :func:`tfpar.data.readers.read_images`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import tensorflow as tf

from tfpar.data._formats import IMAGE_EXTENSIONS, _image_file_problem, _is_image

ON_ERROR = ("raise", "skip")
COLOR_MODES = {"grayscale": 1, "rgb": 3, "rgba": 4}
LABEL_MODES = ("int", "categorical", None)
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")


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
