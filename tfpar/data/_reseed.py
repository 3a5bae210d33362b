"""Gives a dataset's unseeded shuffles one seed, so that every worker draws the same orders.

Used by the shared-shuffle interception (tfpar/_compat/shared_shuffle.py) for multi-worker input
that TensorFlow shards by DATA. The pipeline's graph is read and rebuilt with the public ops
:mod:`tfpar.data._dataset_graph` uses.
"""

from __future__ import annotations

import tensorflow as tf

from tfpar.data._dataset_graph import _SEEDED_OPS, _const_value, graph_of

# Ops with a seed generator resource as their last input, and the older op that takes the same
# inputs without it. The older ops keep their reshuffle-every-iteration generator inside the
# dataset, seeded by (seed, seed2) alone, so equal seeds give equal orders in every process.
_WITHOUT_SEED_GENERATOR = {
    "ShuffleDatasetV3": "ShuffleDataset",
    "ShuffleAndRepeatDatasetV2": "ShuffleAndRepeatDataset",
    "RandomDatasetV2": "RandomDataset",
}


def seed_unseeded(dataset: tf.data.Dataset, seed: int) -> tuple[tf.data.Dataset, int]:
    """Gives every unseeded shuffle / random op at the top level of the pipeline a fixed seed.

    The order then depends on `seed` only: the same in every process that passes the same seed,
    and still different in every iteration (epoch) where the op reshuffles. Ops inside dataset
    functions (interleave, flat_map) are left as they are.

    Args:
        dataset: The dataset.
        seed: The seed; op ``k`` (in graph order) gets the pair ``(seed, k + 1)``.

    Returns:
        ``(dataset, count)``: a rebuilt dataset and how many ops got a seed, or the dataset itself
        and 0 when none needed one (or its graph cannot be serialized).

    Example:
    >>> seeded, count = seed_unseeded(tf.data.Dataset.range(8).shuffle(8), seed=7)
    >>> count
    1
    """
    graph = graph_of(dataset)
    if graph is None:
        return dataset, 0
    rewritten = tf.compat.v1.GraphDef()
    rewritten.CopyFrom(graph.graph_def)
    count = 0
    generators = []  # the seed generators the rebuilt dataset uses; they live as long as it does
    for node in list(rewritten.node):
        if node.op not in _SEEDED_OPS:
            continue
        positions = _SEEDED_OPS[node.op]
        if max(positions) >= len(node.input):
            continue
        values = [_const_value(graph, node.input[i]) for i in positions]
        if values != [0, 0]:
            continue
        count += 1
        if node.op == "ShuffleDatasetV3":
            # Seeds and seed generator of a shuffle that was given the seed: the generator is a
            # resource shared by every copy of the dataset (tf.distribute builds one per
            # iterator), so each epoch still draws a new order, the same one in every process.
            owner = tf.data.Dataset.range(1).shuffle(1, seed=(seed + count) & 0x7FFFFFFF)
            generators.append(owner)
            donor = graph_of(owner)
            assert donor is not None  # a range().shuffle() always serializes
            shuffle = next(n for n in donor.graph_def.node if n.op == "ShuffleDatasetV3")
            sources = [donor.input_node(name) for name in shuffle.input[2:5]]
            for position, source in zip((2, 3, 4), sources):
                name = f"tfpar_seed/{count}/{position}"
                constant = rewritten.node.add()
                constant.CopyFrom(source)
                constant.name = name
                node.input[position] = name
            continue
        for position, value in zip(positions, (seed, count)):
            name = f"tfpar_seed/{count}/{position}"
            constant = rewritten.node.add(name=name, op="Const")
            constant.attr["dtype"].type = tf.int64.as_datatype_enum
            constant.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(int(value), tf.int64))
            node.input[position] = name
        if node.op in _WITHOUT_SEED_GENERATOR:
            del node.input[len(node.input) - 1]
            node.op = _WITHOUT_SEED_GENERATOR[node.op]
    if not count:
        return dataset, 0
    variant = tf.raw_ops.DatasetFromGraph(graph_def=rewritten.SerializeToString())
    seeded = tf.data.experimental.from_variant(variant, dataset.element_spec)
    _GENERATOR_OWNERS.extend(generators)
    return seeded, count


# The datasets that own the seed generators of rebuilt datasets. A generator is deleted with the
# dataset that made it, and tf.distribute's copies of a rebuilt dataset may outlive it, so they
# are kept for the life of the process (one tiny dataset per seeded shuffle).
_GENERATOR_OWNERS: list[tf.data.Dataset] = []
