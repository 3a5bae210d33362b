"""Profiles across the tasks of a cluster: gathered by the chief, or traced from the coordinator.

* ``multi_worker``: every worker profiles its own steps (the same steps: they run in lockstep)
  and puts its :class:`TaskProfile` into the coordination service's key-value store; the chief
  reads every worker's.
* ``parameter_server``: the workers and parameter servers run no Python of the user's; the
  coordinator asks their gRPC servers (each one serves TensorFlow's profiler) for a trace of the
  window's duration with ``tf.profiler.experimental.client.trace``. A task's breakdown is then
  its busy time by part over the capture, per step it ran, and the rest is idle.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import warnings
from pathlib import Path

import tensorflow as tf

from tfpar._compat import internals
from tfpar.cluster._local import in_process_spec
from tfpar.profiling import _breakdown, _xplane
from tfpar.profiling import _intervals as iv
from tfpar.profiling._report import TaskProfile

EXCHANGE_TIMEOUT = 120.0  # seconds the chief waits for the workers' profiles, all together
EMPTY = _breakdown.Breakdown(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # a task without a profile
_COUNT = [0]


def mode(strategy: tf.distribute.Strategy) -> str:
    """``"parameter_server"``, ``"multi_worker"`` (more than one task) or ``"local"``."""
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        return "parameter_server"
    resolver = getattr(strategy, "cluster_resolver", None)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and resolver is not None:
        spec = resolver.cluster_spec().as_dict()
        if sum(len(tasks) for tasks in spec.values()) > 1:
            return "multi_worker"
    return "local"


def task_name(strategy: tf.distribute.Strategy) -> str:
    """``"chief 0"``, ``"worker 1"``... under a cluster; ``"local"`` in one process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if mode(strategy) == "local" or resolver is None:
        return "local"
    return f"{resolver.task_type} {resolver.task_id}"


def exchange(strategy: tf.distribute.Strategy, own: TaskProfile) -> list[TaskProfile] | None:
    """multi_worker: every task posts `own`; the chief returns all (its own first), others None.

    Every worker calls it once per fit, at the same point (the end of training), so the n-th
    call of each meets the others' n-th. A worker whose profile does not arrive within
    :data:`EXCHANGE_TIMEOUT` (all together) is reported empty, with a warning.
    """
    _COUNT[0] += 1
    prefix = f"tfpar/profile/{_COUNT[0]}"
    internals.set_key(f"{prefix}/{own.task}", json.dumps(own.to_wire()))
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    tasks = [f"{job} {index}" for job in ("chief", "worker") for index in range(len(spec.get(job, [])))]
    chief = "chief 0" if "chief 0" in tasks else "worker 0"
    if own.task != chief:
        return None
    gathered = [own]
    deadline = time.monotonic() + EXCHANGE_TIMEOUT
    for task in tasks:
        if task == own.task:
            continue
        try:
            wire = internals.get_key(f"{prefix}/{task}", max(1.0, deadline - time.monotonic()))
            gathered.append(TaskProfile.from_wire(json.loads(wire)))
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.InternalError,
                tf.errors.AbortedError, ValueError, KeyError, TypeError) as error:
            warnings.warn(f"tfpar: StepProfiler got no profile from {task} ({type(error).__name__}); "
                          "it is reported empty.", stacklevel=3)
            gathered.append(TaskProfile(task, EMPTY))
    return gathered


def in_process(strategy: tf.distribute.Strategy) -> bool:
    """parameter_server: whether the workers and ps tasks are servers in this process
    (``tfpar.local_cluster``): one profiler session then sees them all, and cannot tell them apart."""
    return internals.ps_cluster_spec(strategy) == in_process_spec()


def in_process_profile(events: list[_xplane.Event], strategy: tf.distribute.Strategy, steps: int) -> TaskProfile:
    """The busy breakdown of an in-process cluster's threads, per coordinator step."""
    spec = internals.ps_cluster_spec(strategy)
    shape = ", ".join(f"{len(spec.get(job, []))} {job}" for job in ("worker", "ps"))
    return TaskProfile(f"in-process cluster ({shape})", _busy_breakdown(events, float(max(steps, 1))))


class RemoteCapture:
    """parameter_server: traces every worker and parameter server for `seconds`, in a thread."""

    def __init__(self, strategy: tf.distribute.Strategy, logdir: Path, seconds: float) -> None:
        spec = internals.ps_cluster_spec(strategy)
        # TensorFlow names each task's file "<host>_<port>.xplane.pb"
        self._tasks = {
            address.replace(":", "_"): f"{job} {index}"
            for job in ("worker", "ps") for index, address in enumerate(spec.get(job, []))
        }
        self._addresses = [f"grpc://{address}" for job in ("worker", "ps") for address in spec.get(job, [])]
        self._workers = len(spec.get("worker", []))
        self._logdir = logdir
        self._seconds = min(max(seconds, 1.0), 30.0)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tfpar-profile-capture", daemon=True)

    def start(self) -> None:
        self._logdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            tf.profiler.experimental.client.trace(
                ",".join(self._addresses), str(self._logdir), duration_ms=int(self._seconds * 1000)
            )
        except Exception as error:  # reported by join(), never lost
            self._error = error

    def join(self, steps: int, seconds: float) -> list[TaskProfile]:
        """Waits for the capture; one profile per task. `steps` ended in the first `seconds` of
        the capture (after that, training may have ended): the workers share them (a worker's
        step is the time between two steps it runs); a ps serves every step."""
        self._thread.join(timeout=self._seconds + 120)
        if self._thread.is_alive() or self._error is not None:
            raise RuntimeError(
                f"tfpar: StepProfiler could not trace the cluster's tasks {self._addresses}: "
                f"{self._error or 'no answer within the window plus 120 s'}"
            )
        runs = _xplane.runs(self._logdir)
        profiles = []
        for host, events in (_xplane.read_run(runs[-1]).items() if runs else []):
            task = self._tasks.get(host) or _by_port(self._tasks, host)
            per_task_steps = steps / self._workers if task.startswith("worker") else steps
            profiles.append(TaskProfile(task, _busy_breakdown(events, max(per_task_steps, 1.0), seconds)))
        order = {name: index for index, name in enumerate(self._tasks.values())}
        return sorted(profiles, key=lambda profile: order.get(profile.task, len(order)))


def _by_port(self_tasks: dict[str, str], host: str) -> str:
    """A file named by another spelling of the host (localhost vs 127.0.0.1): the task with that
    port, if only one has it; else the file's own name."""
    port = host.rsplit("_", 1)[-1]
    matches = [task for address, task in self_tasks.items() if address.rsplit("_", 1)[-1] == port]
    return matches[0] if len(matches) == 1 else host


def _busy_breakdown(events: list[_xplane.Event], steps: float, seconds: float | None = None) -> _breakdown.Breakdown:
    """A task without step markers: its parts over the capture (`seconds` long, default: from its
    first event to its last), per step; the rest is idle."""
    if not events:
        return EMPTY
    first = min(event.start_ns for event in events)
    last = max(event.end_ns for event in events)
    window = [(first, first + int(seconds * 1e9) if seconds else last)]
    timeline = _breakdown.cut(events, [(1, *window[0])])
    busy = iv.union(timeline.parts["compute"] + timeline.parts["communication"] + timeline.parts["input"])
    parts = {**timeline.parts, "idle": iv.subtract(window, busy), "other": []}
    return _breakdown.summarize(dataclasses.replace(timeline, parts=parts), steps)
