"""Input pipelines: the tf.data performance guide done right by default, on one device or many.

:func:`pipeline` puts the steps in the order the tf.data performance guide
(https://www.tensorflow.org/guide/data_performance) and the usual mistakes call for::

    map_fn (parallel, deterministic)      decode / parse: the same work every epoch
    cache (memory or file)                so later epochs read no files and decode nothing
    shuffle (seeded if asked)             after the cache, so every epoch has a new order
    augment_fn (parallel)                 random augmentation after the cache, never frozen in it;
                                          once per batch (tf.vectorized_map) when that is exact
    batch                                 by the global size, or per replica under distribute()
    prefetch (AUTOTUNE)                   overlap input with the training step

Reading files in parallel (``interleave`` with AUTOTUNE) is done by :mod:`tfpar.data.readers`.

:func:`distribute` feeds a ``tf.distribute.Strategy`` through
``strategy.distribute_datasets_from_function``: every input pipeline (one per worker) shards the
data with :func:`tfpar.data.shard` by its ``InputContext``, runs :func:`pipeline`, and batches by
``global_batch_size // num_replicas_in_sync``. With ``drop_remainder=True`` (the default) every step
is a full global batch: Keras 3 under MirroredStrategy computes wrong gradients when a final partial
batch does not split evenly over the replicas.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

import tensorflow as tf

from tfpar._validation import check_int
from tfpar.data import _dataset_graph

# The package re-exports a *function* named `shard`, which shadows the submodule attribute.
shard_lib = importlib.import_module("tfpar.data.shard")

logger = logging.getLogger(__name__)

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]
_DISTRIBUTE_BATCHES = (
    "tfpar.data.distribute batches them itself, by global_batch_size // num_replicas_in_sync"
)


def pipeline(
    dataset: tf.data.Dataset,
    *,
    batch_size: int | None = None,
    map_fn: Callable[..., Any] | None = None,
    augment_fn: Callable[..., Any] | None = None,
    cache: bool | str = True,
    shuffle: int | None = None,
    seed: int | None = None,
    drop_remainder: bool = False,
    deterministic: bool = False,
) -> tf.data.Dataset:
    """Builds a fast input pipeline: map, cache, shuffle, augment, batch, prefetch.

    Args:
        dataset: Unbatched examples, e.g. from :func:`tfpar.data.read_images` or a shard of it.
            With ``batch_size=None`` it may be batched already (the pipeline then caches,
            shuffles and prefetches your batches).
        batch_size: Examples per batch, or None to leave the examples unbatched.
        map_fn: Deterministic per-example preprocessing (decode, parse, resize), run in parallel
            before the cache, so it runs once.
        augment_fn: Random per-example augmentation, run in parallel after the cache and the
            shuffle, so every epoch sees new augmentations. If it takes a ``seed`` keyword
            argument, tfpar passes every example its own seed for stateless random ops
            (``tf.image.stateless_random_*``; a shape-[2] int64 tensor), new every epoch and
            reproducible from `seed`. Prefer that when a global seed is set
            (``keras.utils.set_random_seed``): TensorFlow can then restart *stateful* random
            ops (``tf.image.random_*``) from the same seed every epoch, replaying the same draws.
            Without a ``seed`` argument and with a `batch_size`, it runs once per batch through
            ``tf.vectorized_map`` when that is exactly the per-example map (fixed shapes, no
            captured variables, every op vectorizable): ~40% less CPU per cached epoch.
        cache: True or ``"memory"`` caches in memory, a path string caches to files with that
            prefix, False caches nothing. The first epoch fills the cache; later epochs read
            neither files nor ``map_fn``.
        shuffle: Shuffle buffer size (examples), or None for no shuffle. Reshuffles every epoch.
        seed: Seed for the shuffle and for the per-example seeds of a seeded `augment_fn`.
            Required when ``deterministic=True`` and shuffling.
        drop_remainder: Whether to drop a final batch smaller than `batch_size`.
        deterministic: True keeps the output order fixed run to run (for tests and DATA sharding
            downstream); False lets parallel steps after the cache emit elements as they finish.

    Returns:
        The pipeline, a ``tf.data.Dataset``.

    Raises:
        TypeError: If an argument has the wrong type (e.g. `map_fn` not callable).
        ValueError: If `batch_size` / `shuffle` are not positive, the dataset is infinite and
            cached, ``deterministic=True`` shuffles without a seed, or a `batch_size` is given for
            a dataset that is already batched (as :func:`distribute` refuses it).

    Example:
    >>> ds = tfpar.data.read_images("/data/flowers", image_size=(64, 64))
    >>> ds = tfpar.data.pipeline(ds, batch_size=32, shuffle=1000, seed=0,
    ...                          augment_fn=lambda x, y: (tf.image.random_flip_left_right(x), y))
    """
    shard_lib.check_dataset(dataset)
    _check_options(batch_size, map_fn, augment_fn, cache, shuffle, seed, drop_remainder,
                   deterministic)
    if batch_size is not None:
        _check_unbatched(dataset, f"tfpar.data.pipeline(batch_size={batch_size}) batches them "
                                  "itself, so batched input would become batches of batches",
                         keep="or pass batch_size=None to keep your batches")
    if cache is not False and int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "Cannot cache an infinite dataset (the cache would never be complete). Fix: call "
            "tfpar.data.pipeline before .repeat(), or pass cache=False. Received: an infinite "
            "dataset with cache=" + repr(cache)
        )
    return _build(dataset, batch_size, None, map_fn, augment_fn, cache, shuffle, seed,
                  drop_remainder, deterministic, augment_seed=seed)


def distribute(
    strategy: tf.distribute.Strategy,
    data: tf.data.Dataset | DatasetFn,
    global_batch_size: int,
    *,
    policy: Literal["auto", "file", "data"] = "auto",
    map_fn: Callable[..., Any] | None = None,
    augment_fn: Callable[..., Any] | None = None,
    cache: bool | str = True,
    shuffle: int | None = None,
    seed: int | None = None,
    drop_remainder: bool = True,
    deterministic: bool = False,
) -> tf.distribute.DistributedDataset:
    """Gives every replica of a strategy its own data, batched per replica.

    Each input pipeline (one per worker) builds its dataset from an
    ``tf.distribute.InputContext``: a `data` dataset is sharded with
    ``tfpar.data.shard(data, ctx.num_input_pipelines, ctx.input_pipeline_id, policy)``; a `data`
    function is called with the context and must return that pipeline's (unbatched) examples.
    Then :func:`pipeline` runs with the per-replica batch size, ``global_batch_size //
    strategy.num_replicas_in_sync``. TensorFlow's auto-sharding is switched off explicitly (tfpar
    already sharded), so its auto-shard warnings never print.

    With ``drop_remainder=True`` every step is a full global batch: a pipeline that serves several
    replicas drops the examples that would not fill one batch for each of them, and DATA-sharded
    pipelines of known size are trimmed to the same length (at most ``num_input_pipelines - 1``
    examples), so no worker runs out of data before the others. FILE-sharded pipelines may still
    differ in length when the files do; TensorFlow then ends the epoch when the first worker runs
    out of data.

    Keras does not know the number of steps of a distributed dataset before its first epoch ends,
    so ``model.fit`` prints "Your input ran out of data" once at the end of the first epoch; it is
    harmless: the following epochs run in full.

    Args:
        strategy: The ``tf.distribute.Strategy`` (e.g. from ``tfpar.get_strategy``).
        data: Unbatched examples, or a function ``InputContext -> tf.data.Dataset`` of unbatched
            examples for that input pipeline.
        global_batch_size: Examples per step over all replicas; must divide evenly by the number
            of replicas.
        policy: Sharding policy for a `data` dataset: ``"auto"``, ``"file"`` or ``"data"``.
        map_fn, augment_fn, cache, shuffle, seed, deterministic: As in :func:`pipeline`. A file
            cache path gets the suffix ``-<pipeline id>`` per input pipeline.
        drop_remainder: Whether every step must be a full global batch (see above).

    Returns:
        A ``tf.distribute.DistributedDataset`` to pass to ``model.fit`` or iterate in a custom loop.

    Raises:
        TypeError: If `strategy` is not a strategy, `data` is neither a dataset nor callable, or
            `global_batch_size` is not an int.
        ValueError: If `global_batch_size` does not divide by the replica count (the message names
            the nearest valid sizes), or any :func:`pipeline` / :func:`tfpar.data.shard` check fails.

    Example:
    >>> with tfpar.scope("mirrored") as strategy:
    ...     model = build_model()
    >>> train = tfpar.data.distribute(strategy, tfpar.data.read_images("/data/flowers"), 64,
    ...                               shuffle=1000, seed=0)
    >>> model.fit(train, epochs=3)
    """
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            "Expected a tf.distribute.Strategy (e.g. tfpar.get_strategy('mirrored')). "
            f"Received: strategy={strategy!r} (of type {type(strategy).__name__})"
        )
    if not isinstance(data, tf.data.Dataset) and not callable(data):
        raise TypeError(
            "Expected `data` to be a tf.data.Dataset or a function InputContext -> Dataset. "
            f"Received: data={data!r} (of type {type(data).__name__})"
        )
    check_int("global_batch_size", global_batch_size, minimum=1)
    shard_lib.check_policy(policy)
    _check_options(None, map_fn, augment_fn, cache, shuffle, seed, drop_remainder, deterministic)
    replicas = strategy.num_replicas_in_sync
    per_replica = per_replica_batch_size(int(global_batch_size), replicas)
    if isinstance(data, tf.data.Dataset):
        _check_unbatched(data, _DISTRIBUTE_BATCHES)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        pipelines = context.num_input_pipelines
        if isinstance(data, tf.data.Dataset):
            local, used = shard_lib.shard_with_policy(data, pipelines, context.input_pipeline_id,
                                                      policy)
            total = int(data.cardinality())
            if used == "data" and drop_remainder and total >= 0:
                local = local.take(total // pipelines)
        else:
            local = data(context)
            if not isinstance(local, tf.data.Dataset):
                raise TypeError(
                    "Expected the dataset function to return a tf.data.Dataset. "
                    f"Received: {local!r} (of type {type(local).__name__})"
                )
            _check_unbatched(local, _DISTRIBUTE_BATCHES)
        file_cache = cache
        if isinstance(cache, str) and cache != "memory":
            file_cache = f"{cache}-{context.input_pipeline_id}"
        replicas_here = max(1, context.num_replicas_in_sync // pipelines)
        logger.info(
            "tfpar.data.distribute: input pipeline %d of %d, %d replica(s) x %d examples",
            context.input_pipeline_id, pipelines, replicas_here, per_replica,
        )
        # Every input pipeline draws its own augmentation seeds (its examples differ).
        augment_seed = None if seed is None else seed + 1_000_003 * context.input_pipeline_id
        return _build(local, per_replica * replicas_here, per_replica, map_fn, augment_fn,
                      file_cache, shuffle, seed, drop_remainder, deterministic, augment_seed)

    return strategy.distribute_datasets_from_function(dataset_fn)


def per_replica_batch_size(global_batch_size: int, num_replicas: int) -> int:
    """Returns ``global_batch_size // num_replicas``, or explains why it does not divide.

    Raises:
        ValueError: If it does not divide evenly; the message names the nearest valid sizes.

    Example:
    >>> from tfpar.data.pipeline import per_replica_batch_size  # tfpar.data.pipeline is the function
    >>> per_replica_batch_size(64, 4)
    16
    """
    check_int("global_batch_size", global_batch_size, minimum=1)
    check_int("num_replicas", num_replicas, minimum=1)
    if global_batch_size % num_replicas:
        lower = (global_batch_size // num_replicas) * num_replicas
        upper = lower + num_replicas
        options = [v for v in (lower, upper) if v > 0]
        raise ValueError(
            f"Expected global_batch_size to divide evenly by the {num_replicas} replicas, so each "
            f"replica gets global_batch_size // {num_replicas} examples. "
            f"Received: global_batch_size={global_batch_size}. "
            f"Use {' or '.join(map(str, options))} instead."
        )
    return global_batch_size // num_replicas


# === internals ===


def _build(
    dataset: tf.data.Dataset,
    batch_size: int | None,
    split_into: int | None,
    map_fn: Callable[..., Any] | None,
    augment_fn: Callable[..., Any] | None,
    cache: bool | str,
    shuffle: int | None,
    seed: int | None,
    drop_remainder: bool,
    deterministic: bool,
    augment_seed: int | None = None,
) -> tf.data.Dataset:
    if map_fn is not None:
        # Deterministic even in fast mode: the cache then holds the same order every run.
        dataset = dataset.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is True or cache == "memory":
        dataset = dataset.cache()
    elif isinstance(cache, str):
        dataset = dataset.cache(cache)
    if shuffle is not None:
        dataset = dataset.shuffle(shuffle, seed=seed, reshuffle_each_iteration=True)
    batched = False  # True once augment_fn runs per batch (then the batch is already made)
    if augment_fn is not None:
        if _takes_seed(augment_fn):
            # One stateless-RNG seed per example, new every epoch, reproducible from `seed`:
            # once a global seed is set, stateful random ops can restart from the same seed with
            # every iterator and replay the same augmentation every epoch.
            seeds = tf.data.Dataset.random(seed=augment_seed, rerandomize_each_iteration=True)
            dataset = tf.data.Dataset.zip(dataset, seeds.batch(2, drop_remainder=True))
            augment_fn = _seeded(augment_fn)
        elif batch_size is not None:
            vectorized = _vectorized(dataset, augment_fn, batch_size, drop_remainder, deterministic)
            if vectorized is not None:
                dataset, batched = vectorized, True
        if not batched:
            dataset = dataset.map(augment_fn, num_parallel_calls=tf.data.AUTOTUNE,
                                  deterministic=deterministic)
    if batch_size is not None:
        if not batched:
            # A plain batch after the parallel augment map: tf.data fuses the two into one
            # MapAndBatch step. A parallel batch (num_parallel_calls) is not fused and cost 7%
            # more CPU per example and ~5% first-epoch throughput (benchmarks/input_pipeline.py).
            dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        if split_into is not None and split_into != batch_size:
            # One batch per replica this pipeline serves: every step is full (drop_remainder) and
            # the replicas' batches come from consecutive examples.
            dataset = dataset.rebatch(split_into, drop_remainder=drop_remainder)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    if deterministic:
        # Only ever tightened: options are global, and loosening them would also reorder the
        # steps before a DATA shard (which checked that they were deterministic).
        options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def _call_like_map(fn: Callable[..., Any], element: Any) -> Any:
    """Calls `fn` on one element the way ``Dataset.map`` does (a tuple is spread into arguments)."""
    return fn(*element) if type(element) is tuple else fn(element)


def _vectorized(
    dataset: tf.data.Dataset,
    augment_fn: Callable[..., Any],
    batch_size: int,
    drop_remainder: bool,
    deterministic: bool,
) -> tf.data.Dataset | None:
    """`dataset` batched, then `augment_fn` run once per batch with ``tf.vectorized_map``.

    Returns None (run `augment_fn` per example instead) unless the vectorized form is exactly
    the per-example map: every input has a fully-defined shape (so batching first is possible),
    the traced `augment_fn` captures no variable or other resource (a Keras random layer draws
    its seed from a variable, which ``pfor`` would read once per batch: one draw for the whole
    batch instead of one per example), its outputs have fully-defined shapes, and ``pfor``
    converts every op without a while-loop fallback (a ``tf.py_function`` does not convert).
    Stateful random ops (``tf.image.random_*``, ``tf.random.uniform``) convert to one
    independent draw per example. Per batch, this cut CPU per cached epoch by ~40%
    (benchmarks/input_pipeline.py).
    """
    spec = dataset.element_spec
    leaves = tf.nest.flatten(spec)
    if not leaves or not all(
        type(leaf) is tf.TensorSpec and leaf.shape.is_fully_defined() for leaf in leaves
    ):
        return None
    try:
        traced = tf.function(functools.partial(_call_like_map, augment_fn))
        traced = traced.get_concrete_function(spec)
    except Exception:  # noqa: BLE001 - the per-example map below reports the user's error
        return None
    if any(t.dtype == tf.resource for t in traced.captured_inputs):
        return None
    if not all(
        isinstance(out, tf.Tensor) and out.shape.is_fully_defined()
        for out in tf.nest.flatten(traced.structured_outputs)
    ):
        return None
    per_batch = functools.partial(_vectorized_call, augment_fn, type(spec) is tuple)
    try:
        return dataset.batch(batch_size, drop_remainder=drop_remainder).map(
            per_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
        )
    except Exception:  # noqa: BLE001 - an op pfor cannot convert: augment per example instead
        logger.debug("augment_fn does not vectorize; running it per example", exc_info=True)
        return None


def _vectorized_call(augment_fn: Callable[..., Any], spread: bool, *batch: Any) -> Any:
    """`augment_fn` on every example of `batch` (as ``Dataset.map`` passes it) via ``pfor``."""
    # pfor calls its function without AutoGraph; convert it, as Dataset.map does, so Python
    # control flow on tensors in `augment_fn` works here too.
    per_example = functools.partial(tf.autograph.to_graph(_call_like_map), augment_fn)
    return tf.vectorized_map(per_example, batch if spread else batch[0], fallback_to_while_loop=False)


def _takes_seed(fn: Callable[..., Any]) -> bool:
    """Whether `fn` accepts a ``seed`` keyword argument."""
    try:
        parameter = inspect.signature(fn).parameters.get("seed")
    except (TypeError, ValueError):  # builtins and some callables have no signature
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    )


def _seeded(augment_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Calls `augment_fn` on a zipped (example, seed) element the way ``map`` calls it on examples."""

    def augment(example: Any, seed: tf.Tensor) -> Any:
        if isinstance(example, tuple):
            return augment_fn(*example, seed=seed)
        return augment_fn(example, seed=seed)

    return augment


def _check_options(
    batch_size: object,
    map_fn: object,
    augment_fn: object,
    cache: object,
    shuffle: object,
    seed: object,
    drop_remainder: object,
    deterministic: object,
) -> None:
    if batch_size is not None:
        check_int("batch_size", batch_size, minimum=1)
    if shuffle is not None:
        check_int("shuffle", shuffle, minimum=1)
    check_int("seed", seed, allow_none=True)
    for name, fn in (("map_fn", map_fn), ("augment_fn", augment_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(
                f"Expected `{name}` to be a function of one example, or None. "
                f"Received: {name}={fn!r}"
            )
    if not isinstance(cache, (bool, str)) or cache == "":
        raise TypeError(
            "Expected `cache` to be True / 'memory' (in memory), a file path prefix, or False. "
            f"Received: cache={cache!r}"
        )
    for name, flag in (("drop_remainder", drop_remainder), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"Expected `{name}` to be a bool. Received: {name}={flag!r}")
    if deterministic and shuffle is not None and seed is None:
        raise ValueError(
            "deterministic=True with shuffle needs a seed, or the order changes every run. "
            f"Fix: pass seed=0 (any int). Received: shuffle={shuffle}, seed=None"
        )


def _could_be_batched(spec: Any) -> bool:
    """Whether an element spec is consistent with the output of a batch op.

    A batch gives every component one more leading dimension, the same for all (None, or the
    batch size with drop_remainder). A scalar component, or components whose leading dimensions
    differ, cannot come from a batch, so the exact (graph) check is skipped: serializing a
    dataset's graph copies the arrays embedded in it, which takes seconds for a large in-memory
    dataset.
    """
    leaves = tf.nest.flatten(spec)
    if not leaves:
        return False
    firsts = []
    for leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is None or shape.rank is None:
            return True  # unknown: let the graph decide
        if shape.rank == 0:
            return False
        firsts.append(shape[0])
    return all(first == firsts[0] for first in firsts)


def _check_unbatched(dataset: tf.data.Dataset, why: str, keep: str = "") -> None:
    """Refuses a dataset whose output comes straight from a batch op (tfpar batches itself).

    Args:
        dataset: The dataset to check.
        why: Who batches and how, for the message.
        keep: An extra way out for the "Fix:" part of the message.
    """
    if not _could_be_batched(dataset.element_spec):
        return
    graph = _dataset_graph.graph_of(dataset)
    if graph is None:
        return
    node = graph.sink()
    through = ("_Retval", "PrefetchDataset", "OptionsDataset", "ModelDataset", "MapDataset",
               "ParallelMapDataset", "CacheDataset", "RepeatDataset", "ShuffleDataset",
               "TakeDataset", "SkipDataset", "FilterDataset", "Identity",
               "MaxIntraOpParallelismDataset", "PrivateThreadPoolDataset", "ShardDataset")
    batches = ("BatchDataset", "PaddedBatchDataset", "ParallelBatchDataset", "MapAndBatchDataset",
               "RebatchDataset", "ExperimentalMapAndBatchDataset")
    hops = 0
    while node is not None and hops < 64:
        if _dataset_graph.is_op(node.op, batches):
            raise ValueError(
                f"Expected unbatched examples: {why}. Received a dataset that ends with a "
                f"{node.op} op (element_spec={dataset.element_spec}). Fix: pass the dataset "
                f"before its .batch(...), or call .unbatch() on it{', ' + keep if keep else ''}."
            )
        if not _dataset_graph.is_op(node.op, through) or not node.input:
            return
        node = graph.input_node(node.input[0])
        hops += 1
