"""Callback dispatch and error translation for the coordinator loop."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tfpar._compat import internals
from tfpar.coordinator._common import ParameterServerError


def needs_batch_logs(callback: keras.callbacks.Callback) -> bool:
    return _reads_batch_logs(callback, "on_train_batch_end", "on_batch_end")


def needs_test_batch_logs(callback: keras.callbacks.Callback) -> bool:
    return _reads_batch_logs(callback, "on_test_batch_end")


def _reads_batch_logs(callback: keras.callbacks.Callback, *hooks: str) -> bool:
    """Whether `callback` reads per-batch logs through `hooks` (fetching them costs a round trip)."""
    if isinstance(callback, keras.callbacks.History):
        return False
    if isinstance(callback, keras.callbacks.ProgbarLogger):
        return getattr(callback, "verbose", 1) == 1
    return any(getattr(type(callback), hook) is not getattr(keras.callbacks.Callback, hook) for hook in hooks)


class Lagged:
    """Delivers batch-end callbacks in step order, with each step's fetched logs."""

    def __init__(self, deliver: Callable[[int, Any], None], window: int, active: bool) -> None:
        self.deliver = deliver
        self.window = window
        self.active = active
        self.queue: collections.deque[tuple[int, Any]] = collections.deque()
        self.last_logs: Any = None

    def push(self, end_step: int, remote: Any) -> None:
        if not self.active:
            self.deliver(end_step, {})
            return
        self.queue.append((end_step, remote))
        while len(self.queue) > self.window:
            self._pop()

    def _pop(self) -> None:
        end_step, remote = self.queue.popleft()
        ran, logs = remote.fetch()
        if int(ran) > 0:
            self.last_logs = logs
        self.deliver(end_step, self.last_logs if self.last_logs is not None else {})

    def drain(self) -> None:
        while self.queue:
            self._pop()


def resolve_verbose(verbose: Any) -> Any:
    return 2 if verbose == "auto" else verbose


def make_callback_list(model: keras.Model, callbacks: Any, *, verbose: Any, epochs: int, steps: Any,
                   add_history: bool) -> keras.callbacks.CallbackList:
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks
    return keras.callbacks.CallbackList(
        callbacks, add_history=add_history, add_progbar=verbose != 0, verbose=verbose,
        epochs=epochs, steps=steps, model=model,
    )


# =============================================================================================
# Error translation
# =============================================================================================


@dataclasses.dataclass
class Progress:
    epoch: int = 0
    last_finished_epoch: int | None = None
    backup_dir: str | None = None


def _ps_error(error: BaseException, progress: Progress) -> ParameterServerError | None:
    tasks = internals.failed_ps_tasks(error)
    if tasks is None:
        return None
    names = ", ".join(f"ps:{t}" for t in sorted(tasks)) or "a ps task"
    finished = (
        f"the last finished epoch is {progress.last_finished_epoch + 1}"
        if progress.last_finished_epoch is not None
        else "no epoch had finished"
    )
    if progress.backup_dir:
        resume = (
            f"A checkpoint to resume from is in {progress.backup_dir!r} (keras.callbacks."
            "BackupAndRestore, saved at each epoch end): restart the ps task and run the same "
            "script again; fit restores the weights, optimizer state and epoch from it."
        )
    else:
        resume = (
            "This fit had no keras.callbacks.BackupAndRestore callback, so there is no checkpoint "
            "to resume from: pass callbacks=[keras.callbacks.BackupAndRestore(backup_dir)] so that "
            "a restarted coordinator resumes at the last finished epoch."
        )
    return ParameterServerError(
        f"Parameter server {names} failed during epoch {progress.epoch + 1} ({finished}); the "
        f"variables it held are lost, so training stopped. {resume} TensorFlow reported: "
        f"{type(error).__name__}: {first_line(error)}",
        ps_tasks=tuple(sorted(tasks)), epoch=progress.epoch,
        last_finished_epoch=progress.last_finished_epoch, backup_dir=progress.backup_dir,
    )


def first_line(error: BaseException) -> str:
    """The most telling line of a (long, nested) TensorFlow error message."""
    text = str(getattr(error, "message", None) or error).strip()
    if not text:
        return "(no message)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in ("failed to connect", "Socket closed", "Connection reset", "Connection refused", "UNAVAILABLE"):
        for line in lines:
            if marker in line:
                return line[:400]
    return lines[0][:400]


def translating(progress: Progress, function: Callable[[], Any]) -> Any:
    try:
        return function()
    except (tf.errors.OpError, RuntimeError) as error:
        if isinstance(error, ParameterServerError):
            raise
        translated = _ps_error(error, progress)
        if translated is None:
            raise
        raise translated from error


def backup_dir(callbacks: keras.callbacks.CallbackList) -> str | None:
    for callback in callbacks.callbacks:
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            return str(callback.backup_dir)
    return None
