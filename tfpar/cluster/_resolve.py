"""resolve(): a validated ClusterResolver from TF_CONFIG, Slurm, a dict or a ClusterSpec."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from tfpar.cluster._net import can_bind, is_local_host, owned_by_this_process
from tfpar.cluster._slurm import slurm_multi_task, slurm_resolver
from tfpar.cluster._tf_config import parse_address, parse_tf_config, short, validate_cluster, validate_task

__all__ = ["ClusterResolver", "resolve"]

#: ``tf.distribute.cluster_resolver.ClusterResolver`` (kept as ``tfpar.cluster.ClusterResolver``).
ClusterResolver = tf.distribute.cluster_resolver.ClusterResolver

_SOURCES = ("tf_config", "slurm")


def resolve(
    cluster: str | Mapping[str, Any] | tf.distribute.cluster_resolver.ClusterResolver | tf.train.ClusterSpec | None = "tf_config",
    *,
    task_type: str | None = None,
    task_id: int | None = None,
    rpc_layer: str = "grpc",
) -> tf.distribute.cluster_resolver.ClusterResolver:
    """Returns a validated ClusterResolver for a multi-worker or parameter-server strategy.

    Args:
        cluster: Where the cluster comes from:

            * ``"tf_config"``: the ``TF_CONFIG`` environment variable, validated first (see
              :func:`parse_tf_config`). Unset means a single process (an empty cluster, as in
              TensorFlow).
            * ``"slurm"``: the Slurm step this process runs in (all tasks are workers; ports
              from 8888 per node).
            * a dict: either a cluster spec ``{"worker": [...], "ps": [...], "chief": [...]}``
              (with `task_type` / `task_id` for this process) or a TF_CONFIG-shaped
              ``{"cluster": ..., "task": ...}``. A ``tf.train.ClusterSpec`` works like a spec dict.
            * a ``tf.distribute.cluster_resolver.ClusterResolver``: returned as-is.
            * None: ``TF_CONFIG`` if it is set, else Slurm if this is a multi-task ``srun``
              step, else a single process.
        task_type: This process's job name, for a cluster spec dict.
        task_id: This process's index in its job, for a cluster spec dict (default 0 when
            `task_type` is given).
        rpc_layer: The protocol, ``"grpc"``.

    Returns:
        A ``TFConfigClusterResolver``, a Slurm resolver or a ``SimpleClusterResolver``.

    Raises:
        TypeError: If `cluster` has an unsupported type.
        ValueError: If the cluster is malformed (see :func:`parse_tf_config`), or this task's
            local port is already taken by another process.
        RuntimeError: For ``"slurm"`` outside an ``srun`` step.

    Example:
    >>> resolver = tfpar.cluster.resolve(
    ...     {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}, task_type="worker", task_id=0)
    >>> resolver.cluster_spec().num_tasks("worker")
    2
    """
    _check_arguments(task_type, task_id, rpc_layer)
    explicit_task = task_type is not None or task_id is not None
    if isinstance(cluster, ClusterResolver):
        if explicit_task:
            raise ValueError(
                "task_type / task_id apply to a cluster spec dict; a ClusterResolver carries its "
                f"own. Received: task_type={task_type!r}, task_id={task_id!r} with "
                f"cluster={type(cluster).__name__}"
            )
        return cluster
    if cluster is None:
        cluster = _default_source()
    if isinstance(cluster, str):
        return _from_environment(cluster, explicit_task, task_type, task_id, rpc_layer)
    if isinstance(cluster, tf.train.ClusterSpec):
        cluster = cluster.as_dict()
    if not isinstance(cluster, Mapping):
        raise TypeError(
            "Expected cluster to be 'tf_config', 'slurm', a dict cluster spec, a "
            "tf.train.ClusterSpec or a tf.distribute.cluster_resolver.ClusterResolver. "
            f"Received: cluster={cluster!r} (of type {type(cluster).__name__})"
        )
    return _from_dict(cluster, explicit_task, task_type, task_id, rpc_layer)


def _check_arguments(task_type: Any, task_id: Any, rpc_layer: Any) -> None:
    if not isinstance(rpc_layer, str) or not rpc_layer:
        raise TypeError(f"Expected rpc_layer to be a string such as 'grpc'. Received: rpc_layer={rpc_layer!r}")
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"Expected task_type to be a string. Received: task_type={task_type!r}")
    if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int)):
        raise TypeError(f"Expected task_id to be an int. Received: task_id={task_id!r}")


def _default_source() -> str:
    """cluster=None: TF_CONFIG if set, else Slurm for a multi-task srun step, else TF_CONFIG."""
    if os.environ.get("TF_CONFIG", "").strip():
        return "tf_config"
    return "slurm" if slurm_multi_task() else "tf_config"


def _from_environment(
    source: str, explicit_task: bool, task_type: str | None, task_id: int | None, rpc_layer: str
) -> tf.distribute.cluster_resolver.ClusterResolver:
    """The resolver of ``"tf_config"`` or ``"slurm"``: the environment describes the task."""
    if source not in _SOURCES:
        raise ValueError(
            f"Unknown cluster source {source!r}. Valid choices: 'tf_config', 'slurm', a dict "
            "cluster spec, a tf.train.ClusterSpec, a ClusterResolver, or None (auto). "
            f"Received: cluster={source!r}"
        )
    if explicit_task:
        raise ValueError(
            f"task_type / task_id apply to a cluster spec dict; cluster={source!r} reads them "
            f"from the environment. Received: task_type={task_type!r}, task_id={task_id!r}"
        )
    if source == "slurm":
        return slurm_resolver(rpc_layer)
    config = parse_tf_config()
    if config:
        _check_own_port(config["cluster"], config["task"]["type"], config["task"]["index"])
    return tf.distribute.cluster_resolver.TFConfigClusterResolver(rpc_layer=rpc_layer)


def _from_dict(
    cluster: Mapping[str, Any], explicit_task: bool, task_type: str | None, task_id: int | None, rpc_layer: str
) -> tf.distribute.cluster_resolver.ClusterResolver:
    """The resolver of a TF_CONFIG-shaped dict, or of a cluster spec dict and this task."""
    if "cluster" in cluster or "task" in cluster:
        if explicit_task:
            raise ValueError(
                'A TF_CONFIG-shaped dict carries its own "task"; do not also pass task_type / '
                f"task_id. Received: task_type={task_type!r}, task_id={task_id!r}"
            )
        config = parse_tf_config(cluster)
        spec, ttype, tid = config["cluster"], config["task"]["type"], config["task"]["index"]
        rpc_layer = config.get("rpc_layer") or rpc_layer
    else:
        received = f"Received: cluster={short(json.dumps(dict(cluster), default=str))}"
        spec = validate_cluster(cluster, what="given", received=received)
        ttype, tid = task_type, task_id
        if ttype is None and tid is not None:
            raise ValueError(f"task_id needs a task_type. Received: task_type=None, task_id={tid}")
        if ttype is not None:
            ttype, tid = validate_task(ttype, 0 if tid is None else tid, spec, received)
    if ttype is not None:
        _check_own_port(spec, ttype, tid)
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(spec), task_type=ttype, task_id=tid, rpc_layer=rpc_layer
    )


def _check_own_port(spec: Mapping[str, Any], ttype: str, index: int) -> None:
    """Raises if this task's local port is held by another process (TF would fail obscurely)."""
    tasks = spec.get(ttype)
    if tasks is None:
        return
    address = tasks[index]
    host, port = parse_address(address, f"{ttype}:{index}", "")
    if not is_local_host(host) or can_bind(port):
        return
    if owned_by_this_process(port):
        return  # e.g. a strategy made earlier in this process already serves this task
    raise ValueError(
        f"Port {port} of this task ({ttype}:{index}, {address}) is already in use by another "
        "process on this machine, so TensorFlow could not start its server there. Stop that "
        "process, or give this task a free port (tfpar launch picks free 127.0.0.1 ports)."
    )
