"""Measuring one setting: a short ``model.fit`` on a slice of the training data, timed per execution.

A measurement is one ``fit`` of ``warmup + timed`` executions (an execution is one call of the
train function: ``steps_per_execution`` steps). The warm-up executions trace the train function
and fill the input pipeline; the rate counts only the timed ones: examples in the timed
executions / their wall time (from the end of the last warm-up execution to the end of the last
one). A timing callback reads the loss after every execution, so asynchronous devices are done
with the step when it is timed (Keras's progress bar reads it too).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import keras
import numpy as np

from tfpar.tuning._agree import Agreement

__all__ = ["Measurement", "examples_per_execution", "measure", "steps_multiple"]


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One setting's agreed timings (all None / 0 when it failed)."""

    samples_per_second: float | None
    seconds: float
    seconds_per_execution: float | None
    error: str | None


class _Timer(keras.callbacks.Callback):
    def __init__(self, on_train_begin: Any = None) -> None:
        super().__init__()
        self.ends: list[float] = []
        self._on_begin = on_train_begin

    def on_train_begin(self, logs: Any = None) -> None:
        if self._on_begin is not None:
            self._on_begin()  # the model and its optimizer are built now: save them

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None:
            float(loss)  # waits for the step (asynchronous devices)
        self.ends.append(time.perf_counter())


def steps_multiple(settings: dict[str, Any]) -> int:
    """Executions come in multiples of this: the accumulation steps (an update every k steps)."""
    return max(1, int(settings.get("gradient_accumulation_steps") or 1))


def examples_per_execution(settings: dict[str, Any]) -> int:
    return int(settings["batch_size"]) * int(settings["steps_per_execution"])


def _slice(array: np.ndarray, examples: int) -> np.ndarray:
    if examples <= len(array):
        return array[:examples]
    return array[np.arange(examples) % len(array)]  # small data: repeated


def _fit(model: Any, x: np.ndarray, y: np.ndarray, settings: dict[str, Any], executions: int,
         on_train_begin: Any = None) -> list[float]:
    batch_size = int(settings["batch_size"])
    if not 1 <= batch_size <= len(x):
        raise ValueError(
            f"Expected a global batch size from 1 to the {len(x)} training examples. Received: batch_size={batch_size}"
        )
    examples = executions * examples_per_execution(settings)
    timer = _Timer(on_train_begin)
    started = time.perf_counter()
    model.fit(_slice(x, examples), _slice(y, examples), batch_size=batch_size, epochs=1,
              verbose=0, shuffle=False, callbacks=[timer])
    if len(timer.ends) != executions:  # a setting that does not run as planned cannot be compared
        raise RuntimeError(
            f"Expected {executions} executions of the train function. Received: {len(timer.ends)} "
            f"executions for {examples} examples with settings={settings!r}"
        )
    return [started, *timer.ends]


def _error(exception: BaseException) -> str:
    message = getattr(exception, "message", None) or str(exception)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    # AutoGraph's "in user code:" header: the error itself is the last line of the message
    line = (lines[-1] if lines[0].endswith("in user code:") else lines[0]) if lines else ""
    return f"{type(exception).__name__}: {line}"[:500]


def measure(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    settings: dict[str, Any],
    *,
    warmup: int,
    timed: int,
    agreement: Agreement,
    on_train_begin: Any = None,
) -> Measurement:
    """Fits `warmup + timed` executions with `settings` (already applied to the model) and times them.

    Every worker calls the agreement exactly once, also when its fit failed, so the workers stay
    in step (a failure is agreed as a failure of all).

    Args:
        model: The compiled model, with the setting applied (:func:`apply_settings`).
        x: Training inputs.
        y: Training targets.
        settings: The setting (its ``batch_size`` is passed to ``fit``).
        warmup: Untimed executions first (>= 1: the first one traces).
        timed: Timed executions after them (>= 1).
        agreement: Averages the timings over the workers.
        on_train_begin: Called once the model is built, before the first step.

    Returns:
        The agreed :class:`Measurement`.
    """
    started = time.perf_counter()
    error = None
    timed_seconds = 0.0
    try:
        times = _fit(model, x, y, settings, warmup + timed, on_train_begin)
        timed_seconds = times[-1] - times[warmup]
    except Exception as exception:  # out of memory, a bad setting: recorded, never chosen
        error = _error(exception)
    seconds = time.perf_counter() - started
    timed_seconds, seconds, failed = agreement.mean([timed_seconds, seconds, 1.0 if error else 0.0])
    if failed > 0 or timed_seconds <= 0:
        return Measurement(None, seconds, None, error or ("failed on another worker" if failed > 0 else
                                                         "RuntimeError: no time measured"))
    rate = timed * examples_per_execution(settings) / timed_seconds
    return Measurement(rate, seconds, timed_seconds / timed, None)
