"""local_cluster(): in-process worker and ps servers on 127.0.0.1, for notebooks and tests."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from tfpar.cluster._net import free_ports

__all__ = ["local_cluster"]

_LOCAL_LOCK = threading.Lock()
_LOCAL_CLUSTER: dict[str, Any] = {}  # {"shape": (w, ps, chief), "spec": {...}, "servers": [...]}


def local_cluster(
    workers: int = 2, ps: int = 1, chief: bool = False
) -> tf.distribute.cluster_resolver.ClusterResolver:
    """Starts an in-process cluster of worker and ps servers on 127.0.0.1.

    For notebooks and tests of ``tfpar.scope("parameter_server")``: this is the TF
    parameter-server tutorial's ``create_in_process_cluster`` as a supported function. Each
    server gets ``inter_op_parallelism_threads = workers + 1``: with fewer, an in-process
    2-worker + 1-ps cluster hangs forever on a 2-core machine (b/172296720).

    TensorFlow cannot shut an in-process server down, so the servers live until the process
    exits. Calling this again with the same shape returns the same cluster; a different shape
    raises RuntimeError (restart the Python process or notebook kernel). For clusters you can
    stop or kill, use ``tfpar launch --workers N --ps M`` (separate processes).

    Security: the servers run inside this process (a notebook kernel, a test), so they cannot be
    put in a private network namespace the way ``tfpar launch`` does by default. TensorFlow binds
    them to every interface (``0.0.0.0``/``[::]``) and they accept unauthenticated requests, so
    any host that can reach this machine can run graphs in this process for as long as it lives
    (in-process servers cannot be stopped). Use ``local_cluster`` only on a machine other hosts
    cannot reach (a host firewall that blocks the ports, or a laptop off shared networks). For
    loopback-only parameter servers, use ``tfpar launch --workers N --ps M -- python train.py``,
    or ``tfpar.launch([...], workers=N, ps=M)`` from a notebook.

    Args:
        workers: Number of worker servers, >= 1.
        ps: Number of parameter servers, >= 0 (ParameterServerStrategy needs >= 1).
        chief: Whether the cluster spec also names this process as the ``"chief"`` task
            (on a reserved 127.0.0.1 port). Either way this process is the coordinator: with
            False (the TF tutorial's layout) the resolver's task_type is None and TensorFlow
            adds the chief job itself when a strategy connects; with True the task_type is
            ``"chief"`` and task_id 0.

    Returns:
        A ``tf.distribute.cluster_resolver.SimpleClusterResolver`` with rpc_layer ``"grpc"``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If `workers` < 1 or `ps` < 0.
        RuntimeError: If this process already has a local cluster of a different shape, or the
            servers cannot start.

    Example:
    >>> resolver = tfpar.local_cluster(workers=2, ps=1)
    >>> strategy = tf.distribute.ParameterServerStrategy(resolver)
    >>> coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    """
    _check_shape(workers, ps, chief)
    shape = (workers, ps, chief)
    with _LOCAL_LOCK:
        if _LOCAL_CLUSTER:
            if _LOCAL_CLUSTER["shape"] != shape:
                w, p, c = _LOCAL_CLUSTER["shape"]
                raise RuntimeError(
                    f"This process already runs an in-process cluster with workers={w}, ps={p}, "
                    f"chief={c}, and TensorFlow cannot shut in-process servers down. Restart the "
                    "Python process (or notebook kernel) to get a cluster with "
                    f"workers={workers}, ps={ps}, chief={chief}, or call "
                    f"tfpar.local_cluster(workers={w}, ps={p}, chief={c}) to reuse the running one."
                )
            return _local_resolver(_LOCAL_CLUSTER["spec"], chief)
        spec = _local_spec(workers, ps, chief)
        _start_servers(spec, shape)
        return _local_resolver(spec, chief)


def _check_shape(workers: Any, ps: Any, chief: Any) -> None:
    for name, value in (("workers", workers), ("ps", ps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"Expected {name} to be an int. Received: {name}={value!r} "
                f"(of type {type(value).__name__})"
            )
    if not isinstance(chief, bool):
        raise TypeError(f"Expected chief to be a bool. Received: chief={chief!r}")
    if workers < 1:
        raise ValueError(f"Expected workers >= 1. Received: workers={workers}")
    if ps < 0:
        raise ValueError(f"Expected ps >= 0. Received: ps={ps}")


def _local_spec(workers: int, ps: int, chief: bool) -> dict[str, list[str]]:
    """A cluster spec on free 127.0.0.1 ports."""
    ports = free_ports(workers + ps + int(chief))
    spec: dict[str, list[str]] = {"worker": [f"127.0.0.1:{p}" for p in ports[:workers]]}
    if ps:
        spec["ps"] = [f"127.0.0.1:{p}" for p in ports[workers : workers + ps]]
    if chief:
        spec["chief"] = [f"127.0.0.1:{ports[-1]}"]
    return spec


def _start_servers(spec: dict[str, list[str]], shape: tuple[int, int, bool]) -> None:
    """Starts the worker and ps servers of `spec` and records them (call with the lock held)."""
    threads = shape[0] + 1
    worker_config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=threads)
    ps_config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=threads)
    ps_config.device_count["GPU"] = 0
    cluster_spec = tf.train.ClusterSpec(spec)
    servers = []
    try:
        for job, config in (("worker", worker_config), ("ps", ps_config)):
            for index in range(len(spec.get(job, ()))):
                servers.append(
                    tf.distribute.Server(
                        cluster_spec,
                        job_name=job,
                        task_index=index,
                        protocol="grpc",
                        config=config,
                        start=True,
                    )
                )
    except tf.errors.OpError as error:
        # Started servers cannot be stopped; keep them referenced and report the shape.
        _LOCAL_CLUSTER.update(shape=shape, spec=spec, servers=servers, broken=True)
        raise RuntimeError(
            f"Could not start the in-process cluster {spec}: {error.message}. Restart the "
            "process (a port may have been taken between picking and binding) and retry."
        ) from error
    _LOCAL_CLUSTER.update(shape=shape, spec=spec, servers=servers)


def _local_resolver(spec: Mapping[str, list[str]], chief: bool) -> tf.distribute.cluster_resolver.ClusterResolver:
    if _LOCAL_CLUSTER.get("broken"):
        raise RuntimeError(
            "The in-process cluster of this process failed to start earlier; restart the Python "
            "process (or notebook kernel) and call tfpar.local_cluster() again."
        )
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(dict(spec)),
        task_type="chief" if chief else None,
        task_id=0 if chief else None,
        rpc_layer="grpc",
    )


def in_process_spec() -> dict[str, list[str]] | None:
    """The cluster spec of this process's in-process cluster (:func:`local_cluster`), or None."""
    return dict(_LOCAL_CLUSTER["spec"]) if _LOCAL_CLUSTER else None
