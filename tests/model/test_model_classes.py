"""Clinical meaning of class (folder) names: blasts, normal cells, codes."""

from __future__ import annotations

import pytest

from leuk_fhir.model.classes import LYMPHOBLAST, LYMPHOCYTE, MONOCYTE, cell_class_for


@pytest.mark.parametrize(
    "name",
    [
        "ALL",
        "blast",
        "1",
        "Lymphoblasts",
        "leukemia",
        "Leukaemia cells",
        "ALL_blasts",
        "[Malignant] Pro-B",
        "[Malignant] early Pre-B",
    ],
)
def test_leukemic_names_are_coded_lymphoblasts(name: str) -> None:
    cls = cell_class_for(name)
    assert cls.is_blast and (cls.snomed_code, cls.snomed_display) == LYMPHOBLAST
    assert cls.name == name


@pytest.mark.parametrize(
    "name",
    [
        "hem",
        "normal",
        "0",
        "Benign",
        "healthy_controls",
        "non-malignant",
        "non_leukemic",
        "not blast",
    ],
)
def test_normal_and_negated_names_are_normal_lymphocytes(name: str) -> None:
    cls = cell_class_for(name)
    assert not cls.is_blast and (cls.snomed_code, cls.snomed_display) == LYMPHOCYTE


def test_cell_types_and_unknown_names() -> None:
    assert (cell_class_for("Monocyte").snomed_code, cell_class_for("monocyte").display) == (
        MONOCYTE[0],
        "Monocyte",
    )
    neutrophil = cell_class_for("normal_neutrophil")  # a cell type, not a normal lymphocyte
    assert neutrophil.snomed_code is None and not neutrophil.is_blast
    myeloblast = cell_class_for("myeloblast")  # a blast, but not coded as a lymphoblast
    assert myeloblast.is_blast and myeloblast.snomed_code is None
    small = cell_class_for("small_cells")  # "all" inside a word is not ALL
    assert not small.is_blast and small.snomed_code is None
    assert cell_class_for("mystery").display == "Mystery"
