"""Cluster discovery and validation, in-process local clusters, and task role helpers.

A multi-worker or parameter-server job learns its cluster from one of three places:

* ``TF_CONFIG`` (TensorFlow's JSON environment variable, set by ``tfpar launch``, Kubeflow,
  Vertex AI, SageMaker ...). :func:`resolve` validates it *before* TensorFlow reads it, so a typo
  gives a clear error instead of a hang or an opaque gRPC failure.
* Slurm (``srun`` sets ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST`` and
  ``SLURM_STEP_TASKS_PER_NODE``).
* An explicit dict, ``tf.train.ClusterSpec`` or ``ClusterResolver``.

:func:`detect` tells strategy ``"auto"`` whether this process is part of a multi-process job;
:func:`task_type`, :func:`task_index` and :func:`is_chief` tell a script its role;
:func:`write_path` and :func:`cleanup_write_path` implement the TF multi-worker tutorial's
"chief writes the real file, the others write a temporary sibling" rule.

:func:`local_cluster` starts in-process worker and ps servers on 127.0.0.1 for notebooks and
tests (a supported version of the TF parameter-server tutorial's ``create_in_process_cluster``).

Security note: TensorFlow's gRPC servers have no authentication, and TensorFlow always *listens*
on every interface (``0.0.0.0``/``[::]``: the bind address is hard-coded in TensorFlow's
``grpc_server_lib.cc``; only the port comes from the cluster spec). tfpar puts only 127.0.0.1
addresses in the clusters it makes, so all traffic stays on loopback, but the ports are reachable
from other hosts unless a firewall blocks them. :func:`listening_addresses` shows what listens.
For separate processes, ``tfpar launch --isolate-network`` (``tfpar.launch(...,
isolate_network=True)``) runs the tasks in a private loopback-only network namespace, where the
servers are unreachable from other hosts; in-process servers (:func:`local_cluster`) cannot be
isolated that way.

Nothing in this module runs a TensorFlow op at import time.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import tensorflow as tf


__all__ = [
    "ClusterInfo",
    "JOB_NAMES",
    "SLURM_VARIABLES",
    "cleanup_write_path",
    "detect",
    "free_ports",
    "is_chief",
    "listening_addresses",
    "local_cluster",
    "parse_tf_config",
    "resolve",
    "task_index",
    "task_type",
    "write_path",
]

ClusterResolver = tf.distribute.cluster_resolver.ClusterResolver

#: Job names TensorFlow's distribution strategies accept in a cluster spec.
JOB_NAMES = ("chief", "worker", "ps", "evaluator")

#: The Slurm variables ``resolve("slurm")`` needs (``srun`` sets them for each task).
SLURM_VARIABLES = (
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NODELIST",
    "SLURM_STEP_TASKS_PER_NODE",
)

_SOURCES = ("tf_config", "slurm")
_TF_CONFIG_KEYS = ("cluster", "task", "rpc_layer", "environment", "session_master")
_ADDRESS_RE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d+)$")
_SLURM_PORT_BASE = 8888


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """What :func:`detect` found about the multi-process job this process belongs to.

    Attributes:
        source: Where the cluster came from: ``"tf_config"`` or ``"slurm"``.
        num_workers: Number of ``"worker"`` tasks (the chief is not counted).
        num_ps: Number of ``"ps"`` (parameter server) tasks.
        has_chief: Whether there is a separate ``"chief"`` task.
        task_type: This process's task type (``"chief"``, ``"worker"``, ``"ps"``, ``"evaluator"``).
        task_index: This process's index within its task type.

    Example:
    >>> info = tfpar.cluster.detect()
    >>> info is None or info.num_workers >= 1
    True
    """

    source: str
    num_workers: int
    num_ps: int
    has_chief: bool
    task_type: str | None
    task_index: int

    @property
    def is_chief(self) -> bool:
        """Whether this process is the chief (the ``chief`` task, else worker 0)."""
        return _is_chief_role(self.task_type, self.task_index, self.has_chief)


# --------------------------------------------------------------------------------------------
# TF_CONFIG parsing and validation
# --------------------------------------------------------------------------------------------


def parse_tf_config(tf_config: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Parses and validates a ``TF_CONFIG`` value without touching TensorFlow.

    Args:
        tf_config: The JSON text or an already-decoded dict. None reads the ``TF_CONFIG``
            environment variable.

    Returns:
        A normalized copy: ``{"cluster": {job: [address, ...]}, "task": {"type": str,
        "index": int}}`` plus any other keys that were given. An unset, empty or ``{}``
        ``TF_CONFIG`` (a single process) gives ``{}``.

    Raises:
        TypeError: If `tf_config` is neither a string nor a mapping.
        ValueError: If the JSON is malformed (the message shows the position), ``"cluster"`` or
            ``"task"`` is missing, a job name is unknown, the task type is not in the cluster,
            the index is out of range, an address is not ``host:port``, or two tasks share an
            address or a local port.

    Example:
    >>> tfpar.cluster.parse_tf_config(
    ...     '{"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]},'
    ...     ' "task": {"type": "worker", "index": 1}}')["task"]
    {'type': 'worker', 'index': 1}
    """
    if tf_config is None:
        tf_config = os.environ.get("TF_CONFIG", "")
    if isinstance(tf_config, str):
        text = tf_config
        if not text.strip():
            return {}
        try:
            config = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"TF_CONFIG is not valid JSON: {error.msg} at line {error.lineno} column "
                f"{error.colno} (char {error.pos}):\n{_caret(text, error.pos)}\n"
                f"Expected a JSON object such as {_EXAMPLE}. Received: TF_CONFIG={_short(text)}"
            ) from None
    elif isinstance(tf_config, Mapping):
        config = tf_config
    else:
        raise TypeError(
            "Expected TF_CONFIG to be a JSON string or a dict. "
            f"Received: tf_config={tf_config!r} (of type {type(tf_config).__name__})"
        )
    if not isinstance(config, Mapping):
        raise ValueError(
            f"Expected TF_CONFIG to be a JSON object such as {_EXAMPLE}. "
            f"Received: TF_CONFIG={_short(json.dumps(config))}"
        )
    if not config:
        return {}
    received = f"Received: TF_CONFIG={_short(json.dumps(config, default=str))}"
    for required in ("cluster", "task"):
        if required not in config:
            close = difflib.get_close_matches(required, [str(k) for k in config], n=1)
            hint = f" Found {close[0]!r}: did you mean {required!r}?" if close else ""
            raise ValueError(
                f'TF_CONFIG has no "{required}" key.{hint} Expected an object with "cluster" '
                f'(job name -> list of "host:port") and "task" ({{"type": ..., "index": ...}}), '
                f"e.g. {_EXAMPLE}. {received}"
            )
    cluster = _validate_cluster(config["cluster"], what="TF_CONFIG", received=received)
    task = config["task"]
    if not isinstance(task, Mapping) or "type" not in task:
        raise ValueError(
            'Expected TF_CONFIG["task"] to be an object such as {"type": "worker", "index": 0}. '
            f"{received}"
        )
    ttype, tindex = _validate_task(task.get("type"), task.get("index", 0), cluster, received)
    normalized = {k: v for k, v in config.items() if k not in ("cluster", "task")}
    normalized["cluster"] = cluster
    normalized["task"] = {**{k: v for k, v in task.items()}, "type": ttype, "index": tindex}
    return normalized


_EXAMPLE = (
    '{"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _caret(text: str, pos: int, width: int = 36) -> str:
    start = max(0, pos - width)
    snippet = text[start : pos + width].replace("\n", " ").replace("\t", " ")
    return f"    {snippet}\n    {' ' * (pos - start)}^"


def _validate_cluster(cluster: Any, *, what: str, received: str) -> dict[str, Any]:
    """Checks a cluster dict; returns a normalized copy (lists, or {int: address} for sparse jobs)."""
    if isinstance(cluster, tf.train.ClusterSpec):
        cluster = cluster.as_dict()
    if not isinstance(cluster, Mapping) or not cluster:
        raise ValueError(
            f'Expected the {what} cluster to be a non-empty object mapping job names to lists of '
            f'"host:port" addresses, e.g. {{"worker": ["127.0.0.1:12345"]}}. {received}'
        )
    normalized: dict[str, Any] = {}
    seen: dict[str, str] = {}  # address -> "job:index"
    local_ports: dict[int, tuple[str, str]] = {}  # port -> ("job:index", address)
    for job, tasks in cluster.items():
        if job not in JOB_NAMES:
            close = difflib.get_close_matches(str(job), JOB_NAMES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown job name {job!r} in the {what} cluster.{hint} Valid job names: "
                f"{', '.join(JOB_NAMES)}. {received}"
            )
        if isinstance(tasks, str):
            tasks = [tasks]
        if isinstance(tasks, Mapping):
            try:
                indexed = {int(k): v for k, v in tasks.items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"Expected the task indices of job {job!r} to be integers. {received}"
                ) from None
            normalized[job] = indexed
            items = sorted(indexed.items())
        elif isinstance(tasks, (list, tuple)):
            normalized[job] = list(tasks)
            items = list(enumerate(tasks))
        else:
            raise ValueError(
                f'Expected job {job!r} to be a list of "host:port" addresses. {received}'
            )
        if not items:
            raise ValueError(f"Job {job!r} has no tasks; remove it or add addresses. {received}")
        if job in ("chief", "evaluator") and len(items) > 1:
            raise ValueError(
                f"A cluster may have at most one {job!r} task; found {len(items)}. {received}"
            )
        for index, address in items:
            name = f"{job}:{index}"
            host, port = _parse_address(address, name, received)
            if address in seen:
                raise ValueError(
                    f"Tasks {seen[address]} and {name} have the same address {address!r}: every "
                    f"task needs its own host:port. {received}"
                )
            seen[address] = name
            if _is_local_host(host):
                if port in local_ports:
                    other, other_address = local_ports[port]
                    raise ValueError(
                        f"Port clash: tasks {other} ({other_address}) and {name} ({address}) both "
                        f"use port {port} on this machine. Give each local task its own port "
                        f"(tfpar launch picks free ones). {received}"
                    )
                local_ports[port] = (name, address)
    return normalized


def _parse_address(address: Any, name: str, received: str) -> tuple[str, int]:
    if not isinstance(address, str):
        raise ValueError(
            f'Expected the address of task {name} to be a "host:port" string. '
            f"Received: {address!r}. {received}"
        )
    fix = ""
    if "://" in address:
        fix = " Remove the scheme: TF_CONFIG addresses are plain host:port (no 'grpc://')."
    match = _ADDRESS_RE.match(address)
    port = int(match.group("port")) if match else -1
    if not match or not 1 <= port <= 65535:
        raise ValueError(
            f'Expected the address of task {name} to be "host:port" with a port in 1..65535, '
            f"e.g. '127.0.0.1:12345' or '[::1]:12345'.{fix} Received: address={address!r}. "
            f"{received}"
        )
    return match.group("host").strip("[]"), port


def _is_local_host(host: str) -> bool:
    host = host.lower()
    if host in ("localhost", "::1", "0.0.0.0", "::", "ip6-localhost") or host.startswith("127."):
        return True
    try:
        return host == socket.gethostname().lower()
    except OSError:
        return False


def _validate_task(ttype: Any, tindex: Any, cluster: Mapping[str, Any], received: str):
    if ttype not in JOB_NAMES:
        raise ValueError(
            f"Unknown task type {ttype!r}. Valid task types: {', '.join(JOB_NAMES)}. {received}"
        )
    if isinstance(tindex, bool) or not isinstance(tindex, (int, str)):
        raise ValueError(f"Expected the task index to be an integer. Received: {tindex!r}. {received}")
    try:
        tindex = int(tindex)
    except ValueError:
        raise ValueError(
            f"Expected the task index to be an integer. Received: {tindex!r}. {received}"
        ) from None
    if tindex < 0:
        raise ValueError(f"Expected the task index to be >= 0. Received: {tindex}. {received}")
    if ttype not in cluster:
        if ttype == "evaluator":  # TensorFlow allows an evaluator outside the cluster
            return ttype, tindex
        raise ValueError(
            f"Task type {ttype!r} is not a job of the cluster; the cluster has "
            f"{', '.join(repr(j) for j in cluster)}. Set the task type to one of them. {received}"
        )
    tasks = cluster[ttype]
    indices = sorted(tasks) if isinstance(tasks, Mapping) else list(range(len(tasks)))
    if tindex not in indices:
        valid = f"0..{len(tasks) - 1}" if not isinstance(tasks, Mapping) else str(indices)
        raise ValueError(
            f"Task index {tindex} is out of range: job {ttype!r} has {len(tasks)} task(s), "
            f"valid indices are {valid}. {received}"
        )
    return ttype, tindex


# --------------------------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------------------------


def _slurm_env() -> dict[str, str]:
    missing = [name for name in SLURM_VARIABLES if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            "Slurm cluster discovery needs the variables that srun sets for each task: "
            f"{', '.join(SLURM_VARIABLES)}. Missing: {', '.join(missing)}. Start the script with "
            "`srun python train.py` inside an allocation (sbatch or salloc alone do not set the "
            "SLURM_STEP_* variables), or pass cluster='tf_config' or a dict cluster spec instead."
        )
    values = {name: os.environ[name] for name in SLURM_VARIABLES}
    for name in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        if not values[name].isdigit():
            raise ValueError(
                f"Expected {name} to be a non-negative integer. Received: {name}={values[name]!r}"
            )
    if int(values["SLURM_PROCID"]) >= int(values["SLURM_STEP_NUM_TASKS"]):
        raise ValueError(
            "Expected SLURM_PROCID < SLURM_STEP_NUM_TASKS. Received: "
            f"SLURM_PROCID={values['SLURM_PROCID']}, "
            f"SLURM_STEP_NUM_TASKS={values['SLURM_STEP_NUM_TASKS']}"
        )
    return values


class _SlurmClusterResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
    """TensorFlow's SlurmClusterResolver, fixed for CPU-only nodes and side-effect free.

    Upstream asks ``nvidia-smi`` for the GPU count (which crashes when it is missing), lays out
    tasks with ``range(0, gpus_per_node, gpus_per_task)`` (no tasks at all with 0 GPUs) and writes
    ``CUDA_VISIBLE_DEVICES`` into ``os.environ`` on every ``cluster_spec()`` call. Here the layout
    uses one slot per task, no environment variable is written, and ``num_accelerators`` reports
    the GPUs this task can see (give each task its own with ``srun --gpus-per-task``).
    """

    def __init__(self, *, port_base: int = _SLURM_PORT_BASE, rpc_layer: str = "grpc") -> None:
        num_tasks = int(os.environ["SLURM_STEP_NUM_TASKS"])
        super().__init__(
            port_base=port_base,
            gpus_per_node=num_tasks,
            gpus_per_task=1,
            auto_set_gpu=False,
            rpc_layer=rpc_layer,
        )
        self._visible_gpus = len(tf.config.list_physical_devices("GPU"))
        self.cluster_spec()  # sets task_type / task_id

    def num_accelerators(self, task_type=None, task_id=None, config_proto=None):  # noqa: D102
        del task_type, task_id, config_proto
        return {"GPU": self._visible_gpus} if self._visible_gpus else {}


# --------------------------------------------------------------------------------------------
# resolve / detect
# --------------------------------------------------------------------------------------------


def resolve(
    cluster: str | Mapping[str, Any] | ClusterResolver | tf.train.ClusterSpec | None = "tf_config",
    *,
    task_type: str | None = None,
    task_id: int | None = None,
    rpc_layer: str = "grpc",
) -> ClusterResolver:
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
    if not isinstance(rpc_layer, str) or not rpc_layer:
        raise TypeError(f"Expected rpc_layer to be a string such as 'grpc'. Received: rpc_layer={rpc_layer!r}")
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"Expected task_type to be a string. Received: task_type={task_type!r}")
    if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int)):
        raise TypeError(f"Expected task_id to be an int. Received: task_id={task_id!r}")
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
        if os.environ.get("TF_CONFIG", "").strip():
            cluster = "tf_config"
        elif _slurm_multi_task():
            cluster = "slurm"
        else:
            cluster = "tf_config"
    if isinstance(cluster, str):
        if cluster not in _SOURCES:
            raise ValueError(
                f"Unknown cluster source {cluster!r}. Valid choices: 'tf_config', 'slurm', a dict "
                "cluster spec, a tf.train.ClusterSpec, a ClusterResolver, or None (auto). "
                f"Received: cluster={cluster!r}"
            )
        if explicit_task:
            raise ValueError(
                f"task_type / task_id apply to a cluster spec dict; cluster={cluster!r} reads them "
                f"from the environment. Received: task_type={task_type!r}, task_id={task_id!r}"
            )
        if cluster == "slurm":
            values = _slurm_env()
            try:
                return _SlurmClusterResolver(rpc_layer=rpc_layer)
            except (RuntimeError, ValueError, IndexError) as error:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise ValueError(
                    f"The Slurm variables do not describe a consistent job step: {error}. "
                    f"Expected SLURM_STEP_TASKS_PER_NODE (e.g. '2(x3),1') to add up to "
                    f"SLURM_STEP_NUM_TASKS over the nodes of SLURM_STEP_NODELIST (e.g. "
                    f"'node[01-04]'). Received: {shown}"
                ) from error
        config = parse_tf_config()
        if config:
            _check_own_port(config["cluster"], config["task"]["type"], config["task"]["index"])
        return tf.distribute.cluster_resolver.TFConfigClusterResolver(rpc_layer=rpc_layer)
    if isinstance(cluster, tf.train.ClusterSpec):
        cluster = cluster.as_dict()
    if not isinstance(cluster, Mapping):
        raise TypeError(
            "Expected cluster to be 'tf_config', 'slurm', a dict cluster spec, a "
            "tf.train.ClusterSpec or a tf.distribute.cluster_resolver.ClusterResolver. "
            f"Received: cluster={cluster!r} (of type {type(cluster).__name__})"
        )
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
        received = f"Received: cluster={_short(json.dumps(dict(cluster), default=str))}"
        spec = _validate_cluster(cluster, what="given", received=received)
        ttype, tid = task_type, task_id
        if ttype is None and tid is not None:
            raise ValueError(f"task_id needs a task_type. Received: task_type=None, task_id={tid}")
        if ttype is not None:
            ttype, tid = _validate_task(ttype, 0 if tid is None else tid, spec, received)
    if ttype is not None:
        _check_own_port(spec, ttype, tid)
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(spec), task_type=ttype, task_id=tid, rpc_layer=rpc_layer
    )


def _slurm_multi_task() -> bool:
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    return bool(os.environ.get("SLURM_PROCID")) and tasks.isdigit() and int(tasks) > 1


def detect() -> ClusterInfo | None:
    """Describes the multi-process job this process is part of, or None on a single machine.

    ``TF_CONFIG`` wins over Slurm. A cluster counts as multi-process when it has a ps task or
    more than one worker/chief task. Strategy ``"auto"`` uses this to pick ``"multi_worker"``
    or ``"parameter_server"``.

    Returns:
        A :class:`ClusterInfo`, or None when neither ``TF_CONFIG`` nor a multi-task Slurm step
        describes more than one process.

    Raises:
        ValueError: If ``TF_CONFIG`` or the Slurm variables are set but malformed.
        RuntimeError: If a multi-task Slurm step lacks some of :data:`SLURM_VARIABLES`.

    Example:
    >>> info = tfpar.cluster.detect()
    >>> "single process" if info is None else f"{info.num_workers} workers"
    'single process'
    """
    config = parse_tf_config()
    if config:
        jobs = config["cluster"]
        info = ClusterInfo(
            source="tf_config",
            num_workers=len(jobs.get("worker", ())),
            num_ps=len(jobs.get("ps", ())),
            has_chief="chief" in jobs,
            task_type=config["task"]["type"],
            task_index=config["task"]["index"],
        )
        multi = info.num_ps > 0 or info.num_workers + int(info.has_chief) > 1
        return info if multi else None
    if _slurm_multi_task():
        values = _slurm_env()
        return ClusterInfo(
            source="slurm",
            num_workers=int(values["SLURM_STEP_NUM_TASKS"]),
            num_ps=0,
            has_chief=False,
            task_type="worker",
            task_index=int(values["SLURM_PROCID"]),
        )
    return None


# --------------------------------------------------------------------------------------------
# Task roles
# --------------------------------------------------------------------------------------------


def _role(cluster: ClusterResolver | None) -> tuple[str | None, int, bool]:
    """(task type, task index, has a chief job) of this process."""
    if cluster is not None:
        if not isinstance(cluster, ClusterResolver):
            raise TypeError(
                "Expected cluster to be a tf.distribute.cluster_resolver.ClusterResolver or None "
                f"(read TF_CONFIG / Slurm). Received: cluster={cluster!r}"
            )
        spec = cluster.cluster_spec()
        jobs = spec.jobs if spec else []
        ttype = cluster.task_type
        return ttype, int(cluster.task_id or 0), "chief" in jobs
    info = detect()
    if info is None:
        config = parse_tf_config()
        if config:  # a one-task TF_CONFIG
            return config["task"]["type"], config["task"]["index"], "chief" in config["cluster"]
        return None, 0, False
    return info.task_type, info.task_index, info.has_chief


def _is_chief_role(ttype: str | None, index: int, has_chief: bool) -> bool:
    if ttype is None:
        return True
    if ttype == "chief":
        return True
    return ttype == "worker" and index == 0 and not has_chief


def task_type(cluster: ClusterResolver | None = None) -> str | None:
    """This process's task type, or None when it is not part of a cluster.

    Args:
        cluster: A ClusterResolver to read the role from; None reads ``TF_CONFIG`` / Slurm.

    Example:
    >>> tfpar.cluster.task_type() is None  # a single process
    True
    """
    return _role(cluster)[0]


def task_index(cluster: ClusterResolver | None = None) -> int:
    """This process's index within its task type (0 for a single process).

    Args:
        cluster: A ClusterResolver to read the role from; None reads ``TF_CONFIG`` / Slurm.

    Example:
    >>> tfpar.cluster.task_index()
    0
    """
    return _role(cluster)[1]


def is_chief(cluster: ClusterResolver | None = None) -> bool:
    """Whether this process is the chief: the ``"chief"`` task, else worker 0.

    A process outside any cluster (no ``TF_CONFIG``, no multi-task Slurm step) is the chief.
    ``ps`` and ``evaluator`` tasks never are.

    Args:
        cluster: A ClusterResolver to read the role from; None reads ``TF_CONFIG`` / Slurm.

    Example:
    >>> tfpar.cluster.is_chief()
    True
    """
    return _is_chief_role(*_role(cluster))


def write_path(path: str | os.PathLike, *, cluster: ClusterResolver | None = None) -> str:
    """Where this process should write `path`: the path itself on the chief, a temporary sibling elsewhere.

    Under MultiWorkerMirroredStrategy every worker must take part in a save (reading mirrored
    variables all-reduces), but only one may write the real file. As in the TF multi-worker
    tutorial, the chief gets `path` and worker ``i`` gets ``<dir>/workertemp_<i>/<name>``
    (the directory is created). Remove it afterwards with :func:`cleanup_write_path`.

    Args:
        path: The file or directory the job should produce.
        cluster: A ClusterResolver to read the role from; None reads ``TF_CONFIG`` / Slurm.

    Returns:
        The path this process writes to.

    Example:
    >>> tfpar.cluster.write_path("/tmp/run/model.keras")  # on the chief
    '/tmp/run/model.keras'
    """
    path = _check_path(path)
    ttype, index, has_chief = _role(cluster)
    if _is_chief_role(ttype, index, has_chief):
        return path
    temp_dir = _temp_dir(path, index)
    tf.io.gfile.makedirs(temp_dir)
    return os.path.join(temp_dir, os.path.basename(path.rstrip("/\\")) or "output")


def cleanup_write_path(path: str | os.PathLike, *, cluster: ClusterResolver | None = None) -> None:
    """Removes the temporary directory :func:`write_path` made for this process (no-op on the chief).

    Args:
        path: The same path that was given to :func:`write_path`.
        cluster: A ClusterResolver to read the role from; None reads ``TF_CONFIG`` / Slurm.

    Example:
    >>> target = tfpar.cluster.write_path("/tmp/run/model.keras")
    >>> tfpar.cluster.cleanup_write_path("/tmp/run/model.keras")
    """
    path = _check_path(path)
    ttype, index, has_chief = _role(cluster)
    if _is_chief_role(ttype, index, has_chief):
        return
    temp_dir = _temp_dir(path, index)
    if tf.io.gfile.exists(temp_dir):
        tf.io.gfile.rmtree(temp_dir)


def _check_path(path: Any) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise TypeError(f"Expected a non-empty path string. Received: path={path!r}")
    return path


def _temp_dir(path: str, index: int) -> str:
    return os.path.join(os.path.dirname(path.rstrip("/\\")), f"workertemp_{index}")


# --------------------------------------------------------------------------------------------
# Ports and listening sockets
# --------------------------------------------------------------------------------------------


def _check_own_port(spec: Mapping[str, Any], ttype: str, index: int) -> None:
    """Raises if this task's local port is held by another process (TF would fail obscurely)."""
    tasks = spec.get(ttype)
    if tasks is None:
        return
    address = tasks[index]
    host, port = _parse_address(address, f"{ttype}:{index}", "")
    if not _is_local_host(host) or _can_bind(port):
        return
    if _owned_by_this_process(port):
        return  # e.g. a strategy made earlier in this process already serves this task
    raise ValueError(
        f"Port {port} of this task ({ttype}:{index}, {address}) is already in use by another "
        "process on this machine, so TensorFlow could not start its server there. Stop that "
        "process, or give this task a free port (tfpar launch picks free 127.0.0.1 ports)."
    )


def _can_bind(port: int) -> bool:
    """Whether TensorFlow's wildcard listener could bind `port` right now."""
    families = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    for family, address in families:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            return True
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
        finally:
            sock.close()
    return True


def _owned_by_this_process(port: int) -> bool:
    if not sys.platform.startswith("linux"):
        return True  # cannot tell: do not raise a false alarm
    inodes = {inode for _, inode in _listening_sockets().get(port, [])}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False


def _listening_sockets() -> dict[int, list[tuple[str, int]]]:
    """port -> [(local address, socket inode)] for TCP sockets in LISTEN state (Linux /proc)."""
    result: dict[int, list[tuple[str, int]]] = {}
    for name, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(name, encoding="ascii") as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A = LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = socket.inet_ntop(family, raw)
            ip = f"[{ip}]" if family == socket.AF_INET6 else ip
            result.setdefault(int(hex_port, 16), []).append((ip, int(fields[9])))
    return result


def listening_addresses(ports: Iterable[int]) -> dict[int, list[str]]:
    """The local addresses on which each port has a listening TCP socket (Linux only).

    Use it to see what a cluster exposes: ``127.0.0.1:p`` / ``[::1]:p`` are loopback only,
    ``0.0.0.0:p`` / ``[::]:p`` accept connections from other hosts.

    Args:
        ports: TCP port numbers.

    Returns:
        ``{port: ["<address>:<port>", ...]}``, an empty list for a port nobody listens on (in
        this network namespace).

    Raises:
        RuntimeError: On systems without ``/proc/net/tcp``.

    Example:
    >>> tfpar.cluster.listening_addresses([1])
    {1: []}
    """
    if not os.path.exists("/proc/net/tcp"):
        raise RuntimeError(
            "listening_addresses() reads /proc/net/tcp, which exists on Linux only. "
            f"Received: platform={sys.platform!r}. Use `ss -ltn` or `netstat -an` instead."
        )
    table = _listening_sockets()
    ports = [int(p) for p in ports]
    return {p: sorted({f"{ip}:{p}" for ip, _ in table.get(p, [])}) for p in ports}


def free_ports(count: int) -> list[int]:
    """Picks `count` distinct TCP ports that are free right now (with portpicker).

    The ports are not reserved: bind them soon. Used for the 127.0.0.1 clusters tfpar makes.

    Args:
        count: How many ports, >= 1.

    Returns:
        Distinct port numbers.

    Raises:
        RuntimeError: If not enough free ports can be found.

    Example:
    >>> len(set(tfpar.cluster.free_ports(3)))
    3
    """
    import portpicker

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"Expected count to be an int >= 1. Received: count={count!r}")

    ports: list[int] = []
    while len(ports) < count:
        try:
            port = portpicker.pick_unused_port()
        except portpicker.NoFreePortFoundError as error:  # type: ignore[attr-defined]
            raise RuntimeError(
                f"Could not find {count} free TCP ports on 127.0.0.1 (found {len(ports)}). "
                "Free some ports or retry."
            ) from error
        if port not in ports:
            ports.append(port)
    return ports


# --------------------------------------------------------------------------------------------
# In-process local cluster
# --------------------------------------------------------------------------------------------

_LOCAL_LOCK = threading.Lock()
_LOCAL_CLUSTER: dict[str, Any] = {}  # {"shape": (w, ps, chief), "spec": {...}, "servers": [...]}


def local_cluster(workers: int = 2, ps: int = 1, chief: bool = False) -> ClusterResolver:
    """Starts an in-process cluster of worker and ps servers on 127.0.0.1.

    For notebooks and tests of ``tfpar.scope("parameter_server")``: this is the TF
    parameter-server tutorial's ``create_in_process_cluster`` as a supported function. Each
    server gets ``inter_op_parallelism_threads = workers + 1``: with fewer, an in-process
    2-worker + 1-ps cluster hangs forever on a 2-core machine (b/172296720).

    TensorFlow cannot shut an in-process server down, so the servers live until the process
    exits. Calling this again with the same shape returns the same cluster; a different shape
    raises RuntimeError (restart the Python process or notebook kernel). For clusters you can
    stop or kill, use ``tfpar launch --workers N --ps M`` (separate processes).

    The addresses are 127.0.0.1 only, but TensorFlow's servers listen on all interfaces and have
    no authentication: run on a trusted network or behind a firewall (see the module docstring).

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
        ports = free_ports(workers + ps + int(chief))
        spec: dict[str, list[str]] = {"worker": [f"127.0.0.1:{p}" for p in ports[:workers]]}
        if ps:
            spec["ps"] = [f"127.0.0.1:{p}" for p in ports[workers : workers + ps]]
        if chief:
            spec["chief"] = [f"127.0.0.1:{ports[-1]}"]
        threads = workers + 1
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
        return _local_resolver(spec, chief)


def _local_resolver(spec: Mapping[str, list[str]], chief: bool) -> ClusterResolver:
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
