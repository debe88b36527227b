"""Clinical meaning of class names: which count as blasts, and their SNOMED CT codes.

Codes are SNOMED CT concept ids for the cell type (checked against published code tables:
56972008 "Lymphocyte" and 55918008 "Monocyte" appear in several independent sources, e.g.
highdicom's examples; 15433008 "Lymphoblast" in the BMDeep bone-marrow DICOM conversion
tables). Names not in the table stay uncoded rather than guessed.
"""

from __future__ import annotations

import re

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


# Words inside longer folder names ("[Malignant] Pro-B", "ALL_blasts", "non-leukemic").
_BLAST_WORDS = _BLAST_NAMES - {"1"} | {"leukemia", "leukaemia", "leukaemic", "cancer"}
_NORMAL_WORDS = _NORMAL_NAMES - {"0", "non-malignant"} | {"control", "controls"}
_NEGATIONS = {"non", "not", "no"}


def cell_class_for(name: str) -> CellClass:
    """The :class:`CellClass` for a class (folder) name, coded where the name is known.

    Exact names first (``all``, ``hem``, ``lymphocyte``...), then the words of a longer name:
    a blast word (``malignant``, ``leukemia``, ``blast``, ``ALL``...) makes it a blast unless it
    is negated (``non-malignant``, ``not_blast``: normal); a normal word (``healthy``,
    ``benign``, ``control``...) makes it a normal lymphocyte. Anything else stays uncoded
    (a blast when its name contains "blast", e.g. ``myeloblast``)."""
    key = name.strip().lower()
    if key in _BLAST_NAMES:
        return CellClass(name, "Lymphoblast (blast)", True, *LYMPHOBLAST)
    if key in _NORMAL_NAMES:
        return CellClass(name, "Normal lymphocyte", False, *LYMPHOCYTE)
    if key in _KNOWN:
        display, is_blast, code = _KNOWN[key]
        return CellClass(name, display, is_blast, *(code or (None, None)))
    words = set(re.findall(r"[a-z0-9]+", key))
    if words & _BLAST_WORDS:
        if words & _NEGATIONS:
            return CellClass(name, "Normal lymphocyte", False, *LYMPHOCYTE)
        return CellClass(name, "Lymphoblast (blast)", True, *LYMPHOBLAST)
    if words & _NORMAL_WORDS and not words & _KNOWN.keys():
        return CellClass(name, "Normal lymphocyte", False, *LYMPHOCYTE)
    # Another kind of blast (a myeloblast) counts as a blast but is not coded a lymphoblast.
    is_blast = "blast" in key and not words & _NEGATIONS
    return CellClass(name, name.replace("_", " ").capitalize(), is_blast)
