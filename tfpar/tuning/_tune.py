"""The search: measure the default, then the most promising settings while the budget lasts."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfpar import _validation
from tfpar._compat import internals
from tfpar.tuning._agree import Agreement, is_multi_worker
from tfpar.tuning._candidates import candidate_settings
from tfpar.tuning._measure import Measurement, examples_per_execution, measure, steps_multiple
from tfpar.tuning._report import Candidate, TuningResult, describe, fastest
from tfpar.tuning._state import ModelState, apply_settings, default_settings, needs_trace, supports_microbatches

__all__ = ["DEFAULT_BUDGET_SECONDS", "tune"]

#: The budget when ``budget_seconds=None``.
DEFAULT_BUDGET_SECONDS = 30.0
# Timed seconds per candidate: this share of the budget, within these bounds. The rest of a
# candidate's cost is tracing its train function and the warm-up executions.
TIMED_SHARE = 0.05
MIN_TIMED_SECONDS = 0.3
MAX_TIMED_SECONDS = 3.0
MIN_TIMED_EXECUTIONS = 2
# Tracing a train function of steps_per_execution > 1 against one of 1 step (AlexNet, 2 virtual
# CPUs: 12 s against 5 s).
MULTI_STEP_TRACE_FACTOR = 2.5


def _check_arrays(x: Any, y: Any) -> int:
    for name, value in (("x_train", x), ("y_train", y)):
        if not isinstance(value, np.ndarray) or value.ndim < 1 or len(value) == 0:
            raise TypeError(
                f"Expected `{name}` to be a non-empty NumPy array (examples along the first axis). "
                f"{_validation.received(name, value if not isinstance(value, np.ndarray) else value.shape)}"
            )
    if len(x) != len(y):
        raise ValueError(
            "Expected `x_train` and `y_train` to hold the same number of examples. Received: "
            f"len(x_train)={len(x)}, len(y_train)={len(y)}"
        )
    return len(x)


def _check_model(model: Any) -> None:
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise ValueError(
            "Expected a compiled keras.Model (model.compile(optimizer=..., loss=...) first). "
            f"Received: model={getattr(model, 'name', model)!r} (of type {type(model).__name__}), not compiled"
        )


def _check_candidates(candidates: Any, default: dict[str, Any]) -> list[dict[str, Any]]:
    found = [dict(default)]
    for settings in candidates:
        if not isinstance(settings, dict) or "batch_size" not in settings:
            raise TypeError(
                "Expected `candidates` to be a list of settings dicts with a 'batch_size'. "
                f"{_validation.received('candidate', settings)}"
            )
        settings = {**default, **settings}
        if settings not in found:
            found.append(settings)
    return found


def _timed_executions(settings: dict[str, Any], rate: float, target_seconds: float) -> int:
    """Timed executions for about `target_seconds` at `rate`, a multiple of the accumulation steps."""
    k = steps_multiple(settings)
    executions = max(MIN_TIMED_EXECUTIONS, math.ceil(target_seconds * rate / examples_per_execution(settings)))
    return -(-executions // k) * k


def _warmup_executions(settings: dict[str, Any], start_step: int) -> int:
    """Untimed executions: the trace, and with accumulation up to an update boundary (both steps traced)."""
    k = steps_multiple(settings)
    return 1 if k == 1 else k + (-start_step) % k


def tune(
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    batch_size: int = 64,
    steps_per_execution: int = 1,
    budget_seconds: float | None = None,
    log: Callable[[str], None] | None = print,
    candidates: Sequence[dict[str, Any]] | None = None,
) -> TuningResult:
    """Measures a few training settings with short fits and returns the fastest.

    Tries, most promising first: the per-replica batch size x1, x2, x4 of the default (capped by
    the data), ``steps_per_execution`` 1 and 4, under a multi-worker strategy the optimizer's
    ``gradient_accumulation_steps`` 1 and 4, and for a split model (:func:`tfpar.parallel.split`)
    1, 2 and 4 micro-batches. Each is measured by a ``model.fit`` on a slice of the training data
    (repeated if it is short): the first execution traces and is not timed; samples/s = examples
    in the timed steps / their wall time. The default is always measured first; a setting that
    fails (out of memory, anything raised) is recorded with its error and never chosen. Before
    each setting the search estimates its cost from the ones measured and leaves it out if it
    would exceed the budget.

    It measures throughput only: the model's variables (weights, optimizer slots and step count,
    metric accumulators, seed state) and its settings (``steps_per_execution``, the optimizer's
    accumulation, micro-batches) are restored afterwards, also when it fails; the model stays
    compiled with the same optimizer, loss and metrics. Apply the chosen setting yourself
    (recompile with its ``steps_per_execution``, fit with its ``batch_size``, and scale the
    learning rate for the new batch size, see :func:`tfpar.training.scale_learning_rate`), or
    with :func:`tfpar.tuning.apply_settings`.

    Under a multi-worker strategy every worker runs the same search (same code, same data shape)
    and the workers all-reduce each measurement, so they leave out and choose the same settings.
    A setting that fails on one worker only in the middle of a step can still leave the others
    waiting in a collective (TensorFlow's collective timeout applies).

    Call it inside the strategy's scope, after ``compile``, before training.

    Args:
        model: A compiled ``keras.Model`` (built under the strategy's scope).
        x_train: Training inputs, examples along the first axis.
        y_train: Training targets.
        batch_size: The default global batch size (over all replicas).
        steps_per_execution: The default ``steps_per_execution``.
        budget_seconds: Wall-clock budget of the search (finite, > 0); None for
            ``DEFAULT_BUDGET_SECONDS`` (30 s). The default is measured even when it alone exceeds it.
        log: Called with one progress line per setting; None for silence.
        candidates: Settings to try after the default, instead of the built-in list (dicts with a
            ``batch_size`` and any of ``steps_per_execution``, ``gradient_accumulation_steps``,
            ``microbatches``; missing keys take the default's value).

    Returns:
        A :class:`TuningResult` (``chosen``, ``candidates``, ``table()``, ``plot(path)``, ``to_json()``).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument has a wrong value, or the model is not compiled.
        RuntimeError: If every setting failed, the default included (its error is in the message).

    Example:
        >>> with tfpar.scope("mirrored"):
        ...     model = tfpar.models.alexnet(input_shape=(64, 64, 3), num_classes=10, width=0.25)
        ...     model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        ...     result = tfpar.tuning.tune(model, x, y, batch_size=64, budget_seconds=20)
        >>> print(result.table())  # doctest: +SKIP
        >>> model.compile(optimizer=model.optimizer, loss="sparse_categorical_crossentropy",
        ...               steps_per_execution=result.chosen["steps_per_execution"])
        >>> model.fit(x, y, batch_size=result.chosen["batch_size"], epochs=10)  # doctest: +SKIP
    """
    _check_model(model)
    examples = _check_arrays(x_train, y_train)
    batch_size = _validation.check_int("batch_size", batch_size, minimum=1)
    steps_per_execution = _validation.check_int("steps_per_execution", steps_per_execution, minimum=1)
    budget = DEFAULT_BUDGET_SECONDS if budget_seconds is None else _validation.check_positive_number(
        "budget_seconds", budget_seconds, hint="Pass None for the default budget."
    )
    if log is not None and not callable(log):
        raise TypeError(f"Expected `log` to be a callable or None. {_validation.received('log', log)}")
    strategy = model.distribute_strategy if model.distribute_strategy is not None else tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        raise ValueError(
            "Expected a synchronous strategy for tuning (default, one_device, mirrored, multi_worker, "
            "or a split model): their short fits measure a setting in seconds. Received: a "
            "ParameterServerStrategy, whose asynchronous workers make a short fit mostly start-up "
            "(measured: a single setting took 80 s on an in-process cluster). Fix: tune the same "
            "model under 'mirrored' or 'default' and pass its batch size to the parameter-server run."
        )
    replicas = int(strategy.num_replicas_in_sync)
    multi_worker = is_multi_worker(strategy)
    default = default_settings(model, batch_size, steps_per_execution, multi_worker=multi_worker)
    if candidates is None:
        settings_list = candidate_settings(default, replicas=replicas, examples=examples, multi_worker=multi_worker,
                                           microbatches=supports_microbatches(model))
    else:
        settings_list = _check_candidates(candidates, default)
    say = log or (lambda line: None)
    search = _Search(model, x_train, y_train, budget, Agreement(strategy), say)
    started = time.perf_counter()
    state = ModelState.capture_settings(model)
    if model.built and getattr(model.optimizer, "built", False):
        state.capture_variables()
    try:
        search.run(state, settings_list)
    finally:
        state.restore()
    seconds = time.perf_counter() - started
    best = fastest(search.measured)
    if best is None:
        errors = "; ".join(f"{describe(c.settings)}: {c.error}" for c in search.measured)
        errors += " (the full errors were logged above)" if log is not None else ""
        raise RuntimeError(f"tfpar tune: every setting failed, so there is nothing to train with. Received: {errors}")
    result = TuningResult(candidates=search.measured, chosen=dict(best.settings), default=dict(default),
                          seconds=seconds, budget_seconds=budget, skipped=search.skipped)
    speedup = f" ({result.speedup:.2f}x the default)" if result.speedup else ""
    say(f"tfpar tune: chose {describe(result.chosen)}{speedup} after {len(search.measured)} setting(s) "
        f"in {seconds:.1f} s")
    return result


class _Search:
    """The loop's state: what was measured, what it cost, what the budget leaves."""

    def __init__(self, model: Any, x: np.ndarray, y: np.ndarray, budget: float, agreement: Agreement,
                 log: Callable[[str], None]) -> None:
        self.model, self.x, self.y, self.budget, self.agreement, self.log = model, x, y, budget, agreement, log
        self.target = min(MAX_TIMED_SECONDS, max(MIN_TIMED_SECONDS, TIMED_SHARE * budget))
        self.measured: list[Candidate] = []
        self.skipped: list[dict[str, Any]] = []
        self.spent = 0.0  # agreed seconds: every worker takes the same decisions from it
        self.rate: float | None = None  # the default's samples/s, for estimates
        # Each measurement's seconds beyond its steady executions, when it traced and when it did not.
        self.trace_overheads: list[float] = []
        self.reuse_overheads: list[float] = []
        self.traced_batches: set[int] = set()  # batch sizes the current train function was traced for

    def run(self, state: ModelState, settings_list: list[dict[str, Any]]) -> None:
        for index, settings in enumerate(settings_list):
            if not 1 <= int(settings["batch_size"]) <= len(self.x):  # the same on every worker: no agreement
                error = (f"ValueError: Expected a global batch size from 1 to the {len(self.x)} training examples. "
                         f"Received: batch_size={settings['batch_size']}")
                self.measured.append(Candidate(dict(settings), None, 0.0, error))
                self.log(f"tfpar tune: {describe(settings)}: failed ({error})")
                continue
            if index:
                estimate = self._estimate(settings, state)
                if self.spent + estimate > self.budget:
                    self.skipped.append(settings)
                    self.log(f"tfpar tune: {describe(settings)}: left out (about {estimate:.1f} s, "
                             f"{max(0.0, self.budget - self.spent):.1f} s of the budget left)")
                    continue
            candidate = self._measure(state, settings, first=self.rate is None)
            self.measured.append(candidate)
            self.spent += candidate.seconds
            rate = f"{candidate.samples_per_second:.0f} samples/s" if candidate.ok else f"failed ({candidate.error})"
            self.log(f"tfpar tune: {describe(settings)}: {rate} ({candidate.seconds:.1f} s)")

    def _start_step(self, state: ModelState) -> int:
        return internals.optimizer_steps(self.model.optimizer) or 0

    def _estimate(self, settings: dict[str, Any], state: ModelState) -> float:
        """Seconds `settings` would take: its executions at the default's rate, plus its tracing."""
        if self.rate is None:  # nothing ran yet: only the time spent counts
            return 0.0
        execution = examples_per_execution(settings) / self.rate
        executions = _warmup_executions(settings, 0) + _timed_executions(settings, self.rate, self.target)
        return self._overhead(settings) + executions * execution

    def _overhead(self, settings: dict[str, Any]) -> float:
        traces = self.trace_overheads[1:] or self.trace_overheads  # the first also built the model
        trace = sum(traces) / len(traces) if traces else 0.0
        if needs_trace(self.model, settings):
            # A multi-step function holds the step twice (before and in its loop): about twice the trace.
            return trace * (MULTI_STEP_TRACE_FACTOR if int(settings["steps_per_execution"]) > 1 else 1.0)
        if int(settings["batch_size"]) in self.traced_batches or len(self.traced_batches) > 1:
            return max(self.reuse_overheads) if self.reuse_overheads else 0.0
        return trace  # a second batch shape: traced once more, with the batch dimension relaxed

    def _measure(self, state: ModelState, settings: dict[str, Any], *, first: bool) -> Candidate:
        started = time.perf_counter()
        traces = needs_trace(self.model, settings) or (
            int(settings["batch_size"]) not in self.traced_batches and len(self.traced_batches) < 2)
        try:
            if state.captured:
                state.restore_variables()  # every setting starts from the same weights and step
            if needs_trace(self.model, settings):
                self.traced_batches = set()
            apply_settings(self.model, settings)
        except Exception as exception:  # a setting this model cannot take
            seconds = self.agreement.mean([time.perf_counter() - started])[0]
            return Candidate(dict(settings), None, seconds, f"{type(exception).__name__}: {exception}")
        seconds = 0.0
        if first:
            # A probe: one traced and one steady execution, for the default's rate, then the
            # measurement proper (the function stays traced).
            probe = measure(self.model, self.x, self.y, settings, warmup=1, timed=1, agreement=self.agreement,
                            on_train_begin=state.capture_variables)
            seconds += probe.seconds
            if probe.samples_per_second is None:
                return Candidate(dict(settings), None, seconds, probe.error)
            self.rate = probe.samples_per_second
            state.restore_variables()
        assert self.rate is not None
        warmup = _warmup_executions(settings, self._start_step(state))
        timed = _timed_executions(settings, self.rate, self.target)
        result: Measurement = measure(self.model, self.x, self.y, settings, warmup=warmup, timed=timed,
                                      agreement=self.agreement, on_train_begin=state.capture_variables)
        seconds += result.seconds
        if result.samples_per_second is not None and result.seconds_per_execution is not None:
            if first:
                self.rate = result.samples_per_second
            overhead = max(0.0, seconds - (warmup + timed) * result.seconds_per_execution)
            (self.trace_overheads if traces else self.reuse_overheads).append(overhead)
            self.traced_batches.add(int(settings["batch_size"]))
        return Candidate(dict(settings), result.samples_per_second, seconds, result.error)
