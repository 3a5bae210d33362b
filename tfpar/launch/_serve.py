"""serve(): the TensorFlow server of a ps task (and of a worker task when ``ps > 0``).

The only part of the launcher that imports TensorFlow, and only when it runs.
"""

from __future__ import annotations

import os
import sys

from tfpar import cluster

__all__ = ["serve"]


def serve() -> int:
    """Runs this task's TensorFlow server (from ``TF_CONFIG``) until the process is stopped.

    The launcher runs this in ps tasks, and in worker tasks when ``ps > 0``; it can also be used
    by hand in a parameter-server job. The server gets ``inter_op_parallelism_threads >=
    workers + 1`` (fewer can deadlock, b/172296720) and, on ps tasks, no GPU.

    Returns:
        Never returns normally; 2 if ``TF_CONFIG`` does not name a worker or ps task.

    Example:
    >>> import sys, tfpar.launch  # in a ps task: TF_CONFIG={"cluster": ..., "task": {"type": "ps", ...}}
    >>> sys.exit(tfpar.launch.serve())
    """
    import tensorflow as tf

    config = cluster.parse_tf_config()
    ttype = config.get("task", {}).get("type")
    if ttype not in ("worker", "ps"):
        print(
            "tfpar serve: expected TF_CONFIG to describe a 'worker' or 'ps' task. "
            f"Received: TF_CONFIG task={config.get('task')!r}",
            file=sys.stderr,
        )
        return 2
    resolver = cluster.resolve("tf_config")
    workers = len(config["cluster"].get("worker", ()))
    proto = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=max(workers + 1, os.cpu_count() or 1))
    if ttype == "ps":
        proto.device_count["GPU"] = 0
    server = tf.distribute.Server(
        resolver.cluster_spec(),
        job_name=resolver.task_type,
        task_index=resolver.task_id,
        protocol=resolver.rpc_layer or "grpc",
        config=proto,
        start=True,
    )
    address = config["cluster"][ttype][config["task"]["index"]]
    print(
        f"tfpar: {ttype}:{resolver.task_id} server listening on {address} (pid {os.getpid()})",
        flush=True,
    )
    server.join()
    return 0
