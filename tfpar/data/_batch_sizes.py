"""Which sizes a dataset's batches can have, read from its graph (for the empty-batches guard)."""

from __future__ import annotations

import tensorflow as tf

from tfpar.data._dataset_graph import _const_value, _Graph, graph_of, is_op

# Between a batch and the output: ops that keep every batch's size (they select, reorder or
# transform whole batches).
_BATCH_SIZE_KEEPING = ("_Retval", "Identity", "PrefetchDataset", "OptionsDataset", "ModelDataset",
                       "MapDataset", "ParallelMapDataset", "MaxIntraOpParallelismDataset",
                       "PrivateThreadPoolDataset", "RepeatDataset", "TakeDataset", "SkipDataset",
                       "ShuffleDataset", "ShuffleDatasetV3", "CacheDataset", "FinalizeDataset")
_INFINITE = -1  # tf.data.INFINITE_CARDINALITY


def batch_sizes(dataset: tf.data.Dataset) -> set[int] | None:
    """The sizes the dataset's batches can have, or None where tfpar cannot tell.

    Follows the output back through ops that keep batch sizes (prefetch, map, repeat, take, ...)
    to a ``batch``: with ``drop_remainder=True`` or an input that repeats forever every batch is
    full; with an input of known size ``n`` the sizes are ``b`` and ``n % b``.

    Example:
    >>> batch_sizes(tf.data.Dataset.range(10).batch(4))
    {2, 4}
    >>> batch_sizes(tf.data.Dataset.range(10).repeat().batch(4))
    {4}
    """
    graph = graph_of(dataset)
    if graph is None or graph.sink() is None:
        return None
    node = graph.sink()
    hops = 0
    while node is not None and is_op(node.op, _BATCH_SIZE_KEEPING) and node.input and hops < 64:
        node = graph.input_node(node.input[0])
        hops += 1
    if node is None or node.op not in ("BatchDataset", "BatchDatasetV2", "ParallelBatchDataset"):
        return None
    batch = _const_value(graph, node.input[1]) if len(node.input) > 1 else None
    drop_position = {"BatchDataset": None, "BatchDatasetV2": 2, "ParallelBatchDataset": 3}[node.op]
    drop = _const_value(graph, node.input[drop_position]) if drop_position is not None else False
    if not isinstance(batch, int) or batch <= 0 or drop is None:
        return None
    if drop:
        return {batch}
    count = _cardinality_of(graph, node.input[0])
    if count == _INFINITE:
        return {batch}
    if count is None or count < 0:
        return None
    return {batch, count % batch} - {0} or {batch}


def _cardinality_of(graph: _Graph, name: str) -> int | None:
    """The cardinality of the dataset node `name`, rebuilt from the graph."""
    sub = tf.compat.v1.GraphDef()
    sub.CopyFrom(graph.graph_def)
    for candidate in sub.node:
        if candidate.op == "_Retval":
            del candidate.input[:]
            candidate.input.append(name)
    try:
        variant = tf.raw_ops.DatasetFromGraph(graph_def=sub.SerializeToString())
        return int(tf.raw_ops.DatasetCardinality(input_dataset=variant))
    except (tf.errors.OpError, ValueError):
        return None
