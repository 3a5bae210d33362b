"""What a search found: :class:`Candidate` (one measured setting) and :class:`TuningResult`.

Pure Python (matplotlib only for :meth:`TuningResult.plot`); no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Candidate", "TuningResult", "describe"]

# The order settings are printed in (also the order of the table's columns).
SETTING_NAMES = ("batch_size", "steps_per_execution", "gradient_accumulation_steps", "microbatches")
_LABELS = {
    "batch_size": "batch",
    "steps_per_execution": "steps_per_execution",
    "gradient_accumulation_steps": "accumulation",
    "microbatches": "microbatches",
}


def describe(settings: Mapping[str, Any]) -> str:
    """``"batch 128, steps_per_execution 4"``: the settings in words, in a fixed order.

    Example:
        >>> tfpar.tuning.describe({"steps_per_execution": 4, "batch_size": 128})
        'batch 128, steps_per_execution 4'
    """
    names = [n for n in SETTING_NAMES if n in settings] + sorted(n for n in settings if n not in SETTING_NAMES)
    return ", ".join(f"{_LABELS.get(name, name)} {settings[name]}" for name in names)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting the search tried.

    Attributes:
        settings: The setting, e.g. ``{"batch_size": 128, "steps_per_execution": 4}`` (batch size
            global, over all replicas).
        samples_per_second: Training examples per second over the timed steps (agreed by all
            workers under multi-worker), or None if the setting failed.
        seconds: Wall time the measurement took, tracing and warm-up included.
        error: Why the setting failed (``"ResourceExhaustedError: ..."``), or None.
    """

    settings: dict[str, Any]
    samples_per_second: float | None
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the setting ran (it can be chosen)."""
        return self.error is None and self.samples_per_second is not None

    def to_json(self) -> dict[str, Any]:
        """``{"settings", "samples_per_second", "seconds", "error"}``, JSON-serializable."""
        return {
            "settings": dict(self.settings),
            "samples_per_second": self.samples_per_second,
            "seconds": self.seconds,
            "error": self.error,
        }


@dataclasses.dataclass(frozen=True)
class TuningResult:
    """The outcome of :func:`tfpar.tuning.tune`.

    Attributes:
        candidates: Every measured setting, in the order measured (the default first), failed
            ones included (with ``error`` set).
        chosen: The fastest setting that ran.
        default: The setting the search started from (always measured first).
        seconds: Wall time of the whole search, restoring the model included.
        budget_seconds: The budget the search had.
        skipped: Settings not measured because the budget would have been exceeded.
    """

    candidates: list[Candidate]
    chosen: dict[str, Any]
    default: dict[str, Any]
    seconds: float
    budget_seconds: float
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def default_candidate(self) -> Candidate:
        """The measurement of the default setting."""
        return next(c for c in self.candidates if c.settings == self.default)

    @property
    def chosen_candidate(self) -> Candidate:
        """The measurement of the chosen setting."""
        return next(c for c in self.candidates if c.settings == self.chosen and c.ok)

    @property
    def speedup(self) -> float | None:
        """Measured samples/s of the chosen setting over the default's (None if the default failed)."""
        default = self.default_candidate.samples_per_second
        chosen = self.chosen_candidate.samples_per_second
        return chosen / default if default and chosen else None

    def to_json(self) -> dict[str, Any]:
        """The result as JSON (the ``"tuning"`` entry of ``metrics.json``).

        Returns:
            ``{"candidates": [...], "chosen": {...}, "default": {...}, "seconds": s,
            "budget_seconds": b, "skipped": [...]}``.

        Example:
            >>> json.dumps(result.to_json())  # doctest: +SKIP
        """
        return {
            "candidates": [c.to_json() for c in self.candidates],
            "chosen": dict(self.chosen),
            "default": dict(self.default),
            "seconds": self.seconds,
            "budget_seconds": self.budget_seconds,
            "skipped": [dict(s) for s in self.skipped],
        }

    def table(self) -> str:
        """A printable table: one row per candidate, the chosen one marked with ``*``.

        Example:
            >>> print(result.table())  # doctest: +SKIP
              batch  steps_per_execution  samples/s  vs default  seconds
            *   128                    1      812.0       1.21x      2.9
        """
        names = [n for n in SETTING_NAMES if any(n in c.settings for c in self.candidates)]
        headers = ["", *(_LABELS[n] for n in names), "samples/s", "vs default", "seconds", "error"]
        default = self.default_candidate.samples_per_second
        rows = []
        for candidate in self.candidates:
            rate = candidate.samples_per_second
            chosen = candidate.ok and candidate.settings == self.chosen
            rows.append([
                "*" if chosen else "",
                *(str(candidate.settings.get(n, "-")) for n in names),
                f"{rate:.1f}" if rate is not None else "-",
                f"{rate / default:.2f}x" if rate is not None and default else "-",
                f"{candidate.seconds:.1f}",
                _short(candidate.error),
            ])
        widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers))]
        lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)).rstrip()]
        lines += ["  ".join(v.rjust(w) if i < len(widths) - 1 else v for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                  for r in rows]
        footer = f"chosen (*): {describe(self.chosen)}"
        if self.speedup is not None:
            footer += f", {self.speedup:.2f}x the default's samples/s"
        footer += f"; search {self.seconds:.1f} s of a {self.budget_seconds:.0f} s budget"
        if self.skipped:
            footer += f", {len(self.skipped)} setting(s) left out for the budget"
        return "\n".join([*lines, footer])

    def plot(self, path: str | Path) -> Path:
        """Writes a PNG bar chart of samples/s per candidate (chosen highlighted, failed in grey).

        Args:
            path: The PNG file to write (its directory must exist).

        Returns:
            The path written.

        Example:
            >>> result.plot("tuning.png")  # doctest: +SKIP
        """
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        path = Path(path)
        labels = [describe(c.settings).replace(", ", "\n") for c in self.candidates]
        rates = [c.samples_per_second or 0.0 for c in self.candidates]
        colors = ["tab:orange" if c.ok and c.settings == self.chosen else ("tab:blue" if c.ok else "lightgrey")
                  for c in self.candidates]
        figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 4.5))
        try:
            bars = axes.bar(range(len(labels)), rates, color=colors)
            for bar, candidate in zip(bars, self.candidates):
                text = "failed" if not candidate.ok else f"{candidate.samples_per_second:.0f}"
                axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                              va="bottom", fontsize=8)
            axes.set_xticks(range(len(labels)), labels, fontsize=7)
            axes.set_ylabel("samples/s")
            axes.set_title(f"tfpar tune: chosen (orange) {describe(self.chosen)}", fontsize=10)
            figure.tight_layout()
            figure.savefig(path, dpi=100)
        finally:
            plt.close(figure)
        return path


def _short(error: str | None, limit: int = 60) -> str:
    if not error:
        return ""
    line = error.splitlines()[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def fastest(candidates: list[Candidate]) -> Candidate | None:
    """The candidate with the highest samples/s among those that ran (the first on a tie)."""
    best: Candidate | None = None
    for candidate in candidates:
        rate = candidate.samples_per_second
        if (candidate.ok and rate is not None and math.isfinite(rate)
                and (best is None or rate > (best.samples_per_second or 0.0))):
            best = candidate
    return best
