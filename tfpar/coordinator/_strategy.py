"""The strategy factory (ParameterServerStrategy with tfpar's options and partitioners) and
:func:`enable`, which makes Keras fit / evaluate / predict work under any ParameterServerStrategy."""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from tfpar import _compat
from tfpar import cluster as cluster_lib
from tfpar._compat import internals
from tfpar.coordinator import _patches
from tfpar.coordinator._common import (
    DEFAULT_MIN_SHARD_BYTES,
    STRATEGY_OPTIONS,
    VARIABLE_PARTITIONERS,
    ParameterServerOptions,
)
from tfpar.coordinator._reach import wait_until_workers_reach_ps

_CONNECTED: weakref.WeakSet[tf.distribute.ParameterServerStrategy] = weakref.WeakSet()


def parameter_server_strategy(
    cluster: (
        str | Mapping[str, Any] | tf.distribute.cluster_resolver.ClusterResolver | tf.train.ClusterSpec
    ) = "tf_config",
    *,
    variable_partitioner: str | int | Callable[..., Any] | None = None,
    min_shard_bytes: int = DEFAULT_MIN_SHARD_BYTES,
    staleness: int | None = None,
) -> tf.distribute.ParameterServerStrategy:
    """Creates a ParameterServerStrategy whose Keras ``fit`` / ``evaluate`` / ``predict`` work.

    This process must be the coordinator: the ``chief`` task of the cluster (``tfpar launch
    --ps M`` runs the script there and servers in the worker and ps tasks), or a process outside
    the cluster spec (``tfpar.local_cluster()``, the TF tutorial's layout).

    Args:
        cluster: Where the cluster comes from, as for :func:`tfpar.cluster.resolve`:
            ``"tf_config"`` (default), ``"slurm"``, a dict cluster spec, a
            ``tf.train.ClusterSpec`` or a ClusterResolver such as ``tfpar.local_cluster()``.
            It must have at least one ``"worker"`` and one ``"ps"`` task.
        variable_partitioner: How variables are split over the ps tasks:

            * None: each variable lives whole on one ps (round-robin over the ps tasks).
            * ``"min_size"``: variables larger than `min_shard_bytes` are split along their
              first axis into shards of at least `min_shard_bytes`, at most one per ps
              (``tf.distribute.experimental.partitioners.MinSizePartitioner``): for big
              embeddings.
            * an int ``n`` >= 1: every variable of rank >= 1 is split into ``n`` shards
              (``FixedShardsPartitioner(n)``; fewer when its first axis is shorter).
            * a ``tf.distribute.experimental.partitioners.Partitioner`` (or any callable with
              its signature).

            Keras layers and optimizers train, save and load sharded variables under tfpar, and
            ``keras.layers.Embedding`` reads only the rows a batch uses from each shard.
        min_shard_bytes: The minimum shard size for ``variable_partitioner="min_size"``.
        staleness: None (default) for asynchronous training; an int ``k >= 0`` for
            semi-asynchronous training: no worker starts a step while it is more than ``k``
            steps ahead of the slowest (``k=0``: lockstep rounds). Counted in steps.

    Returns:
        The ``tf.distribute.ParameterServerStrategy``. Creating it connects to the cluster, waits
        (up to a minute) until every worker reaches every ps task, and, as TensorFlow does, sets
        ``TF_ENABLE_EAGER_CLIENT_STREAMING_ENQUEUE`` and ``TF_PS_DISABLE_ASYNC_EXECUTOR_GLOBALLY``
        in this process's environment.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument has a wrong value, or the cluster has no worker or no ps
            task, or this process is one of its worker / ps tasks.
        ConnectionError: If a worker cannot reach a ps task for a minute.

    Example:
    >>> strategy = tfpar.coordinator.parameter_server_strategy(
    ...     tfpar.local_cluster(workers=2, ps=2), variable_partitioner="min_size", staleness=1)
    >>> with tfpar.scope(strategy):
    ...     model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(100_000, 64)])
    """
    if staleness is not None and (isinstance(staleness, bool) or not isinstance(staleness, numbers.Integral)):
        raise TypeError(
            "Expected staleness to be None (asynchronous) or an int >= 0 (bounded staleness). "
            f"Received: staleness={staleness!r} (of type {type(staleness).__name__})"
        )
    if staleness is not None and staleness < 0:
        raise ValueError(
            "Expected staleness >= 0: 0 is lockstep, k lets a worker run k steps ahead of the "
            f"slowest, None is fully asynchronous. Received: staleness={staleness}"
        )
    if isinstance(min_shard_bytes, bool) or not isinstance(min_shard_bytes, numbers.Integral):
        raise TypeError(f"Expected min_shard_bytes to be an int. Received: min_shard_bytes={min_shard_bytes!r}")
    if min_shard_bytes < 1:
        raise ValueError(f"Expected min_shard_bytes >= 1. Received: min_shard_bytes={min_shard_bytes}")
    _check_partitioner(variable_partitioner)
    resolver = cluster_lib.resolve(cluster)
    spec = resolver.cluster_spec().as_dict() if resolver.cluster_spec() else {}
    workers, ps = len(spec.get("worker", ())), len(spec.get("ps", ()))
    if workers < 1 or ps < 1:
        shape = {job: len(tasks) for job, tasks in spec.items()} or "no cluster (TF_CONFIG is unset or empty)"
        raise ValueError(
            "Strategy 'parameter_server' needs a cluster with at least one 'worker' and one 'ps' "
            f"task. Received: cluster={cluster!r} with {shape}. For a local try-out pass "
            "cluster=tfpar.local_cluster(workers=2, ps=1); for separate processes run the script "
            "under `tfpar launch --workers 2 --ps 1 -- python train.py`."
        )
    if resolver.task_type in ("worker", "ps"):
        raise ValueError(
            f"This process is task {resolver.task_type}:{resolver.task_id} of the cluster, but "
            "under parameter-server training only the coordinator (the 'chief' task) runs the "
            "training script; worker and ps tasks run TensorFlow servers "
            "(tfpar.launch.serve(), which `tfpar launch --ps M` starts for them). "
            f"Received: task_type={resolver.task_type!r}"
        )
    if resolver.task_type not in (None, "chief"):
        raise ValueError(
            "Expected the coordinator to be the 'chief' task (or outside the cluster spec). "
            f"Received: task_type={resolver.task_type!r}"
        )
    partitioner = _make_partitioner(variable_partitioner, min_shard_bytes, ps)
    strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    STRATEGY_OPTIONS[strategy] = ParameterServerOptions(
        staleness=None if staleness is None else int(staleness), variable_partitioner=partitioner
    )
    return enable(strategy)  # tfpar's fixes (and the coordinator loops) apply to its models


def _check_partitioner(value: Any) -> None:
    if value is None or callable(value):
        return
    if isinstance(value, str):
        if value not in VARIABLE_PARTITIONERS:
            raise ValueError(
                f"Unknown variable_partitioner {value!r}. Valid choices: None, 'min_size', an int "
                "number of shards, or a tf.distribute.experimental.partitioners.Partitioner. "
                f"Received: variable_partitioner={value!r}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            "Expected variable_partitioner to be None, 'min_size', an int number of shards or a "
            "tf.distribute.experimental.partitioners.Partitioner. "
            f"Received: variable_partitioner={value!r} (of type {type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"Expected a number of shards >= 1. Received: variable_partitioner={value}")


def _make_partitioner(value: Any, min_shard_bytes: int, num_ps: int) -> Any:
    partitioners = tf.distribute.experimental.partitioners
    if value is None or callable(value):
        return value
    if value == "min_size":
        return partitioners.MinSizePartitioner(min_shard_bytes=int(min_shard_bytes), max_shards=num_ps)
    return partitioners.FixedShardsPartitioner(int(value))


def enable(strategy: tf.distribute.ParameterServerStrategy) -> tf.distribute.ParameterServerStrategy:
    """Makes Keras ``fit`` / ``evaluate`` / ``predict`` work under a ParameterServerStrategy.

    :func:`parameter_server_strategy` calls it; ``tfpar.get_strategy(instance)`` and
    ``tfpar.scope(instance)`` call it for a strategy made by hand (default options: asynchronous,
    the instance's own partitioner). It applies tfpar's fixes to the strategy's models
    (``tfpar._compat.manage``), installs the parameter-server interceptions (once), stops the
    strategy's ClusterCoordinator at exit, and, once per strategy, waits until every worker
    reaches every ps task.

    Args:
        strategy: A ``tf.distribute.ParameterServerStrategy``.

    Returns:
        `strategy` itself.

    Raises:
        TypeError: If `strategy` is not a ParameterServerStrategy.
        ConnectionError: If a worker cannot reach a ps task for a minute.

    Example:
    >>> resolver = tfpar.local_cluster(workers=2, ps=1)
    >>> strategy = tfpar.coordinator.enable(tf.distribute.ParameterServerStrategy(resolver))
    """
    if not isinstance(strategy, tf.distribute.ParameterServerStrategy):
        raise TypeError(
            "Expected a tf.distribute.ParameterServerStrategy. "
            f"Received: strategy={strategy!r} (of type {type(strategy).__name__})"
        )
    _compat.manage(strategy)
    _patches.install()
    _patches.track(strategy)
    if strategy not in _CONNECTED:
        wait_until_workers_reach_ps(internals.ps_cluster_spec(strategy))
        _CONNECTED.add(strategy)
    return strategy
