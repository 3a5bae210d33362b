"""Reads the host events of TensorFlow profiler traces (``*.xplane.pb``) into plain tuples.

``tf.profiler.experimental.start/stop`` (one process) and
``tf.profiler.experimental.client.trace`` (the tasks of a cluster, over their gRPC servers) both
write one XSpace per host into ``<logdir>/plugins/profile/<run>/``: the files TensorBoard's Profile
tab reads. This module only reads them; nothing here changes what TensorFlow records.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tensorflow.tsl.profiler.protobuf import xplane_pb2

HOST_PLANE = "/host:CPU"
STEP_MARKER = "tfpar_step"  # the TraceMe StepProfiler wraps each step in (TensorBoard's step marker)


@dataclasses.dataclass(frozen=True)
class Event:
    """One traced event: `line` is the thread's name (``tf_Compute/...``, ``python``, ...)."""

    line: str
    name: str
    start_ns: int
    end_ns: int
    step: int = -1  # the ``step_num`` of a step marker (TraceMe with ``_r=1``), else -1
    steps: int = 1  # the steps a step marker covers (``steps_per_execution``)


def runs(logdir: str | Path) -> list[Path]:
    """The profile runs under `logdir`, oldest first (one directory per capture)."""
    root = Path(logdir) / "plugins" / "profile"
    return sorted(path for path in root.glob("*") if path.is_dir()) if root.is_dir() else []


def read_run(run: Path) -> dict[str, list[Event]]:
    """``{host file stem: host events}`` of one capture (the stem names the task for remote traces)."""
    return {path.name[: -len(".xplane.pb")]: read_events(path) for path in sorted(run.glob("*.xplane.pb"))}


def read_events(path: str | Path) -> list[Event]:
    """Every event of the host plane of one ``.xplane.pb`` file, in absolute nanoseconds."""
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(path).read_bytes())
    events: list[Event] = []
    for plane in space.planes:
        if plane.name != HOST_PLANE:
            continue
        names = {key: value.name for key, value in plane.event_metadata.items()}
        stat_names = {key: value.name for key, value in plane.stat_metadata.items()}
        for line in plane.lines:
            base_ps = line.timestamp_ns * 1000
            label = line.name or line.display_name
            for event in line.events:
                start_ps = base_ps + event.offset_ps
                name = names.get(event.metadata_id, "")
                stats = _marker_stats(event, stat_names) if name == STEP_MARKER else {}
                events.append(
                    Event(label, name, start_ps // 1000, (start_ps + event.duration_ps) // 1000,
                          stats.get("step_num", -1), max(1, stats.get("steps", 1)))
                )
    return events


def _marker_stats(event: xplane_pb2.XEvent, stat_names: dict[int, str]) -> dict[str, int]:
    values: dict[str, int] = {}
    for stat in event.stats:
        kind = stat.WhichOneof("value")
        if kind in ("int64_value", "uint64_value"):
            values[stat_names.get(stat.metadata_id, "")] = int(getattr(stat, kind))
        elif kind == "str_value" and stat.str_value.isdigit():
            values[stat_names.get(stat.metadata_id, "")] = int(stat.str_value)
    return values
