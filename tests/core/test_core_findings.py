"""Findings aggregates: counts, blast percentage, outcome, confidence."""

import numpy as np

from leuk_fhir.acquisition import Acquisition, Scope
from leuk_fhir.findings import INDETERMINATE, CellClass, CellFinding, Findings, ModelInfo, Outcome

MODEL = ModelInfo(
    name="test",
    version="1",
    sha256="0" * 64,
    classes=(CellClass("blast", "Lymphoblast", is_blast=True), CellClass("normal", "Lymphocyte")),
)


class _Pixels:
    """Minimal in-memory pixel source for record tests."""

    levels = ()
    frame_count = 1
    microns_per_pixel = None

    def read_frame(self, index=0):
        return np.zeros((4, 4, 3), np.uint8)


def _findings(labels):
    acq = Acquisition(source_id="s", pixels=_Pixels(), scope=Scope.FIELD)  # type: ignore[arg-type]
    cells = tuple(
        CellFinding(label=lab, probabilities={} if lab == INDETERMINATE else {lab: 0.9, "x": 0.1})
        for lab in labels
    )
    return Findings(acquisition=acq, model=MODEL, cells=cells)


def test_blast_percentage_excludes_indeterminate_cells():
    f = _findings(["blast", "normal", "normal", "normal", INDETERMINATE])
    assert f.counts == {"blast": 1, "normal": 3, INDETERMINATE: 1}
    assert f.classified_count == 4
    assert f.blast_percentage == 25.0
    assert f.outcome is Outcome.BLASTS_DETECTED
    assert abs(f.confidence - 0.9) < 1e-9


def test_no_blasts_and_all_indeterminate():
    assert _findings(["normal", "normal"]).outcome is Outcome.NO_BLASTS_DETECTED
    assert _findings(["normal"]).blast_percentage == 0.0
    f = _findings([INDETERMINATE])
    assert f.outcome is Outcome.INDETERMINATE
    assert f.blast_percentage is None
    assert f.confidence == 0.0
    assert f.cells[0].confidence == 0.0


def test_unknown_label_is_not_a_blast():
    f = _findings(["mystery"])
    assert f.blast_count == 0 and f.outcome is Outcome.NO_BLASTS_DETECTED
