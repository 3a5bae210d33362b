"""The job this process belongs to and its role in it: detect, task type and index, chief, write paths.

Nothing here imports TensorFlow until it is needed: reading a role from ``TF_CONFIG`` or Slurm
needs none; checking a given ClusterResolver and making a worker's temporary directory
(``tf.io.gfile``, so remote paths work) import it then.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from tfpar.cluster._slurm import slurm_env, slurm_multi_task
from tfpar.cluster._tf_config import parse_tf_config

if TYPE_CHECKING:
    from tensorflow.distribute.cluster_resolver import ClusterResolver

__all__ = [
    "ClusterInfo",
    "cleanup_write_path",
    "detect",
    "is_chief",
    "is_chief_role",
    "task_index",
    "task_type",
    "write_path",
]


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
        return is_chief_role(self.task_type, self.task_index, self.has_chief)


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
    if slurm_multi_task():
        values = slurm_env()
        return ClusterInfo(
            source="slurm",
            num_workers=int(values["SLURM_STEP_NUM_TASKS"]),
            num_ps=0,
            has_chief=False,
            task_type="worker",
            task_index=int(values["SLURM_PROCID"]),
        )
    return None


def _role(cluster: ClusterResolver | None) -> tuple[str | None, int, bool]:
    """(task type, task index, has a chief job) of this process."""
    if cluster is not None:
        import tensorflow as tf

        if not isinstance(cluster, tf.distribute.cluster_resolver.ClusterResolver):
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


def is_chief_role(ttype: str | None, index: int, has_chief: bool) -> bool:
    """Whether task `ttype`:`index` is the chief: no cluster, the ``chief`` task, else worker 0."""
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
    return is_chief_role(*_role(cluster))


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
    if is_chief_role(ttype, index, has_chief):
        return path
    import tensorflow as tf

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
    if is_chief_role(ttype, index, has_chief):
        return
    import tensorflow as tf

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
