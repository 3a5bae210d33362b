"""The process's Horovod state: ``init``, ``shutdown``, ``is_initialized`` and the rank queries.

``init()`` reads the cluster that ``tfpar launch``, ``TF_CONFIG`` or Slurm describes
(:mod:`tfpar.cluster`). Without one (or with a one-task cluster) the process is size 1, rank 0, as
under Horovod without ``horovodrun``. With one, it creates the cluster's
``tf.distribute.MultiWorkerMirroredStrategy`` through ``tfpar.get_strategy("multi_worker")``
(tfpar's collective keys and fixes apply; one device per process) and all-gathers each process's
place in the cluster once, so that rank order is the order of TensorFlow's all-gather.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from tfpar import cluster as cluster_lib
from tfpar.horovod._topology import Topology, host_of, ordered_tasks, topology

__all__ = [
    "cross_rank",
    "cross_size",
    "init",
    "is_homogeneous",
    "is_initialized",
    "local_rank",
    "local_size",
    "rank",
    "require",
    "shutdown",
    "size",
    "strategy",
]

NOT_INITIALIZED = "Horovod has not been initialized; use hvd.init()."

_LOCK = threading.Lock()
_TOPOLOGY: Topology | None = None
# The strategy outlives shutdown(): a process can configure TensorFlow's collectives only once.
_STRATEGY: Any = None


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Initializes tfpar.horovod: this process's rank in the cluster, and the collectives.

    Call it first, before TensorFlow runs any operation (it creates the multi-worker strategy,
    which configures TensorFlow's collective runtime). Calling it again is a no-op; after
    :func:`shutdown` it initializes again (with the same strategy).

    On a GPU host whose processes share the GPUs, each process keeps only GPU ``local_rank()``
    (with memory growth), which is what Horovod's examples do by hand after ``hvd.init()``.

    Args:
        comm: Horovod's MPI communicator or list of ranks: not supported (must be None).
        process_sets: Horovod's process sets: not supported (must be None).

    Raises:
        NotImplementedError: If `comm` or `process_sets` is given.
        ValueError: If this process is a ``ps`` or ``evaluator`` task (they do not all-reduce),
            or the cluster definition is malformed.
        RuntimeError: If TensorFlow already ran an operation before a multi-process ``init()``.

    Example:
    >>> import tfpar.horovod as hvd
    >>> hvd.init()
    >>> hvd.size(), hvd.rank()          # (1, 0) without a launcher
    (1, 0)
    """
    global _TOPOLOGY, _STRATEGY
    if comm is not None:
        raise NotImplementedError(
            "hvd.init(comm=...) selects an MPI communicator; tfpar.horovod has no MPI. Every process "
            f"of the cluster (tfpar launch / TF_CONFIG / Slurm) takes part. Received: comm={comm!r}"
        )
    if process_sets is not None:
        raise NotImplementedError(
            "Process sets are not supported by tfpar.horovod: collectives run over all processes of "
            f"the cluster. Received: process_sets={process_sets!r}. Launch a separate job (tfpar "
            "launch) for each group of processes instead."
        )
    with _LOCK:
        if _TOPOLOGY is not None:
            return
        info = cluster_lib.detect()
        if info is None:
            _TOPOLOGY = topology(["localhost"], 0)
            return
        if info.task_type not in ("chief", "worker"):
            raise ValueError(
                "hvd.init() runs on the processes that train (the 'chief' and 'worker' tasks). Received: "
                f"task {info.task_type}:{info.task_index}. Start the script only on chief/worker "
                "tasks (tfpar launch --workers N, without --ps)."
            )
        if _STRATEGY is None:
            _pin_gpu(info)
            from tfpar import strategies

            source = "slurm" if info.source == "slurm" else "tf_config"
            _STRATEGY = strategies.get_strategy("multi_worker", cluster=source)
        _TOPOLOGY = _discover(_STRATEGY)


def _local_index_hint(info: cluster_lib.ClusterInfo) -> int:
    """This process's index among the processes of its host, before the strategy exists."""
    if info.source == "slurm":
        return int(os.environ.get("SLURM_LOCALID", "0"))
    config = cluster_lib.parse_tf_config() or {}
    tasks = ordered_tasks(config.get("cluster", {}))
    mine = [(t, i) for t, i, _ in tasks].index((str(info.task_type), info.task_index))
    host = host_of(tasks[mine][2])
    return sum(1 for _, _, address in tasks[:mine] if host_of(address) == host)


def _pin_gpu(info: cluster_lib.ClusterInfo) -> None:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) <= 1:
        return
    gpu = gpus[_local_index_hint(info) % len(gpus)]
    tf.config.experimental.set_memory_growth(gpu, True)
    tf.config.set_visible_devices(gpu, "GPU")


def _discover(strategy: Any) -> Topology:
    """Ranks in all-gather order: each process all-gathers its place in the cluster's task list."""
    import tensorflow as tf

    from tfpar.horovod import _engine

    devices = strategy.extended.worker_devices
    if len(devices) != 1:
        raise RuntimeError(
            "tfpar.horovod runs one device per process, like Horovod. Received: this process has "
            f"devices {list(devices)}. Make one GPU visible per process (CUDA_VISIBLE_DEVICES)."
        )
    resolver = strategy.cluster_resolver
    tasks = ordered_tasks(resolver.cluster_spec().as_dict())
    mine = [(t, i) for t, i, _ in tasks].index((resolver.task_type, int(resolver.task_id)))
    gathered = _engine.exchange(strategy, [], [tf.constant([mine], tf.int64)])[1][0]
    order = [int(i) for i in gathered.numpy()]
    if sorted(order) != list(range(len(tasks))):
        raise RuntimeError(f"The processes' places in the cluster do not match its task list: {order} vs {tasks}")
    return topology([host_of(tasks[i][2]) for i in order], order.index(mine))


def shutdown() -> None:
    """Marks tfpar.horovod uninitialized (the collective runtime stays: TensorFlow cannot stop it).

    Example:
    >>> hvd.shutdown(); hvd.is_initialized()
    False
    """
    global _TOPOLOGY
    with _LOCK:
        _TOPOLOGY = None


def is_initialized() -> bool:
    """Whether :func:`init` was called (and :func:`shutdown` was not called since).

    Example:
    >>> hvd.is_initialized()
    True
    """
    return _TOPOLOGY is not None


def require() -> Topology:
    """This process's topology; ValueError (Horovod's message) before :func:`init`."""
    if _TOPOLOGY is None:
        raise ValueError(NOT_INITIALIZED)
    return _TOPOLOGY


def strategy() -> Any:
    """The MultiWorkerMirroredStrategy behind the collectives (None when the size is 1)."""
    return _STRATEGY if require().size > 1 else None


def size() -> int:
    """The number of processes (Horovod ranks).

    Example:
    >>> hvd.size()
    2
    """
    return require().size


def rank() -> int:
    """This process's rank, 0 to ``size() - 1`` (rank 0 is the ``chief`` task, else worker 0).

    Example:
    >>> hvd.rank()
    0
    """
    return require().rank


def local_size() -> int:
    """The number of processes on this host.

    Example:
    >>> hvd.local_size()
    2
    """
    return require().local_size


def local_rank() -> int:
    """This process's rank among the processes on its host.

    Example:
    >>> gpus[hvd.local_rank()]
    """
    return require().local_rank


def cross_size() -> int:
    """The number of hosts with a process of this process's local rank.

    Example:
    >>> hvd.cross_size()        # one host
    1
    """
    return require().cross_size


def cross_rank() -> int:
    """This process's rank among the processes with its local rank (its host's index).

    Example:
    >>> hvd.cross_rank()
    0
    """
    return require().cross_rank


def is_homogeneous() -> bool:
    """Whether every host runs the same number of processes.

    Example:
    >>> hvd.is_homogeneous()
    True
    """
    return require().is_homogeneous
