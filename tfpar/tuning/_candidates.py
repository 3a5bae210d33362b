"""The settings a search tries, most promising first. Pure Python, no TensorFlow.

On CPU (and on an accelerator until memory runs out) a larger per-replica batch is the biggest
lever: fewer steps, fewer all-reduces, better-filled kernels. ``steps_per_execution`` saves the
per-step host work (one ``tf.function`` call, callbacks, log reads) and matters when steps are
short. Gradient accumulation halves or quarters the all-reduces of a multi-worker job. Micro-batches
fill a split model's pipeline. The order below follows that: the default, then the batch doublings,
then the other knobs on the default and doubled batch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LARGER_STEPS_PER_EXECUTION", "BATCH_FACTORS", "candidate_settings"]

BATCH_FACTORS = (2, 4)
LARGER_STEPS_PER_EXECUTION = 4
ACCUMULATION_STEPS = 4
MICROBATCHES = (2, 4)


def candidate_settings(
    default: dict[str, Any],
    *,
    replicas: int,
    examples: int,
    multi_worker: bool = False,
    microbatches: bool = False,
) -> list[dict[str, Any]]:
    """The settings to measure, the default first, then the most promising.

    Args:
        default: The default setting: ``batch_size`` and ``steps_per_execution``, and, when they
            apply, ``gradient_accumulation_steps`` and ``microbatches``.
        replicas: Replicas in sync (the global batch is the per-replica batch times this).
        examples: Training examples: no global batch is larger (capped to a multiple of
            `replicas`).
        multi_worker: Add gradient accumulation (1 and 4 steps, with ``steps_per_execution=1``,
            the only combination tfpar's accumulation runs).
        microbatches: Add micro-batch counts (a split model).

    Returns:
        Settings dicts, no two equal, the first being `default`.

    Example:
        >>> tfpar.tuning.candidate_settings({"batch_size": 64, "steps_per_execution": 1},
        ...                                 replicas=2, examples=1437)[:3]
        [{'batch_size': 64, 'steps_per_execution': 1}, {'batch_size': 128, 'steps_per_execution': 1},
         {'batch_size': 256, 'steps_per_execution': 1}]
    """
    batch = int(default["batch_size"])
    largest = max(batch, examples // replicas * replicas)
    batches = [batch]
    for factor in BATCH_FACTORS:
        size = min(batch * factor, largest)
        if size not in batches:
            batches.append(size)
    spe = int(default["steps_per_execution"])
    other_spe = LARGER_STEPS_PER_EXECUTION if spe == 1 else 1
    found: list[dict[str, Any]] = []

    def add(**changes: Any) -> None:
        settings = {**default, **changes}
        if settings not in found:
            found.append(settings)

    add()
    # Groups of settings that share one traced train function, the batch sizes inside each (a
    # batch size of another shape costs at most one more trace, with the batch dimension relaxed;
    # any other change costs a full trace). The default's group first: on CPU the batch is the
    # largest lever; then the other knobs, from the largest batch down.
    for size in batches[1:]:
        add(batch_size=size)
    groups: list[dict[str, Any]] = [{"steps_per_execution": other_spe}]
    if multi_worker:
        groups.append({"steps_per_execution": 1, "gradient_accumulation_steps": ACCUMULATION_STEPS})
        if int(default.get("gradient_accumulation_steps") or 1) != 1:
            groups.append({"gradient_accumulation_steps": 1})
    if microbatches:
        groups += [{"microbatches": m} for m in MICROBATCHES]
    for changes in groups:
        for size in reversed(batches):
            add(batch_size=size, **changes)
    return found
