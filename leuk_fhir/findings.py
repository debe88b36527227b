"""What the classifier concluded about an acquisition, before any FHIR mapping.

A :class:`Findings` holds one :class:`CellFinding` per classified cell (one for a single-cell
image, many for a field or slide), the model that produced them, and the aggregate figures a
haematologist reads: cell counts and the blast percentage.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from leuk_fhir.acquisition import Acquisition

INDETERMINATE = "indeterminate"


class Outcome(enum.StrEnum):
    """The report-level conclusion."""

    BLASTS_DETECTED = "blasts-detected"
    NO_BLASTS_DETECTED = "no-blasts-detected"
    INDETERMINATE = "indeterminate"


@dataclass(frozen=True)
class CellClass:
    """A class the model can assign, with its clinical meaning.

    ``snomed_code`` / ``snomed_display`` code the cell type (see ``model/classes.py``),
    ``is_blast`` says whether the class counts towards the blast percentage.
    """

    name: str
    display: str
    is_blast: bool = False
    snomed_code: str | None = None
    snomed_display: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced a finding (what the FHIR Device describes)."""

    name: str
    version: str
    sha256: str
    classes: tuple[CellClass, ...]
    is_demo: bool = False
    #: Measured performance, e.g. {"accuracy_mean": 0.991, "folds": 5}.
    metrics: dict[str, float] = field(default_factory=dict)
    model_card_markdown: str | None = None

    def cell_class(self, name: str) -> CellClass | None:
        return next((c for c in self.classes if c.name == name), None)


@dataclass(frozen=True)
class CellFinding:
    """The classification of one cell.

    ``label`` is a class name of the model or :data:`INDETERMINATE` (out of distribution:
    the residual to every class subspace was too high). ``box`` is (x, y, width, height) in
    level-0 pixels of the acquisition (the whole image for a single-cell input).
    """

    label: str
    probabilities: dict[str, float]
    residuals: dict[str, float] = field(default_factory=dict)
    box: tuple[int, int, int, int] | None = None
    frame: int = 0
    indeterminate_reason: str | None = None

    @property
    def indeterminate(self) -> bool:
        return self.label == INDETERMINATE

    @property
    def confidence(self) -> float:
        """Probability of the assigned label (0 when indeterminate)."""
        return 0.0 if self.indeterminate else float(self.probabilities.get(self.label, 0.0))


@dataclass(frozen=True)
class Findings:
    """All cell findings for one acquisition, plus aggregates."""

    acquisition: Acquisition
    model: ModelInfo
    cells: tuple[CellFinding, ...]
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def _is_blast(self, cell: CellFinding) -> bool:
        cls = self.model.cell_class(cell.label)
        return bool(cls and cls.is_blast)

    @property
    def counts(self) -> dict[str, int]:
        """Cells per label, indeterminate included."""
        return dict(Counter(c.label for c in self.cells))

    @property
    def classified_count(self) -> int:
        return sum(1 for c in self.cells if not c.indeterminate)

    @property
    def blast_count(self) -> int:
        return sum(1 for c in self.cells if self._is_blast(c))

    @property
    def blast_percentage(self) -> float | None:
        """Blasts per 100 classified white cells; None when nothing could be classified."""
        n = self.classified_count
        return None if n == 0 else 100.0 * self.blast_count / n

    @property
    def outcome(self) -> Outcome:
        if self.classified_count == 0:
            return Outcome.INDETERMINATE
        return Outcome.BLASTS_DETECTED if self.blast_count > 0 else Outcome.NO_BLASTS_DETECTED

    @property
    def confidence(self) -> float:
        """Mean confidence over classified cells (0 when none)."""
        classified = [c.confidence for c in self.cells if not c.indeterminate]
        return sum(classified) / len(classified) if classified else 0.0
