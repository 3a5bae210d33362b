"""What :class:`StepProfiler` found: per-task breakdowns, a table, ``metrics.json``, a trace, a chart."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tfpar.profiling._breakdown import PARTS, Breakdown, Timeline

_COLORS = {"input": "#e15759", "compute": "#4e79a7", "communication": "#f28e2b", "idle": "#bab0ac",
           "other": "#76b7b2"}
_MAX_TRACE_SPANS = 20000  # per task and part: a trace that still opens quickly in Perfetto


@dataclasses.dataclass(frozen=True)
class StageTime:
    """One stage of a split model: measured busy and bubble time per step, and the plan's prediction."""

    stage: int
    device: str
    busy_ms: float
    bubble_ms: float
    predicted_busy_share: float
    predicted_bubble_share: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TaskProfile:
    """One task's (process's) breakdown, its timeline (for the trace) and, for a split model, stages."""

    task: str
    breakdown: Breakdown
    timeline: Timeline | None = None
    stages: tuple[StageTime, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able form to send to the chief (the timeline in microseconds from its start)."""
        spans: dict[str, list[list[float]]] = {}
        origin = 0
        if self.timeline is not None and self.timeline.steps:
            origin = self.timeline.steps[0][1]
            spans = {
                part: [[(start - origin) / 1e3, (end - start) / 1e3] for start, end in intervals[:_MAX_TRACE_SPANS]]
                for part, intervals in self.timeline.parts.items()
            }
            spans["step"] = [[(start - origin) / 1e3, (end - start) / 1e3] for _, start, end in self.timeline.steps]
        return {"task": self.task, "breakdown": dataclasses.asdict(self.breakdown), "spans": spans,
                "stages": [stage.to_json() for stage in self.stages]}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TaskProfile:
        values = dict(data["breakdown"])
        values["top_ops"] = tuple(tuple(item) for item in values.get("top_ops", ()))
        timeline = None
        if data.get("spans"):
            spans = data["spans"]
            to_ns = lambda items: [(int(s * 1e3), int((s + d) * 1e3)) for s, d in items]  # noqa: E731
            timeline = Timeline(
                steps=tuple((1, start, end) for start, end in to_ns(spans.get("step", []))),
                parts={part: to_ns(spans.get(part, [])) for part in PARTS},
                op_time={},
            )
        return cls(str(data["task"]), Breakdown(**values), timeline,
                   tuple(StageTime(**stage) for stage in data.get("stages", ())))


@dataclasses.dataclass(frozen=True)
class ProfileReport:
    """The step breakdown of a training run, for the chief (every task's under a cluster).

    Attributes:
        tasks: One :class:`TaskProfile` per task, the reporting task (chief) first.
        wall_step_ms: The chief's step time by the wall clock, over the profiled steps.
        mode: ``"local"``, ``"multi_worker"`` or ``"parameter_server"``.
        logdir: TensorFlow's trace (``tensorboard --logdir`` it; Profile tab).
    """

    tasks: tuple[TaskProfile, ...]
    wall_step_ms: float
    mode: str
    logdir: str

    @property
    def breakdown(self) -> Breakdown:
        """The chief's breakdown (under parameter_server: the workers' mean)."""
        if self.mode == "parameter_server":
            workers = [task.breakdown for task in self.tasks if task.task.startswith("worker")]
            if workers:
                return _mean(workers)
        return self.tasks[0].breakdown

    def to_json(self) -> dict[str, Any]:
        """``metrics.json``'s ``"step_breakdown"``: the chief's parts, ``per_task`` and ``stages``."""
        data = self.breakdown.to_json()
        data["wall_step_ms"] = self.wall_step_ms
        data["mode"] = self.mode
        data["per_task"] = {task.task: task.breakdown.to_json() for task in self.tasks}
        stages = [stage.to_json() for stage in self.tasks[0].stages]
        if stages:
            data["stages"] = stages
        data["tensorboard_logdir"] = self.logdir
        return data

    def table(self) -> str:
        """A printable table: ms per step and share of each part, per task; stages of a split model."""
        width = max(12, *(len(task.task) + 2 for task in self.tasks))
        header = f"{'task':<{width}}{'step ms':>9}" + "".join(f"{part + ' ms':>17}" for part in PARTS)
        rows = ["== step breakdown (ms per step, share of the step) ==", header]
        for task in self.tasks:
            b = task.breakdown
            shares = b.shares()
            cells = "".join(f"{b.part_ms()[part]:>10.2f} ({100 * shares[part]:>3.0f}%)" for part in PARTS)
            rows.append(f"{task.task:<{width}}{b.step_ms:>9.2f}{cells}")
        chief = self.breakdown
        rows.append(f"wall clock: {self.wall_step_ms:.2f} ms per step over {chief.steps} profiled steps")
        if chief.top_ops:
            rows.append("top ops: " + ", ".join(f"{op} ({part}) {ms:.2f} ms" for part, op, ms in chief.top_ops))
        stages = self.tasks[0].stages
        if stages:
            rows.append(f"{'stage':<7}{'device':<22}{'busy ms':>9}{'bubble ms':>11}{'bubble':>8}{'predicted':>11}")
            for stage in stages:
                total = stage.busy_ms + stage.bubble_ms or 1.0
                rows.append(
                    f"{stage.stage:<7}{stage.device:<22}{stage.busy_ms:>9.2f}{stage.bubble_ms:>11.2f}"
                    f"{100 * stage.bubble_ms / total:>7.0f}%{100 * stage.predicted_bubble_share:>10.0f}%"
                )
        rows.append(f"why: {self.verdict()}")
        return "\n".join(rows)

    def verdict(self) -> str:
        """One sentence: the largest part of the chief's step and what usually helps."""
        shares = self.breakdown.shares()
        part = max(shares, key=lambda name: shares[name])
        advice = {
            "input": "the step waits for data: add parallelism / prefetch to the input pipeline, or cache it",
            "compute": "the step is compute-bound: a larger per-replica batch or more devices help, "
                       "communication does not matter yet",
            "communication": "exposed communication: larger batches, gradient accumulation or fewer, "
                             "larger all-reduces help",
            "idle": "the step function waits with nothing running: peers or parameter servers are slow, "
                    "or ops are too small to keep the cores busy (try a larger batch)",
            "other": "Python and callbacks dominate: raise steps_per_execution, or lighten the callbacks",
        }[part]
        return f"{part} is {100 * shares[part]:.0f}% of the step; {advice}."

    def write_trace(self, path: str | Path) -> Path:
        """Writes a Chrome trace-event JSON (one process track per task; opens in Perfetto)."""
        events: list[dict[str, Any]] = []
        for pid, task in enumerate(self.tasks):
            events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": task.task}})
            if task.timeline is None or not task.timeline.steps:
                continue
            origin = task.timeline.steps[0][1]
            tracks = [("step", [(start, end) for _, start, end in task.timeline.steps])]
            tracks += [(part, list(task.timeline.parts.get(part, []))) for part in PARTS]
            for tid, (name, spans) in enumerate(tracks):
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
                for index, (start, end) in enumerate(spans[:_MAX_TRACE_SPANS]):
                    events.append({
                        "ph": "X", "pid": pid, "tid": tid, "cat": name,
                        "name": f"step {index}" if name == "step" else name,
                        "ts": (start - origin) / 1e3, "dur": (end - start) / 1e3,
                    })
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        return path

    def plot(self, path: str | Path) -> Path:
        """Writes a PNG: one stacked bar per task (ms per step by part); stage bars for a split model."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        stages = self.tasks[0].stages
        columns = 2 if stages else 1
        figure, axes = plt.subplots(1, columns, figsize=(5 + 4 * columns, 0.6 * len(self.tasks) + 2.8))
        axis = axes[0] if columns == 2 else axes
        names = [task.task for task in self.tasks]
        left = [0.0] * len(self.tasks)
        for part in PARTS:
            values = [task.breakdown.part_ms()[part] for task in self.tasks]
            axis.barh(names, values, left=left, color=_COLORS[part], label=part)
            left = [a + b for a, b in zip(left, values)]
        axis.invert_yaxis()
        axis.set_xlabel("ms per step")
        axis.set_title("where the step time goes")
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(PARTS), fontsize="small")
        if stages:
            axis = axes[1]
            labels = [f"stage {stage.stage}" for stage in stages]
            axis.barh(labels, [s.busy_ms for s in stages], color=_COLORS["compute"], label="busy")
            axis.barh(labels, [s.bubble_ms for s in stages], left=[s.busy_ms for s in stages],
                      color=_COLORS["idle"], label="bubble")
            for y, stage in enumerate(stages):
                total = stage.busy_ms + stage.bubble_ms
                axis.plot([total * (1 - stage.predicted_bubble_share)] * 2, [y - 0.4, y + 0.4], "k--")
            axis.invert_yaxis()
            axis.set_xlabel("ms per step (dashed: the plan's predicted busy time)")
            axis.set_title("split model: busy and bubble per stage")
            axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize="small")
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def _mean(items: Sequence[Breakdown]) -> Breakdown:
    count = len(items)
    values = {f"{part}_ms": sum(getattr(item, f"{part}_ms") for item in items) / count for part in PARTS}
    return Breakdown(steps=sum(item.steps for item in items), step_ms=sum(values.values()),
                     top_ops=items[0].top_ops, **values)
