"""Connecting: wait until every worker can reach every parameter server before training.

A worker's gRPC channel to a ps task that was down a moment ago fails every call at once
("failed to connect to all addresses ... Connection refused") until its next reconnect attempt,
even when the ps task is back (TensorFlow caps gRPC's reconnect backoff at 1 s,
``GRPC_ARG_MAX_RECONNECT_BACKOFF_MS`` in ``grpc_channel.cc``). That happens when a ps task and the
coordinator are restarted together after a ps failure (what :class:`ParameterServerError` tells
the user to do) while the workers keep running: the coordinator connects as soon as the ps
listens, and the first training steps fail on the workers' stale channels. TensorFlow's
ClusterCoordinator re-queues such a step at once, at most three times per ps task
(``TF_COORDINATOR_IGNORE_TRANSIENT_PS_FAILURES``), faster than the window closes; fit then
reports a ps failure although nothing failed.

:func:`wait_until_workers_reach_ps` runs, on each worker, a function with an op on every ps task
(the worker contacts the ps itself, as in a training step), and retries a call that fails on the
worker-to-ps path until it succeeds or a deadline passes. It runs when the strategy is created,
before any step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import tensorflow as tf

from tfpar._compat import internals
from tfpar.coordinator._callbacks import first_line

_log = logging.getLogger("tfpar.coordinator")

REACH_TIMEOUT_SECONDS = 60.0
_RETRY_SECONDS = 0.2


def wait_until_workers_reach_ps(
    cluster: Mapping[str, Sequence[str]], timeout: float = REACH_TIMEOUT_SECONDS
) -> dict[int, int]:
    """Blocks until each worker task runs an op on each ps task (retrying on the way).

    Call it from the coordinator after it connected to the cluster (creating the
    ParameterServerStrategy connects).

    Args:
        cluster: The cluster spec as a dict (``{"worker": [...], "ps": [...], ...}``).
        timeout: Seconds, for all workers together, to keep retrying calls that fail on the way
            from a worker to a ps task.

    Returns:
        For each worker index, how many calls failed on the worker-to-ps path before one
        succeeded (0 when the first did). A worker that could not be reached itself is left out:
        ClusterCoordinator handles a worker failure (it re-runs the worker's steps elsewhere).

    Raises:
        ConnectionError: If a worker still cannot reach a ps task after `timeout` seconds.

    Example:
    >>> strategy = tf.distribute.ParameterServerStrategy(resolver)
    >>> wait_until_workers_reach_ps(resolver.cluster_spec().as_dict())
    {0: 0, 1: 0}
    """
    ps_tasks = len(cluster.get("ps", ()))

    @tf.function(autograph=False)
    def read_every_ps() -> tf.Tensor:
        # A stateful op on each ps (not constant-folded, no variable: creating one inside a
        # strategy scope would shift where the strategy places the model's variables).
        stamps = []
        for task in range(ps_tasks):
            with tf.device(f"/job:ps/replica:0/task:{task}/device:CPU:0"):
                stamps.append(tf.cast(tf.timestamp() > 0, tf.int32))
        return tf.add_n(stamps)

    deadline = time.monotonic() + timeout
    failures: dict[int, int] = {}
    with internals.synchronous_executor():
        for worker in range(len(cluster.get("worker", ()))):
            failed = _read_from(worker, read_every_ps, ps_tasks, cluster, timeout, deadline)
            if failed is not None:
                failures[worker] = failed
    return failures


def _read_from(
    worker: int, function: tf.types.experimental.PolymorphicFunction, expected: int,
    cluster: Mapping[str, Sequence[str]], timeout: float, deadline: float,
) -> int | None:
    started = time.monotonic()
    failed = 0
    while True:
        try:
            with tf.device(f"/job:worker/replica:0/task:{worker}"):
                total = int(function())
            if total != expected:  # pragma: no cover - every ps answers with 1
                raise AssertionError(f"Expected {expected} from the ps tasks. Received: {total}")
            if failed:
                _log.warning("worker:%d reaches every ps task now (after %.1f s).", worker,
                             time.monotonic() - started)
            return failed
        except tf.errors.OpError as error:
            if internals.is_worker_failure(error):
                _log.info("worker:%d did not answer (%s); ClusterCoordinator handles a worker "
                          "failure, so not waiting for it.", worker, type(error).__name__)
                return None
            ps = internals.failed_ps_tasks(error)
            if ps is None and not internals.is_derived_cancellation(error):
                _log.warning(
                    "Could not check that worker:%d reaches the ps tasks: %s: %s. Training goes "
                    "on; a step that fails the same way will report it.", worker,
                    type(error).__name__, first_line(error),
                )
                return None
            failed += 1
            if failed == 1:
                _log.warning(
                    "worker:%d cannot reach ps task(s) %s yet (%s); retrying for up to %.0f s.",
                    worker, sorted(ps or ()) or "(not named)", first_line(error),
                    max(0.0, deadline - time.monotonic()),
                )
            if time.monotonic() >= deadline:
                names = ", ".join(f"ps:{t} ({cluster['ps'][t]})" for t in sorted(ps or ())) or "a ps task"
                raise ConnectionError(
                    f"worker:{worker} ({cluster['worker'][worker]}) could not reach {names} within "
                    f"{timeout:.0f} s ({failed} attempts). Expected every worker to reach every "
                    "ps task: check that the ps task is still running and that the ps address in "
                    "the cluster spec is reachable from the worker's host (firewall, a hostname "
                    "that resolves differently there). TensorFlow reported: "
                    f"{type(error).__name__}: {first_line(error)}"
                ) from None
            time.sleep(_RETRY_SECONDS)

