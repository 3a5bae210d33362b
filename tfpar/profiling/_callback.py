"""``StepProfiler``: a Keras callback that profiles a window of steps and says where their time goes."""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tfpar._validation import check_int
from tfpar.profiling import _breakdown, _cluster, _stages, _xplane
from tfpar.profiling._report import ProfileReport, TaskProfile


class StepProfiler(keras.callbacks.Callback):
    """Profiles `steps` training steps after `warmup_steps` and reports where the step time goes.

    It records the window with TensorFlow's profiler (``tf.profiler.experimental``: the trace
    opens in TensorBoard's Profile tab, ``tensorboard --logdir <logdir>``) and cuts every step
    into input wait, compute, communication, idle and the rest (Keras's loop, callbacks, Python);
    see :class:`tfpar.profiling.Breakdown`. Works under every tfpar strategy:

    * one process (default, mirrored, a split model): the steps of this process. A model split by
      ``tfpar.parallel.split`` also gets each stage's busy and bubble time next to the plan's
      prediction.
    * ``multi_worker``: every worker profiles the same steps; the chief collects every worker's
      breakdown (``report.per_task``) over the coordination service.
    * ``parameter_server``: the coordinator traces its workers and parameter servers over their
      gRPC servers (TensorFlow's profiler service) for the window's duration.

    The report is at ``profiler.report`` after training (None on a non-chief worker, or if the
    profile could not be read: that warns and never fails the fit), printed as a table at the end
    of training when `verbose`. The profiled steps run slower, and stopping TensorFlow's profiler
    (which writes its trace) takes a moment inside that epoch; the other steps run at full
    speed. Only the host is read: on a GPU, device time the host does not wait for is not in
    the parts.

    Args:
        warmup_steps: Steps run before the window (tracing and the first steps are slow).
        steps: Steps in the window.
        logdir: Directory for TensorFlow's trace (default: a new temporary directory).
        verbose: Print the table when the window is done.
        log: Where the table goes.

    Example:
    >>> profiler = tfpar.training.StepProfiler(warmup_steps=5, steps=10)
    >>> model.fit(x, y, batch_size=64, epochs=2, callbacks=[profiler])
    >>> profiler.report.breakdown.shares()["input"]
    0.03...
    """

    def __init__(
        self,
        warmup_steps: int = 10,
        steps: int = 20,
        logdir: str | Path | None = None,
        verbose: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        super().__init__()
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.steps = check_int("steps", steps, minimum=1)
        self.logdir = Path(logdir) if logdir is not None else None
        self.verbose = verbose
        self._log = log
        self.report: ProfileReport | None = None

    # --- the window ---------------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if getattr(self, "_state", None) == "recording":
            self._abandon()  # an earlier fit raised inside the window: its session still records
        self.report = None
        self._done = 0  # steps finished
        self._marker = 0  # step numbers of the markers (+1 at an epoch's end: windows stop there)
        self._state = "waiting"
        self._profiled = 0
        self._trace: Any = None
        self._begin_batch = 0
        self._wall: list[tuple[float, float, int]] = []  # (start, end, steps) of profiled steps
        self._follows = False  # the last profiled step ended in this epoch: the next one follows it
        self._strategy = getattr(self.model, "distribute_strategy", None) or tf.distribute.get_strategy()
        self._mode = _cluster.mode(self._strategy)
        self._remote: _cluster.RemoteCapture | None = None
        self._logdir = Path()  # set when the window starts (see _start)
        self._temporary = False
        self._recent: list[float] = []  # parameter_server: when the last steps ended
        self._ends: list[float] = []  # parameter_server: when the profiled steps ended
        self._capture = (0.0, 0.0)  # parameter_server: the remote capture's (start, end)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._marker += 1
        self._follows = False

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._begin_batch = batch
        if self._state == "waiting" and self._done >= self.warmup_steps:
            self._start()
        if self._state == "recording" and self._mode != "parameter_server":
            now = time.perf_counter()
            if self._follows and self._wall:  # as the trace's windows: to the next step's start
                start, _, steps = self._wall[-1]
                self._wall[-1] = (start, now, steps)
            self._trace = tf.profiler.experimental.Trace(_xplane.STEP_MARKER, step_num=self._marker, _r=1)
            self._trace.__enter__()
            self._wall.append((now, 0.0, 0))

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._mode == "parameter_server":
            self._ps_batch_end()
            return
        steps = max(1, batch - self._begin_batch + 1)
        self._done += steps
        self._marker += steps
        if self._state != "recording":
            return
        if self._trace is not None:
            self._trace.set_metadata(steps=steps)
            self._trace.__exit__(None, None, None)
            self._trace = None
        start = self._wall[-1][0] if self._wall else time.perf_counter()
        self._wall[-1:] = [(start, time.perf_counter(), steps)]
        self._follows = True
        self._profiled += steps
        if self._profiled >= self.steps:
            self._stop()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._state == "recording":
            if self._trace is not None:
                self._trace.__exit__(None, None, None)
                self._trace = None
            self._stop()
        if self._state == "stopped":
            self._finish()  # read and summarized here, not inside an epoch (its throughput stays true)
        elif self._state == "failed" and self._mode == "multi_worker":
            _cluster.exchange(self._strategy, TaskProfile(_cluster.task_name(self._strategy), _cluster.EMPTY))
        elif self._state == "waiting":
            warnings.warn(
                f"tfpar: StepProfiler profiled nothing: training ran {self._done} step(s), expected "
                f"more than warmup_steps={self.warmup_steps}. Fix: lower warmup_steps, or train longer.",
                stacklevel=2,
            )

    def _ps_batch_end(self) -> None:
        """parameter_server: steps end (lagged) as their results arrive; the window is a time span."""
        now = time.perf_counter()
        self._done += 1
        self._recent = [*self._recent[-5:], now]
        if self._state == "recording":
            self._ends.append(now)
            if now >= self._capture[1]:
                self._stop()

    def _start(self) -> None:
        self._state = "recording"
        if self.logdir is None:
            self._logdir, self._temporary = Path(tempfile.mkdtemp(prefix="tfpar-profile-")), True
        else:  # several workers given one directory must not read each other's traces
            task = _cluster.task_name(self._strategy)
            self._logdir = self.logdir / task.replace(" ", "-") if self._mode == "multi_worker" else self.logdir
        if self._mode != "parameter_server":
            self._start_local()
            return
        gaps = sorted(b - a for a, b in zip(self._recent, self._recent[1:]))
        step_seconds = gaps[len(gaps) // 2] if gaps else 0.1
        planned = (self.params or {}).get("steps")
        epochs = (self.params or {}).get("epochs")
        seconds = self.steps * step_seconds
        if planned and epochs:
            seconds = min(seconds, max(2.0, (planned * epochs - self._done - 1) * step_seconds))
        now = time.perf_counter()
        self._capture = (now, now + min(max(seconds, 2.0), 30.0))
        if _cluster.in_process(self._strategy):
            self._start_local()  # one process: one session sees all tasks
            return
        # The tasks' traces say it all; the coordinator's own (a Python loop) would not.
        self._remote = _cluster.RemoteCapture(self._strategy, self._logdir / "tasks", self._capture[1] - now)
        self._remote.start()

    def _start_local(self) -> None:
        """Starts TensorFlow's profiler here; another session (TensorBoard's ``profile_batch``, a
        ``tf.profiler`` of the user's) keeps it: then nothing is profiled and training goes on."""
        try:
            tf.profiler.experimental.start(str(self._logdir))
        except (tf.errors.AlreadyExistsError, tf.errors.UnavailableError, tf.errors.InternalError) as error:
            self._state = "failed"
            warnings.warn(
                "tfpar: StepProfiler could not start TensorFlow's profiler, so it profiles nothing "
                f"(training goes on). Received: {error.message.splitlines()[0]}. Expected no other "
                "profiler session during its window: drop TensorBoard(profile_batch=...) or move "
                "its window (warmup_steps).",
                stacklevel=3,
            )

    def _stop(self) -> None:
        self._state = "stopped"
        if self._remote is None:
            tf.profiler.experimental.stop()
        if self._mode == "parameter_server":
            self._capture = (self._capture[0], min(self._capture[1], time.perf_counter()))

    def _abandon(self) -> None:
        if self._trace is not None:
            self._trace.__exit__(None, None, None)
            self._trace = None
        if self._remote is None:
            try:
                tf.profiler.experimental.stop()
            except (tf.errors.UnavailableError, tf.errors.FailedPreconditionError):
                pass  # no session was left
        self._state = "waiting"

    def _finish(self) -> None:
        """Reads the window and reports; a failure here warns, it never fails the finished fit."""
        self._state = "done"
        try:
            self._report()
        except Exception as error:  # noqa: BLE001 - training is done; the profile is extra
            warnings.warn(
                f"tfpar: StepProfiler could not read its profile ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); training finished normally. "
                f"TensorFlow's trace, if any, is in {self._logdir}.",
                stacklevel=3,
            )
        finally:
            if self._temporary and self.report is None:
                shutil.rmtree(self._logdir, ignore_errors=True)  # nobody reports from this task

    def _report(self) -> None:
        wall = [end - start for start, end, _ in self._wall if end > start]
        wall_steps = sum(steps for start, end, steps in self._wall if end > start) or 1
        wall_step_ms = 1000 * sum(wall) / wall_steps
        covered = self._capture[1] - self._capture[0]
        if self._mode == "parameter_server":
            wall_steps = max(len(self._ends), 1)
            wall_step_ms = 1000 * covered / wall_steps
        if self._remote is not None:
            tasks = self._remote.join(steps=wall_steps, seconds=covered)
        elif self._mode == "multi_worker":
            try:
                own = self._own_profile()
            except Exception as error:  # noqa: BLE001 - the others still wait for this task's post
                warnings.warn(f"tfpar: StepProfiler could not read this worker's profile ({error}).", stacklevel=3)
                own = TaskProfile(_cluster.task_name(self._strategy), _cluster.EMPTY)
            gathered = _cluster.exchange(self._strategy, own)
            if gathered is None:
                return  # a non-chief worker: the chief reports
            tasks = gathered
        elif self._mode == "parameter_server":
            tasks = [_cluster.in_process_profile(self._events(), self._strategy, wall_steps)]
        else:
            tasks = [self._own_profile()]
        if not tasks:
            raise RuntimeError("the trace held no task's events")
        self.report = ProfileReport(
            tasks=tuple(tasks),
            wall_step_ms=wall_step_ms,
            mode=self._mode,
            logdir=str(self._logdir),
        )
        if self.verbose:
            self._log(self.report.table())

    def _events(self) -> list[_xplane.Event]:
        runs = _xplane.runs(self._logdir)
        return [event for host in _xplane.read_run(runs[-1]).values() for event in host] if runs else []

    def _own_profile(self) -> TaskProfile:
        events = self._events()
        windows = _breakdown.step_windows(events)
        timeline = _breakdown.cut(events, windows)
        breakdown = _breakdown.summarize(timeline)
        stages = _stages.stage_times(self.model, events, windows, breakdown.steps)
        return TaskProfile(_cluster.task_name(self._strategy), breakdown, timeline, stages)

