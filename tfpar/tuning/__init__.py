"""Tuning: measure a few training settings with short fits and train with the fastest.

:func:`tune` tries the per-replica batch size, ``steps_per_execution``, gradient accumulation
(multi-worker) and micro-batches (a split model) within a time budget, restores the model, and
returns a :class:`TuningResult` (the candidates with their samples/s, the chosen setting, a table,
a plot, JSON for ``metrics.json``). ``tfpar train --tune`` runs it before training.

Modules, one concept each: ``_candidates`` (which settings, in which order; no TensorFlow),
``_state`` (saving, restoring and applying settings to a model), ``_agree`` (multi-worker
agreement on measured numbers), ``_measure`` (one timed ``fit``), ``_report`` (the result, its
table and plot; no TensorFlow), ``_tune`` (the search and its budget).

Example:
    >>> with tfpar.scope("mirrored"):
    ...     model = tfpar.models.alexnet(input_shape=(64, 64, 3), num_classes=10, width=0.25)
    ...     model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    ...     result = tfpar.tuning.tune(model, x, y, batch_size=64, budget_seconds=20)
    >>> result.chosen  # doctest: +SKIP
    {'batch_size': 256, 'steps_per_execution': 1}
"""

from tfpar.tuning._agree import Agreement, is_multi_worker
from tfpar.tuning._candidates import candidate_settings
from tfpar.tuning._report import Candidate, TuningResult, describe
from tfpar.tuning._state import apply_settings
from tfpar.tuning._tune import DEFAULT_BUDGET_SECONDS, tune

__all__ = [
    "DEFAULT_BUDGET_SECONDS",
    "Agreement",
    "Candidate",
    "TuningResult",
    "apply_settings",
    "candidate_settings",
    "describe",
    "is_multi_worker",
    "tune",
]
