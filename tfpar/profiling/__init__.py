"""Where the step time goes: a per-step breakdown built on TensorFlow's profiler.

:class:`StepProfiler` (also ``tfpar.training.StepProfiler``) profiles a window of training
steps and splits each into input wait, compute, communication, idle and the rest, per task of a
cluster; ``tfpar train --profile`` adds it to the main job and writes the table, ``trace.json``
(Chrome trace events, opens in Perfetto) and ``step_breakdown.png`` next to ``metrics.json``.

Example:
>>> profiler = tfpar.profiling.StepProfiler(warmup_steps=5, steps=10)
>>> model.fit(x, y, epochs=2, callbacks=[profiler])
>>> profiler.report.to_json()["compute_ms"]
12.3...
"""

from __future__ import annotations

from tfpar.profiling._breakdown import PARTS, Breakdown
from tfpar.profiling._callback import StepProfiler
from tfpar.profiling._report import ProfileReport, StageTime, TaskProfile

__all__ = ["PARTS", "Breakdown", "ProfileReport", "StageTime", "StepProfiler", "TaskProfile"]
