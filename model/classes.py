"""Clinical meaning of class names: which count as blasts, and their SNOMED CT codes.

Codes are SNOMED CT concept ids for the cell type (checked against published code tables:
56972008 "Lymphocyte" and 55918008 "Monocyte" appear in several independent sources, e.g.
highdicom's examples; 15433008 "Lymphoblast" in the BMDeep bone-marrow DICOM conversion
tables). Names not in the table stay uncoded rather than guessed.
"""

from __future__ import annotations

from leuk_fhir.findings import CellClass

LYMPHOBLAST = ("15433008", "Lymphoblast")
LYMPHOCYTE = ("56972008", "Lymphocyte")
MONOCYTE = ("55918008", "Monocyte")

_BLAST_NAMES = {
    "blast",
    "blasts",
    "lymphoblast",
    "lymphoblasts",
    "all",
    "1",
    "malignant",
    "leukemic",
}
_NORMAL_NAMES = {"normal", "healthy", "0", "hem", "benign", "non-malignant"}

# name -> (display, is_blast, code)
_KNOWN: dict[str, tuple[str, bool, tuple[str, str] | None]] = {
    "lymphocyte": ("Lymphocyte", False, LYMPHOCYTE),
    "monocyte": ("Monocyte", False, MONOCYTE),
    "neutrophil": ("Neutrophil", False, None),
    "eosinophil": ("Eosinophil", False, None),
    "basophil": ("Basophil", False, None),
    "erythroblast": ("Erythroblast", False, None),
    "ig": ("Immature granulocyte", False, None),
    "platelet": ("Platelet", False, None),
    "other": ("Other cell", False, None),
}


def cell_class_for(name: str) -> CellClass:
    """The :class:`CellClass` for a class (folder) name, coded where the name is known."""
    key = name.strip().lower()
    if key in _BLAST_NAMES:
        return CellClass(name, "Lymphoblast (blast)", True, *LYMPHOBLAST)
    if key in _NORMAL_NAMES:
        return CellClass(name, "Normal lymphocyte", False, *LYMPHOCYTE)
    if key in _KNOWN:
        display, is_blast, code = _KNOWN[key]
        return CellClass(name, display, is_blast, *(code or (None, None)))
    return CellClass(name, name.replace("_", " ").capitalize(), "blast" in key)
