"""``TF_CONFIG`` parsing and validation, before TensorFlow reads it (no TensorFlow import).

:func:`parse_tf_config` turns a typo into a clear error instead of a hang or an opaque gRPC
failure; :func:`validate_cluster` and :func:`validate_task` check an explicit cluster spec the
same way (job names, ``host:port`` addresses, duplicate addresses and local port clashes).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from tfpar.cluster._net import is_local_host

__all__ = ["JOB_NAMES", "parse_address", "parse_tf_config", "short", "validate_cluster", "validate_task"]

#: Job names TensorFlow's distribution strategies accept in a cluster spec.
JOB_NAMES = ("chief", "worker", "ps", "evaluator")

_ADDRESS_RE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d+)$")
_EXAMPLE = (
    '{"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


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
    config = _decode(os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config)
    if not config:
        return {}
    received = f"Received: TF_CONFIG={short(json.dumps(config, default=str))}"
    for required in ("cluster", "task"):
        if required not in config:
            close = difflib.get_close_matches(required, [str(k) for k in config], n=1)
            hint = f" Found {close[0]!r}: did you mean {required!r}?" if close else ""
            raise ValueError(
                f'TF_CONFIG has no "{required}" key.{hint} Expected an object with "cluster" '
                f'(job name -> list of "host:port") and "task" ({{"type": ..., "index": ...}}), '
                f"e.g. {_EXAMPLE}. {received}"
            )
    cluster = validate_cluster(config["cluster"], what="TF_CONFIG", received=received)
    task = config["task"]
    if not isinstance(task, Mapping) or "type" not in task:
        raise ValueError(
            'Expected TF_CONFIG["task"] to be an object such as {"type": "worker", "index": 0}. '
            f"{received}"
        )
    ttype, tindex = validate_task(task.get("type"), task.get("index", 0), cluster, received)
    normalized = {k: v for k, v in config.items() if k not in ("cluster", "task")}
    normalized["cluster"] = cluster
    normalized["task"] = {**{k: v for k, v in task.items()}, "type": ttype, "index": tindex}
    return normalized


def _decode(tf_config: Any) -> Mapping[str, Any]:
    """The TF_CONFIG object: JSON text decoded (``{}`` for blank text), a mapping as it is."""
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
                f"Expected a JSON object such as {_EXAMPLE}. Received: TF_CONFIG={short(text)}"
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
            f"Received: TF_CONFIG={short(json.dumps(config))}"
        )
    return config


def short(text: str, limit: int = 300) -> str:
    """`text`, cut to `limit` characters for an error message."""
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _caret(text: str, pos: int, width: int = 36) -> str:
    start = max(0, pos - width)
    snippet = text[start : pos + width].replace("\n", " ").replace("\t", " ")
    return f"    {snippet}\n    {' ' * (pos - start)}^"


def _as_mapping(cluster: Any) -> Any:
    """A ``tf.train.ClusterSpec`` as its dict; anything else unchanged.

    A ClusterSpec can only exist once TensorFlow is imported, so this module need not import it.
    """
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(cluster, tf.train.ClusterSpec):
        return cluster.as_dict()
    return cluster


def validate_cluster(cluster: Any, *, what: str, received: str) -> dict[str, Any]:
    """Checks a cluster spec; returns a normalized copy (lists, or {int: address} for sparse jobs).

    Args:
        cluster: ``{job name: ["host:port", ...] or {index: "host:port"}}``, or a
            ``tf.train.ClusterSpec``.
        what: Where the cluster came from, for the messages (``"TF_CONFIG"``, ``"given"``).
        received: The ``Received: ...`` text the messages end with.

    Raises:
        ValueError: For an empty cluster, an unknown job name, a job without tasks, more than one
            chief or evaluator, a malformed address, or two tasks on one address or local port.
    """
    cluster = _as_mapping(cluster)
    if not isinstance(cluster, Mapping) or not cluster:
        raise ValueError(
            f'Expected the {what} cluster to be a non-empty object mapping job names to lists of '
            f'"host:port" addresses, e.g. {{"worker": ["127.0.0.1:12345"]}}. {received}'
        )
    normalized: dict[str, Any] = {}
    seen: dict[str, str] = {}  # address -> "job:index"
    local_ports: dict[int, tuple[str, str]] = {}  # port -> ("job:index", address)
    for job, tasks in cluster.items():
        normalized[job], items = _job_tasks(job, tasks, what, received)
        for index, address in items:
            _check_unique(f"{job}:{index}", address, seen, local_ports, received)
    return normalized


def _job_tasks(job: Any, tasks: Any, what: str, received: str) -> tuple[Any, list[tuple[int, Any]]]:
    """(the job's normalized task list, its (index, address) pairs), checked."""
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
        normalized: Any = indexed
        items = sorted(indexed.items())
    elif isinstance(tasks, (list, tuple)):
        normalized = list(tasks)
        items = list(enumerate(tasks))
    else:
        raise ValueError(f'Expected job {job!r} to be a list of "host:port" addresses. {received}')
    if not items:
        raise ValueError(f"Job {job!r} has no tasks; remove it or add addresses. {received}")
    if job in ("chief", "evaluator") and len(items) > 1:
        raise ValueError(
            f"A cluster may have at most one {job!r} task; found {len(items)}. {received}"
        )
    return normalized, items


def _check_unique(
    name: str, address: Any, seen: dict[str, str], local_ports: dict[int, tuple[str, str]], received: str
) -> None:
    """Records task `name`'s address; raises if another task has it, or its port on this machine."""
    host, port = parse_address(address, name, received)
    if address in seen:
        raise ValueError(
            f"Tasks {seen[address]} and {name} have the same address {address!r}: every "
            f"task needs its own host:port. {received}"
        )
    seen[address] = name
    if is_local_host(host):
        if port in local_ports:
            other, other_address = local_ports[port]
            raise ValueError(
                f"Port clash: tasks {other} ({other_address}) and {name} ({address}) both "
                f"use port {port} on this machine. Give each local task its own port "
                f"(tfpar launch picks free ones). {received}"
            )
        local_ports[port] = (name, address)


def parse_address(address: Any, name: str, received: str) -> tuple[str, int]:
    """``(host, port)`` of task `name`'s ``"host:port"`` address (brackets of IPv6 removed).

    Raises:
        ValueError: If `address` is not a ``host:port`` string with a port in 1..65535.
    """
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


def validate_task(ttype: Any, tindex: Any, cluster: Mapping[str, Any], received: str) -> tuple[str, int]:
    """Checks this process's task type and index against a validated cluster.

    Returns:
        ``(task type, task index as an int)``.

    Raises:
        ValueError: For an unknown type, an index that is not a non-negative integer, a type that
            is not a job of the cluster (an evaluator may be outside it), or an index out of range.
    """
    if ttype not in JOB_NAMES:
        raise ValueError(
            f"Unknown task type {ttype!r}. Valid task types: {', '.join(JOB_NAMES)}. {received}"
        )
    tindex = _task_index(tindex, received)
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


def _task_index(tindex: Any, received: str) -> int:
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
    return tindex
