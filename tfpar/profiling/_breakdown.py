"""Where a step's time goes: input wait, compute, communication, idle and the rest.

Each step's window (from one step's start to the next's, on the training thread) is cut into
disjoint parts, from the host events of TensorFlow's profiler (see :mod:`._xplane`):

* **compute**: some TensorFlow op of the step runs (on any thread; intra-op Eigen work included);
* **communication**: no compute, but a collective, a cross-device or cross-task send/receive or a
  remote variable read is in flight (exposed communication: what overlaps compute is compute);
* **input**: none of those, but the step waits for its next batch (``IteratorGetNext*``);
* **idle**: inside the step function, nothing of the above runs (executor scheduling, waiting);
* **other**: outside the step function on the training thread: Keras's loop, callbacks, Python.

The parts add up to the window by construction. The report puts the window next to the
wall-clock step time the callback measures over the same steps (two independent clocks; the
tests check they agree). Only the host is read: on a GPU or TPU, device time the host does not
wait for is not in these parts (CPU training, what this was built and tested on, is complete).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tfpar.profiling import _intervals as iv
from tfpar.profiling._xplane import STEP_MARKER, Event

PARTS = ("input", "compute", "communication", "idle", "other")

_OP = re.compile(r"^[^\s:]+(?::[^\s:]+)*?:(_?[A-Z][A-Za-z0-9_]*)$")
_INPUT_TYPES = frozenset({
    "IteratorGetNext", "IteratorGetNextAsOptional", "IteratorGetNextSync", "MultiDeviceIteratorGetNextFromShard",
})
_COMMUNICATION_TYPES = frozenset({
    "CollectiveReduce", "CollectiveReduceV2", "CollectiveReduceV3", "CollectiveGather", "CollectiveGatherV2",
    "CollectiveBcastSend", "CollectiveBcastRecv", "CollectiveBcastSendV2", "CollectiveBcastRecvV2",
    "CollectiveAllToAllV2", "CollectiveAllToAllV3", "CollectiveReduceScatterV2", "NcclAllReduce", "NcclReduce",
    "NcclBroadcast", "_Send", "_Recv", "_HostSend", "_HostRecv", "Send", "Recv", "_ScopedAllocatorConcat",
})
# Ops that only call a function: their time is that of the ops inside, counted there.
_CALL_TYPES = frozenset({
    "StatefulPartitionedCall", "PartitionedCall", "While", "StatelessWhile", "If", "StatelessIf", "Case",
    "StatelessCase", "RemoteCall", "_Arg", "_Retval", "NoOp", "_DeviceArg", "_DeviceRetval",
})
_INPUT_LINES = ("tf_data_iterator_get_next", "tf_data_multi_device_iterator_get_next")
_PIPELINE_LINES = ("tf_data",)  # input-pipeline producer threads: overlapped with the step, not in it
_COMMUNICATION_LINES = ("collective_ops",)
_COMMUNICATION_NAMES = ("RecvTensor", "RecvBuf", "CollectiveRemoteAccess")
_INTRA_OP_LINES = ("tf_numa_", "tf_intra_op", "Eigen")
_SERVICE_CALLS = ("EagerService:", "WorkerService:", "CoordinationService:")  # RPC handlers, not ops
_FUNCTION_EXECUTION = "EagerLocalExecute: __inference"


def op_type(name: str) -> str | None:
    """The op type of a TraceMe named ``op_name:OpType``, else None (``Executor::Process``...)."""
    if "::" in name or name.startswith(_SERVICE_CALLS):
        return None
    match = _OP.match(name)
    return match.group(1) if match else None


def category(event: Event) -> str | None:
    """'input', 'communication', 'compute' or None (not part of a step's critical work)."""
    kind = op_type(event.name)
    if event.line.startswith(_INPUT_LINES) or kind in _INPUT_TYPES:
        return "input"
    if (event.line.startswith(_COMMUNICATION_LINES) or kind in _COMMUNICATION_TYPES
            or any(word in event.name for word in _COMMUNICATION_NAMES)):
        return "communication"
    if event.line.startswith(_PIPELINE_LINES):
        return None
    if kind is not None and kind not in _CALL_TYPES:
        return "compute"
    if any(part in event.line for part in _INTRA_OP_LINES):
        return "compute"
    return None


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """Milliseconds per step of one task, and how they split.

    Attributes:
        steps: Steps the numbers average over.
        step_ms: Time per step (the parts add up to it).
        input_ms: Waiting for the next batch while nothing else runs.
        compute_ms: Some op of the step runs (forward, backward, optimizer update).
        communication_ms: Only communication is in flight (all-reduce, send/receive, remote reads).
        idle_ms: Inside the step function with nothing running (scheduling gaps, waiting).
        other_ms: Outside the step function: Keras's loop, callbacks, Python.
        top_ops: The op types that took most time, ``(part, op type, ms per step)``.
    """

    steps: int
    step_ms: float
    input_ms: float
    compute_ms: float
    communication_ms: float
    idle_ms: float
    other_ms: float
    top_ops: tuple[tuple[str, str, float], ...] = ()

    def part_ms(self) -> dict[str, float]:
        """``{part: ms per step}`` in the order of :data:`PARTS`."""
        return {part: getattr(self, f"{part}_ms") for part in PARTS}

    def shares(self) -> dict[str, float]:
        """``{part: fraction of the step}``; they sum to 1."""
        total = self.step_ms or 1.0
        return {part: value / total for part, value in self.part_ms().items()}

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` form: ``step_ms``, ``<part>_ms``, ``shares``, ``steps``, ``top_ops``."""
        return {
            "steps": self.steps,
            "step_ms": self.step_ms,
            **{f"{part}_ms": value for part, value in self.part_ms().items()},
            "shares": self.shares(),
            "top_ops": [{"part": part, "op": op, "ms": ms} for part, op, ms in self.top_ops],
        }


@dataclasses.dataclass(frozen=True)
class Timeline:
    """One task's captured window, cut into parts: the data behind a breakdown and the trace."""

    steps: tuple[tuple[int, int, int], ...]  # (steps in the window, start ns, end ns)
    parts: Mapping[str, iv.Intervals]  # part -> disjoint intervals inside the step windows
    op_time: Mapping[tuple[str, str], int]  # (part, op type) -> ns inside the step windows


def step_windows(events: Sequence[Event]) -> list[tuple[int, int, int]]:
    """``(steps, start, end)``: from one step marker's start to the next one's.

    A marker whose successor does not follow it directly (a new epoch, with validation and the
    epoch-end callbacks in between), or the last marker, ends at the marker's own end instead.
    """
    markers = sorted(
        (event.start_ns, event.end_ns, event.step, event.steps) for event in events
        if event.name == STEP_MARKER and event.step >= 0
    )
    windows = []
    for index, (start, end, step, steps) in enumerate(markers):
        following = markers[index + 1] if index + 1 < len(markers) else None
        if following is not None and following[2] == step + steps:
            windows.append((steps, start, following[0]))
        else:
            windows.append((steps, start, end))
    return windows


def cut(events: Sequence[Event], windows: Sequence[tuple[int, int, int]]) -> Timeline:
    """Cuts the step windows into the parts of :data:`PARTS` (disjoint; they cover each window)."""
    step_set = iv.union((start, end) for _, start, end in windows)
    by_part: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    function: list[tuple[int, int]] = []
    ops: dict[tuple[str, str], list[tuple[int, int]]] = collections.defaultdict(list)
    # The training thread is the one with the step markers. Its trace line is named after the OS
    # thread, i.e. the process ("python3", "tfpar", a script's name), so the name cannot be fixed.
    training = {event.line for event in events if event.name == STEP_MARKER}
    for event in events:
        if event.name.startswith(_FUNCTION_EXECUTION) and (not training or event.line in training):
            function.append((event.start_ns, event.end_ns))
            continue
        part = category(event)
        if part is None:
            continue
        by_part[part].append((event.start_ns, event.end_ns))
        kind = op_type(event.name)
        if kind is not None:
            ops[(part, kind)].append((event.start_ns, event.end_ns))
    function_set = iv.intersect(iv.union(function), step_set)
    compute = iv.intersect(iv.union(by_part["compute"]), step_set)
    communication = iv.subtract(iv.intersect(iv.union(by_part["communication"]), step_set), compute)
    busy = iv.union(compute + communication)
    input_wait = iv.subtract(iv.intersect(iv.union(by_part["input"]), step_set), busy)
    busy = iv.union(busy + input_wait)
    idle = iv.subtract(function_set, busy)
    other = iv.subtract(step_set, iv.union(busy + function_set))
    op_time = {key: iv.length(iv.intersect(iv.union(spans), step_set)) for key, spans in ops.items()}
    return Timeline(
        steps=tuple(windows),
        parts={"input": input_wait, "compute": compute, "communication": communication, "idle": idle,
               "other": other},
        op_time=op_time,
    )


def summarize(timeline: Timeline, steps: float | None = None, top: int = 5) -> Breakdown:
    """Averages a timeline over its steps (or over `steps`, for a window without step markers:
    a parameter-server task's share of the coordinator's steps, not always a whole number)."""
    count = steps if steps is not None else sum(window[0] for window in timeline.steps)
    count = max(count, 1)
    ms = {part: iv.length(spans) / 1e6 / count for part, spans in timeline.parts.items()}
    ranked = sorted(timeline.op_time.items(), key=lambda item: -item[1])[:top]
    return Breakdown(
        steps=int(round(count)),
        step_ms=sum(ms.values()),
        top_ops=tuple((part, kind, ns / 1e6 / count) for (part, kind), ns in ranked),
        **{f"{part}_ms": ms[part] for part in PARTS},
    )
