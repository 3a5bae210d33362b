"""Reads a tf.data pipeline's graph to find its source files and its sources of randomness.

tf.data keeps every pipeline as a graph of dataset ops. ``tf.raw_ops.DatasetToGraphV2`` serializes
that graph (the same serialization tf.data's own auto-shard rewrite starts from),
``tf.compat.v1.GraphDef`` parses it, and ``tf.raw_ops.DatasetFromGraph`` turns a piece of it back
into a dataset. All three are public TensorFlow APIs; nothing here imports a private TensorFlow
module.

Two questions decide how a dataset may be sharded, and this module answers both:

* **Which files does it read, and can TensorFlow's FILE rewrite shard them?** (:func:`inspect_files`)
  The walk mirrors TensorFlow's ``tf_auto_shard`` rewrite (``grappler/optimizers/data/auto_shard.cc``):
  from the output it follows ops that pass elements through unchanged in kind (map, batch, shuffle,
  prefetch, cache, options, ...) until it reaches a *reader* (``TFRecordDataset``,
  ``TextLineDataset``, ``FixedLengthRecordDataset``, ...) or an interleave/flat_map whose function
  contains a reader. The dataset feeding that reader is the list of files; it is rebuilt from the
  graph and counted (a few string tensors, never the records). ``zip``/``concatenate`` of several
  readers count per source. Anything else between the output and the reader (for example
  ``ignore_errors`` or ``unbatch``), an in-memory source (``from_tensor_slices``, ``range``,
  ``from_generator``), or a reader nested in a way TensorFlow's rewrite does not follow, is reported
  as not file-shardable, with the reason.
* **Is its element order deterministic?** (:func:`find_nondeterminism`) DATA sharding and
  index-based splitting keep "every n-th element", which is only meaningful when every process sees
  the same order. Detected (top level and inside dataset functions): ``shuffle`` /
  ``shuffle_and_repeat`` / ``Dataset.random`` / ``sample_from_datasets`` without a seed (both seed
  inputs 0, which TensorFlow's kernels read as "pick a random seed"; a global
  ``tf.random.set_seed`` counts as a seed), parallel ``map``/``interleave``/``batch`` with
  ``deterministic=False`` (or left at the default while ``tf.data.Options.deterministic`` is False),
  legacy ``sloppy`` interleaves, and stateful random ops (``tf.random.uniform``, ...) inside
  ``filter``/``take_while`` predicates. A parallel ``interleave`` with ``cycle_length=AUTOTUNE``
  (its order follows each machine's CPU count) only draws a warning. Not detected: randomness
  hidden in ``from_generator`` or
  ``py_function`` code, and reads of files that change between workers.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Iterator

import tensorflow as tf

# Op families as TensorFlow's auto-shard rewrite lists them (TF 2.21); a family matches its
# versioned ops too ("MapDataset" matches "MapDataset" and "MapDatasetV2").
_READER_OPS = (
    "ArrayRecordDataset",
    "FixedLengthRecordDataset",
    "RecordIODataset",
    "SSTableDataset",
    "TextLineDataset",
    "TFRecordDataset",
)
_MULTI_INPUT_OPS = ("ConcatenateDataset", "ZipDataset")
_PASS_THROUGH_OPS = (
    "_Retval",
    "AssertNextDataset",
    "BatchDataset",
    "CacheDataset",
    "ExperimentalMapAndBatchDataset",
    "ExperimentalParseExampleDataset",
    "ExperimentalRebatchDataset",
    "FilterDataset",
    "FinalizeDataset",
    "Identity",
    "MapAndBatchDataset",
    "MapDataset",
    "MaxIntraOpParallelismDataset",
    "ModelDataset",
    "OptimizeDataset",
    "OptionsDataset",
    "PaddedBatchDataset",
    "ParallelBatchDataset",
    "ParallelMapDataset",
    "ParseExampleDataset",
    "PrefetchDataset",
    "PrivateThreadPoolDataset",
    "ReduceDataset",
    "RebatchDataset",
    "RepeatDataset",
    "ShardDataset",
    "ShuffleAndRepeatDataset",
    "ShuffleDataset",
    "SkipDataset",
    "TakeDataset",
    "WindowDataset",
)
_FUNCTION_OPS = (
    "ExperimentalParallelInterleaveDataset",
    "FlatMapDataset",
    "InterleaveDataset",
    "LegacyParallelInterleaveDataset",
    "ParallelInterleaveDataset",
)
_IN_MEMORY_SOURCES = (
    "GeneratorDataset",
    "RangeDataset",
    "SparseTensorsSliceDataset",
    "TensorDataset",
    "TensorSliceDataset",
)
# Seed input positions of the ops that draw random numbers from a (seed, seed2) pair.
_SEEDED_OPS = {
    "ShuffleDataset": (2, 3),
    "ShuffleDatasetV3": (2, 3),
    "ShuffleAndRepeatDataset": (2, 3),
    "ShuffleAndRepeatDatasetV2": (2, 3),
    "RandomDataset": (0, 1),
    "RandomDatasetV2": (0, 1),
}
_STATEFUL_RANDOM_OP = re.compile(
    r"^(Random(Uniform|UniformInt|StandardNormal|Gamma|Poisson|PoissonV2|Shuffle|Crop)"
    r"|TruncatedNormal|ParameterizedTruncatedNormal|Multinomial|RngReadAndSkip|RngSkip"
    r"|Stateful\w*)$"
)
_PREDICATE_OPS = ("FilterDataset", "TakeWhileDataset", "ExperimentalTakeWhileDataset")
_IGNORE_EXTERNAL_STATE = 1  # tf.data.experimental.ExternalStatePolicy.IGNORE


def is_op(op: str, families: tuple[str, ...]) -> bool:
    """Whether `op` is one of `families`, in any version (``MapDataset`` matches ``MapDatasetV2``)."""
    return any(op == f or re.fullmatch(re.escape(f) + r"V\d+", op) for f in families)


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """What :func:`inspect_files` found out about a dataset's source files.

    Attributes:
        files: Every source file (sorted, duplicates kept once), or ``()`` if none was found.
        counts: Number of files of each file source (one entry per reader the rewrite would shard).
        shardable: Whether TensorFlow's FILE rewrite can shard this dataset.
        reason: Why it cannot (empty when it can).
        memory_cache: Whether an in-memory ``cache()`` sits between the files and the output.
    """

    files: tuple[str, ...]
    counts: tuple[int, ...]
    shardable: bool
    reason: str
    memory_cache: bool = False

    @property
    def num_files(self) -> int:
        """Files of the smallest file source (what FILE sharding must split); 0 if none."""
        return min(self.counts) if self.counts else 0


class _NotFileShardable(Exception):
    pass


class _Graph:
    """A parsed dataset graph with name lookups for the top level and for each function."""

    def __init__(self, graph_def: tf.compat.v1.GraphDef):
        self.graph_def = graph_def
        self.nodes = {n.name: n for n in graph_def.node}
        self.functions = {f.signature.name: f for f in graph_def.library.function}

    def input_node(self, name: str, scope: dict | None = None):
        scope = self.nodes if scope is None else scope
        return scope.get(name.lstrip("^").split(":")[0])

    def sink(self):
        for node in self.graph_def.node:
            if node.op == "_Retval":
                return node
        return None

    def iter_scopes(self) -> Iterator[tuple[str, list, dict]]:
        yield "", list(self.graph_def.node), self.nodes
        for name, function in self.functions.items():
            nodes = list(function.node_def)
            yield name, nodes, {n.name: n for n in nodes}

    def called_functions(self, node) -> list[str]:
        names = []
        for value in node.attr.values():
            if value.func.name:
                names.append(value.func.name)
            names.extend(f.name for f in value.list.func)
        return [n for n in names if n in self.functions]


# The last dataset inspected and its graph. Datasets are immutable, and one shard()/split() call
# (or shard() for every index of one dataset) asks several questions about the same one;
# serializing is the cost (about 0.4 s for 50 MB of in-memory arrays). One entry bounds memory.
_LAST: list = []


def graph_of(dataset: tf.data.Dataset) -> _Graph | None:
    """Serializes and parses a dataset's graph; None if TensorFlow cannot serialize it."""
    if _LAST and _LAST[0][0]() is dataset:
        return _LAST[0][1]
    graph = _serialize(dataset)
    _LAST[:] = [(weakref.ref(dataset), graph)]
    return graph


def _serialize(dataset: tf.data.Dataset) -> _Graph | None:
    try:
        serialized = tf.raw_ops.DatasetToGraphV2(
            input_dataset=tf.data.experimental.to_variant(dataset),
            external_state_policy=_IGNORE_EXTERNAL_STATE,
            strip_device_assignment=True,
        )
    except (tf.errors.OpError, ValueError, TypeError):
        return None
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(serialized.numpy())
    return _Graph(graph_def)


def inspect_files(dataset: tf.data.Dataset) -> FileInfo:
    """Finds the files a dataset reads and whether TensorFlow's FILE rewrite can shard them."""
    graph = graph_of(dataset)
    if graph is None:
        return FileInfo((), (), False, "TensorFlow could not serialize the dataset's graph")
    sources: list = []
    caches: list = []
    files: set[str] = set()
    counts = []
    try:
        sink = graph.sink()
        if sink is None:
            raise _NotFileShardable("the serialized pipeline has no output node")
        _walk(graph, sink, sources, caches)
        for node, kind in sources:
            names = _files_of(graph, node, kind)
            files.update(names)
            counts.append(len(names))
    except _NotFileShardable as error:
        return FileInfo((), (), False, str(error))
    memory_cache = any(_const_value(graph, c.input[1]) in (b"", "") for c in caches)
    return FileInfo(tuple(sorted(files)), tuple(counts), True, "", memory_cache)


def _walk(graph: _Graph, node, sources: list, caches: list) -> None:
    op = node.op
    if is_op(op, _IN_MEMORY_SOURCES):
        raise _NotFileShardable(
            f"its elements come from an in-memory or generated source ({op}), not from files"
        )
    if is_op(op, _MULTI_INPUT_OPS):
        for name in node.input:
            if not name.startswith("^"):
                _walk(graph, graph.input_node(name), sources, caches)
        return
    if is_op(op, _FUNCTION_OPS) and _reader_in_function(graph, node):
        sources.append((node, "dataset"))
        return
    if is_op(op, _READER_OPS):
        sources.append((node, "tensor"))
        return
    if not is_op(op, _PASS_THROUGH_OPS):
        raise _NotFileShardable(
            f"a {op} op lies between the files and the output, and TensorFlow's FILE rewrite "
            "cannot shard through it"
        )
    if is_op(op, ("CacheDataset",)):
        caches.append(node)
    upstream = graph.input_node(node.input[0]) if node.input else None
    if upstream is None:
        raise _NotFileShardable(f"the input of {op} could not be followed")
    _walk(graph, upstream, sources, caches)


def _reader_in_function(graph: _Graph, node, depth: int = 0) -> bool:
    if depth > 16:
        return False
    for name in graph.called_functions(node):
        for inner in graph.functions[name].node_def:
            if is_op(inner.op, _READER_OPS) and inner.input:
                return True
            if is_op(inner.op, _FUNCTION_OPS) and _reader_in_function(graph, inner, depth + 1):
                return True
    return False


def _files_of(graph: _Graph, node, kind: str) -> list[str]:
    """The file names feeding a reader (``kind="tensor"``) or an interleave (``"dataset"``)."""
    if kind == "tensor":
        value = _const_value(graph, node.input[0])
        if value is None:
            raise _NotFileShardable(f"the file names of {node.op} are computed, not constant")
        flat = value.reshape(-1) if hasattr(value, "reshape") else [value]
        return [_text(v) for v in flat]
    upstream = graph.input_node(node.input[0])
    if upstream is None:
        raise _NotFileShardable(f"the file list feeding {node.op} could not be followed")
    return _evaluate_file_list(graph, upstream)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _evaluate_file_list(graph: _Graph, node) -> list[str]:
    """Rebuilds the sub-pipeline that yields file names and reads it (strings only)."""
    sub = tf.compat.v1.GraphDef()
    sub.CopyFrom(graph.graph_def)
    for candidate in sub.node:
        if candidate.op == "_Retval":
            del candidate.input[:]
            candidate.input.append(node.name)
    # Read attrs with `in` checks: indexing a protobuf map inserts the key.
    types_key = "output_types" if "output_types" in node.attr else "Toutput_types"
    types = node.attr[types_key].list.type if types_key in node.attr else []
    shapes = node.attr["output_shapes"].list.shape if "output_shapes" in node.attr else []
    specs = tuple(
        tf.TensorSpec(tf.TensorShape(shape), tf.as_dtype(dtype))
        for dtype, shape in zip(types, shapes)
    )
    if not specs:
        specs = (tf.TensorSpec(None, tf.string),)
    variant = tf.raw_ops.DatasetFromGraph(graph_def=sub.SerializeToString())
    count = int(tf.raw_ops.DatasetCardinality(input_dataset=variant))
    if count == -1:  # tf.data.INFINITE_CARDINALITY
        raise _NotFileShardable("its list of files repeats forever")
    names = []
    structure = specs[0] if len(specs) == 1 else specs
    for element in tf.data.experimental.from_variant(variant, structure):
        first = element[0] if isinstance(element, tuple) else element
        names.append(_text(first.numpy()))
    return names


def _const_value(graph: _Graph, name: str, scope: dict | None = None):
    node = graph.input_node(name, scope)
    hops = 0
    while node is not None and node.op == "Identity" and node.input and hops < 8:
        node = graph.input_node(node.input[0], scope)
        hops += 1
    if node is None or node.op != "Const":
        return None
    if "value" not in node.attr:
        return None
    value = tf.make_ndarray(node.attr["value"].tensor)
    return value.item() if value.ndim == 0 else value


def find_nondeterminism(dataset: tf.data.Dataset) -> tuple[list[str], list[str]]:
    """Finds what makes a dataset's element order differ between iterations or processes.

    Returns:
        ``(problems, unverifiable)``: descriptions of certain nondeterminism, and of random ops
        whose seeds could not be read (for example seeds passed in as function arguments).
    """
    graph = graph_of(dataset)
    if graph is None:
        return [], ["TensorFlow could not serialize the dataset's graph, so its order is unchecked"]
    options_nondeterministic = dataset.options().deterministic is False
    problems: list[str] = []
    unverifiable: list[str] = []
    random_predicates: set[str] = set()
    for function_name, nodes, scope in graph.iter_scopes():
        where = f" inside function {function_name}" if function_name else ""
        for node in nodes:
            op = node.op
            if op in _SEEDED_OPS:
                seeds = [
                    _const_value(graph, node.input[i], scope)
                    for i in _SEEDED_OPS[op]
                    if i < len(node.input)
                ]
                if op.startswith("RandomDataset") and _only_zipped(node, nodes):
                    continue  # zipped in as values (per-example augmentation seeds): not an order
                if any(s is None for s in seeds) or len(seeds) < 2:
                    unverifiable.append(f"{_describe(op)}{where} takes its seed from a computed value")
                elif seeds[0] == 0 and seeds[1] == 0:
                    problems.append(f"{_describe(op)}{where} has no seed")
            elif op == "ShuffleDatasetV2":
                unverifiable.append(f"shuffle ({op}){where} uses a seed generator tfpar cannot read")
            setting = _nondeterministic_setting(node, options_nondeterministic)
            if setting is not None:
                problems.append(f"{op}{where} runs in parallel with {setting}")
            if _autotuned_interleave(graph, node, scope):
                unverifiable.append(
                    f"interleave{where} has cycle_length=AUTOTUNE, so its order follows the "
                    "CPU count of each machine"
                )
            if "sloppy" in node.attr and node.attr["sloppy"].b:
                problems.append(f"{op}{where} is a sloppy (unordered) interleave")
            if is_op(op, _PREDICATE_OPS):
                for name in graph.called_functions(node):
                    if _calls_stateful_random(graph, name, set()):
                        random_predicates.add(f"{op}{where} decides with an unseeded random op")
    problems.extend(sorted(random_predicates))
    return problems, unverifiable


def _nondeterministic_setting(node, options_nondeterministic: bool) -> str | None:
    """The setting that makes a parallel op of :func:`find_nondeterminism` unordered, else None."""
    if "deterministic" in node.attr:
        flag = node.attr["deterministic"].s.decode()
        if flag == "false" or (flag == "default" and options_nondeterministic):
            return (
                "deterministic=False"
                if flag == "false"
                else "tf.data.Options.deterministic=False"
            )
    return None


def _autotuned_interleave(graph: _Graph, node, scope: dict) -> bool:
    """Whether `node` is a parallel interleave whose cycle_length is AUTOTUNE (-1)."""
    if is_op(node.op, ("ParallelInterleaveDataset",)) and "Targuments" in node.attr:
        # Inputs: dataset, captured arguments, then cycle_length.
        position = 1 + len(node.attr["Targuments"].list.type)
        data_inputs = [i for i in node.input if not i.startswith("^")]
        cycle_length = (
            _const_value(graph, data_inputs[position], scope)
            if position < len(data_inputs)
            else None
        )
        return bool(cycle_length == -1)
    return False


# Ops that never choose which elements come out by their values: a random stream zipped to the
# data and passed only through these changes what an example carries, never which examples a
# shard gets. Filter, flat_map, interleave, group_by_window... are not here: they could select by
# the random value (a random subsample), and then an unseeded stream is an order problem.
_VALUE_PASSING = ("BatchDataset", "PaddedBatchDataset", "ParallelBatchDataset", "MapDataset",
                  "ParallelMapDataset", "MapAndBatchDataset", "RebatchDataset", "ZipDataset",
                  "PrefetchDataset", "OptionsDataset", "ModelDataset", "CacheDataset",
                  "RepeatDataset", "TakeDataset", "SkipDataset", "ShuffleDataset",
                  "ShardDataset", "MaxIntraOpParallelismDataset", "PrivateThreadPoolDataset",
                  "AssertCardinalityDataset", "Identity")


def _only_zipped(node, nodes: list) -> bool:
    """Whether a RandomDataset only supplies values zipped to other data, never order.

    True when every path from it to the output goes through a ZipDataset and only through ops in
    ``_VALUE_PASSING``: zip pairs the i-th elements of its inputs, so the random values ride along
    with the examples. (The random stream that picks among the inputs of
    ``sample_from_datasets`` feeds a DirectedInterleave and is still refused.)
    """
    consumers: dict[str, list] = {}
    for other in nodes:
        for name in other.input:
            consumers.setdefault(name.lstrip("^").split(":")[0], []).append(other)
    frontier, seen = [(node, False)], set()
    while frontier:
        current, zipped = frontier.pop()
        if (current.name, zipped) in seen:
            continue
        seen.add((current.name, zipped))
        users = consumers.get(current.name, [])
        if not users or current.op == "_Retval":
            if not zipped:
                return False  # the random stream itself is (part of) the output
            continue
        for user in users:
            if user.op == "_Retval":
                frontier.append((user, zipped))
            elif is_op(user.op, _VALUE_PASSING):
                frontier.append((user, zipped or user.op == "ZipDataset"))
            else:
                return False
    return True


def _describe(op: str) -> str:
    if op.startswith("ShuffleAndRepeat"):
        return "shuffle_and_repeat"
    if op.startswith("Shuffle"):
        return "shuffle"
    return "Dataset.random / sample_from_datasets (RandomDataset)"


def _calls_stateful_random(graph: _Graph, function_name: str, seen: set[str]) -> bool:
    if function_name in seen or function_name not in graph.functions:
        return False
    seen.add(function_name)
    for node in graph.functions[function_name].node_def:
        if _STATEFUL_RANDOM_OP.match(node.op):
            return True
        for callee in graph.called_functions(node):
            if _calls_stateful_random(graph, callee, seen):
                return True
        if node.op in graph.functions and _calls_stateful_random(graph, node.op, seen):
            return True
    return False


def reshuffles(dataset: tf.data.Dataset) -> bool:
    """Whether a seeded shuffle in the dataset draws a new order on every iteration.

    Its random state lives in the dataset object: in one process, every iterator of that object
    (including iterators of different shards of it) advances the same state.
    """
    graph = graph_of(dataset)
    if graph is None:
        return False
    for _, nodes, _ in graph.iter_scopes():
        for node in nodes:
            if (
                node.op in _SEEDED_OPS
                and node.op.startswith("Shuffle")
                and "reshuffle_each_iteration" in node.attr
                and node.attr["reshuffle_each_iteration"].b
            ):
                return True
    return False


