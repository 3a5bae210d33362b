"""Busy and bubble time of each stage of a split model, next to the plan's prediction.

``tfpar.parallel.split`` runs each stage's forward and backward ops under a name scope
``tfpar_s<stage>_...`` (see ``tfpar.parallel.placed_model``), so an op's name says its stage.
A stage's busy time is the union of its ops' time in the step windows; the rest of the step is
its bubble. The prediction is GPipe's: with ``m`` micro-batches and ``p`` stages a step lasts
``(m + p - 1)`` micro-batch slots of the slowest stage, of which stage ``i`` is busy for
``m * load_i / max_load``.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

from tfpar.profiling import _intervals as iv
from tfpar.profiling._breakdown import category
from tfpar.profiling._report import StageTime
from tfpar.profiling._xplane import Event

_STAGE = re.compile(r"(?:^|/)tfpar_s(\d+)_")


def stage_times(model: Any, events: Sequence[Event], windows: Sequence[tuple[int, int, int]],
                steps: int) -> tuple[StageTime, ...]:
    """One :class:`StageTime` per stage when `model` is a split model, else ``()``."""
    plan = getattr(model, "plan", None)
    stages = getattr(plan, "stages", None)
    if not stages or not windows:
        return ()
    step_set = iv.union((start, end) for _, start, end in windows)
    step_ms = iv.length(step_set) / 1e6 / max(steps, 1)
    spans: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for event in events:
        match = _STAGE.search(event.name)
        if match and category(event) in ("compute", "communication"):
            spans[int(match.group(1))].append((event.start_ns, event.end_ns))
    busiest = max(stage.load for stage in stages) or 1.0
    busy_share = 1.0 - float(getattr(plan, "bubble", 0.0))
    result = []
    for index, stage in enumerate(stages):
        busy = iv.length(iv.intersect(iv.union(spans.get(index, [])), step_set)) / 1e6 / max(steps, 1)
        predicted = busy_share * stage.load / busiest
        result.append(StageTime(index, str(stage.device), busy, max(0.0, step_ms - busy), predicted,
                                1.0 - predicted))
    return tuple(result)
