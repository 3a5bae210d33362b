"""Cluster discovery and validation, task roles, and in-process local clusters.

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
addresses in the clusters it makes, so all traffic stays on loopback, but on the host network
the ports are reachable from other hosts unless a firewall blocks them. :func:`listening_addresses`
shows what listens. ``tfpar launch`` (``tfpar.launch(...)``) therefore runs its tasks in a private
loopback-only network namespace by default (``--network auto``: where the kernel allows it, else
the host network with a warning; ``--network isolated`` fails instead, ``--network host`` opts
out for tasks that need the network); see ``tfpar.launch``. In-process servers
(:func:`local_cluster`) cannot be isolated that way: see its security note.

Layout: ``_tf_config`` (TF_CONFIG parsing and validation), ``_net`` (ports, sockets, ``/proc``),
``_slurm`` (Slurm variables) and ``_roles`` (detect, roles, write paths) import no TensorFlow, so
the launcher and the command line can use them; ``_resolve`` (:func:`resolve`) and ``_local``
(:func:`local_cluster`) do, and load on first use of their names (PEP 562). Nothing in this
package runs a TensorFlow op at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

from tfpar.cluster._net import free_ports, listening_addresses
from tfpar.cluster._roles import (
    ClusterInfo,
    cleanup_write_path,
    detect,
    is_chief,
    task_index,
    task_type,
    write_path,
)
from tfpar.cluster._slurm import SLURM_VARIABLES
from tfpar.cluster._tf_config import JOB_NAMES, parse_tf_config

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

# Names whose modules import TensorFlow: name -> module, loaded on first use.
_LAZY = {
    "ClusterResolver": "tfpar.cluster._resolve",
    "local_cluster": "tfpar.cluster._local",
    "resolve": "tfpar.cluster._resolve",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tfpar.cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
