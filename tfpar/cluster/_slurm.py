"""Slurm: the variables ``srun`` sets for each task, and a resolver for them.

Reading and checking the variables needs no TensorFlow; the resolver class (a subclass of
TensorFlow's ``SlurmClusterResolver``) is made on first use, by :func:`slurm_resolver`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["SLURM_VARIABLES", "slurm_env", "slurm_multi_task", "slurm_resolver"]

#: The Slurm variables ``resolve("slurm")`` needs (``srun`` sets them for each task).
SLURM_VARIABLES = (
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NODELIST",
    "SLURM_STEP_TASKS_PER_NODE",
)

_PORT_BASE = 8888


def slurm_multi_task() -> bool:
    """Whether this process is one task of a Slurm step with more than one task."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    return bool(os.environ.get("SLURM_PROCID")) and tasks.isdigit() and int(tasks) > 1


def slurm_env() -> dict[str, str]:
    """The values of :data:`SLURM_VARIABLES`, checked.

    Raises:
        RuntimeError: If some are missing (outside an ``srun`` step); the message names them.
        ValueError: If ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` are not integers with
            ``SLURM_PROCID < SLURM_STEP_NUM_TASKS``.
    """
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


def slurm_resolver(rpc_layer: str = "grpc") -> Any:
    """A ClusterResolver for the Slurm step of this process (all tasks are workers).

    Raises:
        RuntimeError: If Slurm variables are missing (see :func:`slurm_env`).
        ValueError: If they do not describe a consistent job step; the message shows them.
    """
    values = slurm_env()
    try:
        return _resolver_class()(rpc_layer=rpc_layer)
    except (RuntimeError, ValueError, IndexError) as error:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ValueError(
            f"The Slurm variables do not describe a consistent job step: {error}. "
            f"Expected SLURM_STEP_TASKS_PER_NODE (e.g. '2(x3),1') to add up to "
            f"SLURM_STEP_NUM_TASKS over the nodes of SLURM_STEP_NODELIST (e.g. "
            f"'node[01-04]'). Received: {shown}"
        ) from error


@functools.cache
def _resolver_class() -> type:
    import tensorflow as tf

    class _SlurmClusterResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
        """TensorFlow's SlurmClusterResolver, fixed for CPU-only nodes and side-effect free.

        Upstream asks ``nvidia-smi`` for the GPU count (which crashes when it is missing), lays
        out tasks with ``range(0, gpus_per_node, gpus_per_task)`` (no tasks at all with 0 GPUs)
        and writes ``CUDA_VISIBLE_DEVICES`` into ``os.environ`` on every ``cluster_spec()`` call.
        Here the layout uses one slot per task, no environment variable is written, and
        ``num_accelerators`` reports the GPUs this task can see (give each task its own with
        ``srun --gpus-per-task``).
        """

        def __init__(self, *, port_base: int = _PORT_BASE, rpc_layer: str = "grpc") -> None:
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

    return _SlurmClusterResolver
