"""Sharding: split one dataset into disjoint, complete pieces, one per worker.

TensorFlow's own auto-sharding picks FILE or DATA behind the user's back, warns where it is a no-op
(tensorflow/tensorflow#55474, #49048), hangs or fails when a dataset has fewer files than workers
(#35878, #36846), and silently duplicates or drops data when the order differs between workers
(#56513). :func:`shard` decides explicitly, says why in the ``tfpar.data.shard`` log, and refuses
the cases that would go wrong:

* **FILE** (each shard reads its own files; nothing is read twice): used when every file source of
  the dataset has at least ``num_shards`` files and TensorFlow's FILE rewrite can reach the reader.
  The rewrite is TensorFlow's own (``tf.raw_ops.AutoShardDataset``), the one multi-worker
  strategies run; it moves an unseeded shuffle of the file list behind the shard, so
  ``list_files`` works. How files are found is documented in :mod:`tfpar.data._dataset_graph`. Image
  folders read by :func:`tfpar.data.read_images` (which TensorFlow cannot FILE-shard) are rebuilt
  on shard ``index``'s share of the files, ``files[index::num_shards]``.
* **DATA** (every shard reads everything and keeps every ``num_shards``-th element): used otherwise.
  It needs the same element order in every process, so a dataset with an unseeded shuffle, a
  ``deterministic=False`` parallel op or a random filter before the shard is refused, with the fix.

Every dataset this module returns has TensorFlow's auto-shard policy set to OFF, so a
``tf.distribute`` strategy never shards it a second time and never prints its auto-shard warnings.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from typing import Literal

import tensorflow as tf

from tfpar._validation import check_int
from tfpar.data import _dataset_graph, readers

POLICIES = ("auto", "file", "data")
_AUTO_SHARD_FILE = 1  # tf.data.experimental.AutoShardPolicy.FILE

logger = logging.getLogger(__name__)

# Which (num_shards, index) DATA shards were made from each dataset object in this process.
_DATA_SHARDS_MADE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shard(
    dataset: tf.data.Dataset,
    num_shards: int,
    index: int,
    policy: Literal["auto", "file", "data"] = "auto",
) -> tf.data.Dataset:
    """Returns shard `index` of `num_shards` disjoint shards that together hold every element.

    Args:
        dataset: The (unbatched or batched) dataset to shard. Shard before shuffling with a random
            seed, caching or augmenting: :func:`tfpar.data.pipeline` does those after the shard.
        num_shards: How many shards, usually the number of workers (input pipelines).
        index: Which shard to return, ``0 <= index < num_shards``.
        policy: ``"file"`` gives each shard whole files (fails if a file source has fewer files
            than shards), ``"data"`` gives each shard every `num_shards`-th element (needs a
            deterministic order), ``"auto"`` takes FILE when it applies and DATA otherwise.

    Returns:
        The shard, a ``tf.data.Dataset`` with TensorFlow's auto-shard policy set to OFF.

    Raises:
        TypeError: If `dataset` is not a ``tf.data.Dataset`` or a count is not an int.
        ValueError: If `policy` is unknown, `index` is out of range, FILE is asked for but the
            dataset reads fewer files than `num_shards` (or reads no files), DATA is needed but the
            element order is not deterministic, or DATA would leave a shard empty.

    Example:
    >>> files = tfpar.data.write_tfrecords({"x": x, "y": y}, "/tmp/digits", num_files=4)
    >>> ds = tfpar.data.read_tfrecords("/tmp/digits/*.tfrecord", features=features)
    >>> shard0 = tfpar.data.shard(ds, num_shards=2, index=0)   # FILE: files 0 and 2
    """
    sharded, _ = shard_with_policy(dataset, num_shards, index, policy)
    return sharded


def shard_with_policy(
    dataset: tf.data.Dataset,
    num_shards: int,
    index: int,
    policy: Literal["auto", "file", "data"] = "auto",
) -> tuple[tf.data.Dataset, str]:
    """Like :func:`shard`, and also returns the policy used (``"file"``, ``"data"`` or ``"off"``).

    Example:
    >>> from tfpar.data.shard import shard_with_policy  # tfpar.data.shard is the function
    >>> ds, used = shard_with_policy(tf.data.Dataset.range(8), 2, 1)
    >>> used
    'data'
    """
    check_dataset(dataset)
    check_int("num_shards", num_shards, minimum=1)
    check_int("index", index, minimum=0)
    if index >= num_shards:
        raise ValueError(
            f"Expected 0 <= index < num_shards. Received: index={index}, num_shards={num_shards}. "
            f"Valid indices are 0..{num_shards - 1}."
        )
    check_policy(policy)
    num_shards, index = int(num_shards), int(index)
    if num_shards == 1:
        logger.info("tfpar.data.shard: 1 shard, the dataset is returned whole")
        return _without_auto_shard(dataset), "off"
    chosen, why = _choose(dataset, num_shards, policy)
    source = readers.file_source(dataset)
    if chosen == "file" and source is not None:
        sharded = source.build(source.files[index::num_shards])
    elif chosen == "file":
        sharded = _file_shard(dataset, num_shards, index)
    else:
        _warn_shared_shuffle_state(dataset, num_shards, index)
        sharded = dataset.shard(num_shards, index)
    logger.info(
        "tfpar.data.shard: %s sharding, shard %d of %d (%s)", chosen.upper(), index, num_shards, why
    )
    return _without_auto_shard(sharded), chosen


def choose_policy(dataset: tf.data.Dataset, num_shards: int) -> Literal["file", "data"]:
    """Returns the policy :func:`shard` uses with ``policy="auto"``: ``"file"`` or ``"data"``.

    It raises for DATA exactly when :func:`shard` would, so it doubles as a check.

    Args:
        dataset: The dataset to shard.
        num_shards: The number of shards (at least 2 for the answer to matter).

    Raises:
        ValueError: If DATA sharding is needed but the element order is not deterministic.

    Example:
    >>> tfpar.data.choose_policy(tf.data.TFRecordDataset(eight_files), 4)
    'file'
    """
    check_dataset(dataset)
    check_int("num_shards", num_shards, minimum=1)
    chosen, _ = _choose(dataset, num_shards, "auto")
    return chosen  # type: ignore[return-value]


def source_files(dataset: tf.data.Dataset) -> list[str]:
    """Lists the files a dataset reads, as far as TensorFlow's FILE sharding can see them.

    Detected: readers (``TFRecordDataset``, ``TextLineDataset``, ``FixedLengthRecordDataset``, ...)
    reached from the output through element-wise ops, including readers inside
    ``interleave``/``flat_map`` over a file list (``list_files``, ``from_tensor_slices(paths)``,
    :func:`tfpar.data.read_tfrecords`), and datasets exactly as :func:`tfpar.data.read_images`
    returned them. Not detected (an empty list): in-memory sources, and files read by
    ``tf.io.read_file`` inside a ``map`` of your own (or after a ``map`` on ``read_images``).

    Returns:
        Sorted file names; empty if the dataset reads no files tfpar can see.

    Example:
    >>> tfpar.data.source_files(tfpar.data.read_tfrecords("/data/train-*.tfrecord"))
    ['/data/train-0.tfrecord', '/data/train-1.tfrecord']
    """
    check_dataset(dataset)
    return list(_inspect(dataset).files)


def set_auto_shard_policy(dataset: tf.data.Dataset, num_workers: int) -> tf.data.Dataset:
    """Sets TensorFlow's auto-shard policy explicitly, for a strategy that shards by itself.

    For datasets handed to ``model.fit`` under a strategy (which calls
    ``strategy.experimental_distribute_dataset``): one worker gets OFF (sharding is a no-op, so
    TensorFlow's "AUTO sharding policy will apply DATA" warnings never print); several workers get
    FILE or DATA exactly as :func:`choose_policy` decides, with the same refusals. A policy already
    set on the dataset (not AUTO) is kept.

    Args:
        dataset: The dataset to be distributed.
        num_workers: Number of workers (input pipelines) of the strategy.

    Returns:
        The dataset with ``options().experimental_distribute.auto_shard_policy`` set.

    Example:
    >>> ds = tfpar.data.set_auto_shard_policy(tf.data.Dataset.range(8), num_workers=1)
    >>> ds.options().experimental_distribute.auto_shard_policy
    <AutoShardPolicy.OFF: -1>
    """
    check_dataset(dataset)
    check_int("num_workers", num_workers, minimum=1)
    current = dataset.options().experimental_distribute.auto_shard_policy
    if current != tf.data.experimental.AutoShardPolicy.AUTO:
        return dataset
    if num_workers == 1:
        return _without_auto_shard(dataset)
    # TensorFlow shards this dataset itself, so only what its FILE rewrite can do counts.
    try:
        chosen, why = _choose(dataset, num_workers, "auto", tensorflow_rewrite=True)
    except ValueError as error:
        raise ValueError(
            f"{error} This dataset's auto-shard policy was left at AUTO, so TensorFlow would "
            f"shard it for {num_workers} workers by DATA, which needs that order. Alternatives: "
            "shard it yourself (tfpar.data.shard) or, if every worker should train on its whole "
            "input, set options = tf.data.Options(); options.experimental_distribute."
            "auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF; dataset = "
            "dataset.with_options(options)."
        ) from None
    logger.info("tfpar.data.shard: auto-shard policy %s for %d workers (%s)", chosen.upper(),
                num_workers, why)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.FILE
        if chosen == "file"
        else tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def check_deterministic(dataset: tf.data.Dataset, purpose: str) -> None:
    """Raises if the dataset's element order can differ between iterations or processes.

    Args:
        dataset: The dataset.
        purpose: What needs the order, used in the message (e.g. ``"DATA sharding"``).

    Raises:
        ValueError: Naming each problem found and how to fix it.

    Example:
    >>> tfpar.data.check_deterministic(tf.data.Dataset.range(9).shuffle(9), "DATA sharding")
    Traceback (most recent call last):
    ValueError: DATA sharding needs the same element order in every process and every epoch, ...
    """
    problems, unverifiable = _dataset_graph.find_nondeterminism(dataset)
    if problems:
        hint = (
            " tf.data.Dataset.list_files shuffles without a seed unless given shuffle=False or "
            "seed=."
            if any("shuffle" in p for p in problems)
            else ""
        )
        raise ValueError(
            f"{purpose} needs the same element order in every process and every epoch, but this "
            f"dataset's order is random: {'; '.join(problems)}. Fix: pass seed= to shuffle / "
            "sample_from_datasets, use deterministic=True for parallel map/interleave/batch, or "
            "shard/split before shuffling (tfpar.data.pipeline shuffles after the shard)."
            f"{hint} Received: dataset={dataset.element_spec}"
        )
    if unverifiable:
        warnings.warn(
            f"tfpar could not verify that the element order is deterministic, which {purpose} "
            f"needs: {'; '.join(unverifiable)}. tfpar proceeds; give every random op a fixed "
            "seed, or shard before shuffling.",
            stacklevel=3,
        )


# === argument checks, shared by the tfpar.data modules ===


def check_dataset(dataset: object) -> None:
    """Raises TypeError unless `dataset` is a ``tf.data.Dataset`` (shared argument check)."""
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            "Expected a tf.data.Dataset (for numpy arrays use tfpar.data.from_numpy). "
            f"Received: dataset={dataset!r} (of type {type(dataset).__name__})"
        )


def check_policy(policy: object) -> None:
    """Raises ValueError unless `policy` is one of :data:`POLICIES` (shared argument check)."""
    if policy not in POLICIES:
        raise ValueError(
            f"Expected policy to be one of {list(POLICIES)}. Received: policy={policy!r}"
        )


# === internals ===


def _inspect(dataset: tf.data.Dataset, tensorflow_rewrite: bool = False) -> _dataset_graph.FileInfo:
    source = None if tensorflow_rewrite else readers.file_source(dataset)
    if source is not None:
        return _dataset_graph.FileInfo(tuple(sorted(source.files)), (len(source.files),), True, "")
    return _dataset_graph.inspect_files(dataset)


def _choose(
    dataset: tf.data.Dataset, num_shards: int, policy: str, tensorflow_rewrite: bool = False
) -> tuple[str, str]:
    info = _inspect(dataset, tensorflow_rewrite)
    if policy == "file":
        _require_file_shardable(info, num_shards)
        return "file", f"{info.num_files} files >= {num_shards} shards"
    if policy == "auto" and info.shardable and not info.memory_cache:
        if info.num_files >= num_shards:
            return "file", f"{info.num_files} files >= {num_shards} shards"
        why = f"only {info.num_files} files for {num_shards} shards"
    elif policy == "auto" and info.shardable:
        why = "an in-memory cache() comes before the shard"
    elif policy == "auto":
        why = f"no file sharding: {info.reason}"
    else:
        why = "policy='data'"
    check_deterministic(dataset, "DATA sharding")
    cardinality = int(dataset.cardinality())
    if 0 <= cardinality < num_shards:
        raise ValueError(
            f"DATA sharding of a dataset with {cardinality} elements into num_shards={num_shards} "
            f"would leave {num_shards - cardinality} shard(s) empty (an empty worker hangs "
            "multi-worker training). Fix: use fewer shards, or more data. "
            f"Received: num_shards={num_shards}"
        )
    return "data", why


def _require_file_shardable(info: _dataset_graph.FileInfo, num_shards: int) -> None:
    if not info.shardable:
        raise ValueError(
            "policy='file' needs a dataset that reads files through a TensorFlow reader "
            f"(TFRecordDataset, TextLineDataset, ...), but {info.reason}. Fix: use policy='data' "
            "(every shard reads everything and keeps 1/num_shards of it) or policy='auto', or "
            "build the dataset with tfpar.data.read_tfrecords, or shard the dataset exactly as "
            "tfpar.data.read_images returned it (before any map). "
            f"Received: policy='file', num_shards={num_shards}"
        )
    if info.num_files < num_shards:
        listed = ", ".join(os.path.basename(f) for f in info.files[:8])
        listed += ", ..." if len(info.files) > 8 else ""
        raise ValueError(
            f"policy='file' needs at least as many files as shards, but the dataset reads "
            f"{info.num_files} file(s) ({listed}) for num_shards={num_shards}; TensorFlow would "
            f"leave {num_shards - info.num_files} worker(s) without data and fail or hang "
            "(tensorflow/tensorflow#35878, #36846). Fix: write the data into at least "
            f"{num_shards} files (tfpar.data.write_tfrecords(..., num_files={num_shards})), or use "
            "policy='data' (each worker reads every file and keeps 1/num_shards of the records) "
            f"or policy='auto'. Received: policy='file', num_shards={num_shards}"
        )
    if info.memory_cache:
        raise ValueError(
            "policy='file' cannot shard a dataset that is cache()d in memory before the shard: "
            "the shards would share one cache and read each other's files. Fix: call "
            "tfpar.data.shard first and cache afterwards (tfpar.data.pipeline does), or use "
            f"policy='data'. Received: policy='file', num_shards={num_shards}"
        )


def _file_shard(dataset: tf.data.Dataset, num_shards: int, index: int) -> tf.data.Dataset:
    specs = tf.nest.flatten(dataset.element_spec)
    if not all(isinstance(s, tf.TensorSpec) for s in specs):
        raise ValueError(
            "policy='file' supports datasets of dense tensors only; this one has "
            f"{[type(s).__name__ for s in specs]}. Fix: use policy='data', or shard before "
            f"producing ragged/sparse elements. Received: dataset={dataset.element_spec}"
        )
    variant = tf.raw_ops.AutoShardDataset(
        input_dataset=tf.data.experimental.to_variant(dataset),
        num_workers=num_shards,
        index=index,
        auto_shard_policy=_AUTO_SHARD_FILE,
        output_types=[s.dtype for s in specs],
        output_shapes=[s.shape for s in specs],
        num_replicas=0,
    )
    return tf.data.experimental.from_variant(variant, dataset.element_spec)


def _warn_shared_shuffle_state(dataset: tf.data.Dataset, num_shards: int, index: int) -> None:
    # A seeded, reshuffling shuffle keeps its random state in the dataset object. Separate
    # workers each build their own object, so epoch k has the same order everywhere; shards of
    # one object iterated in one process advance one state and no longer partition the data.
    taken = _DATA_SHARDS_MADE.setdefault(dataset, set())
    others = {i for n, i in taken if n == num_shards and i != index}
    taken.add((num_shards, index))
    if others and _dataset_graph.reshuffles(dataset):
        warnings.warn(
            f"Shard {index} and shard(s) {sorted(others)} of {num_shards} come from the same "
            "dataset object, which reshuffles on every iteration: in one process they share that "
            "shuffle's random state, so iterating one shard changes the order the next one sees "
            "and the shards overlap. tfpar shards it anyway; build the dataset once per shard (as "
            "separate workers do), or shuffle with reshuffle_each_iteration=False, or shard "
            "before shuffling.",
            stacklevel=4,
        )


def _without_auto_shard(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)
