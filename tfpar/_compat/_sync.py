"""Points where the workers of a multi-worker cluster wait for each other (coordination service).

MultiWorkerMirroredStrategy runs TensorFlow's coordination service on every task; its barriers and
key-value store work outside any step function and take a timeout, so a worker that never arrives
turns into a clear error instead of a hang. Two uses:

* :func:`barrier`: every worker waits until all have arrived (the end of ``fit`` with
  BackupAndRestore: no worker may still write inside the backup directory the chief removes).
* :func:`announce` / :func:`await_announcement`: the chief says its n-th save is complete, the
  other workers wait for it after their own n-th save (``model.save`` returns on a worker only
  once the chief's file exists). Counted without the path: in TensorFlow's tutorial the workers
  save to their own temporary paths and the chief to the real one.

Ids count per process: every worker passes the same points in the same order, so the n-th
barrier (or save of a path) of one worker meets the n-th of the others.
"""

from __future__ import annotations

import collections
import threading

import tensorflow as tf

from tfpar._compat import internals

BARRIER_TIMEOUT = 600.0  # seconds; a worker this late is stuck (or never calls the same code)

_COUNTS: collections.Counter[str] = collections.Counter()
_LOCK = threading.Lock()


def _next_id(name: str) -> str:
    with _LOCK:
        _COUNTS[name] += 1
        return f"tfpar/{name}/{_COUNTS[name]}"


def barrier(name: str, timeout: float = BARRIER_TIMEOUT) -> None:
    """Waits until every task of the cluster reached the same barrier `name` (its n-th time).

    Raises:
        RuntimeError: If some task did not arrive within `timeout` seconds (or failed).
    """
    barrier_id = _next_id(f"barrier/{name}")
    try:
        internals.wait_at_barrier(barrier_id, timeout)
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.InternalError,
            tf.errors.AbortedError) as error:
        raise RuntimeError(
            f"tfpar: the workers did not all reach {name!r} within {timeout:.0f} s: a worker "
            "failed, or runs different code. Expected every worker to run the same training "
            f"script. Received from TensorFlow: {error.message.splitlines()[0]}"
        ) from None


def announce(name: str) -> None:
    """The chief: says that `name` (its n-th time) is done."""
    internals.set_key(_next_id(f"done/{name}"), "1")


def await_announcement(name: str, what: str, timeout: float = BARRIER_TIMEOUT) -> None:
    """A non-chief worker: waits until the chief announced `name` (its n-th time).

    Raises:
        RuntimeError: Naming `what` was awaited, if the chief does not announce it in time.
    """
    key = _next_id(f"done/{name}")
    try:
        internals.get_key(key, timeout)
    except tf.errors.UnavailableError:
        # The coordination service runs in the chief's process: the chief has exited, which it
        # does only after its save (a chief that failed makes the launcher stop every task).
        return
    except (tf.errors.DeadlineExceededError, tf.errors.InternalError, tf.errors.AbortedError) as error:
        raise RuntimeError(
            f"tfpar: this worker waited {timeout:.0f} s for the chief to finish {what}, in vain. "
            "Under multi_worker every worker calls model.save / save_weights with the same path "
            "(only the chief writes it; the others wait until the file is complete). Expected the "
            f"chief to save it too. Received from TensorFlow: {error.message.splitlines()[0]}"
        ) from None
