"""The classifier: a compact CNN extracts feature maps, a HOSVD subspace classifier decides.

Public surface::

    from leuk_fhir.model import load_classifier, CellClassifier
    clf = load_classifier()                    # bundled demo model (not for clinical use)
    findings = clf.classify([rgb_uint8_crop])  # list[CellFinding]
"""

from leuk_fhir.model.classifier import CellClassifier, load_classifier
from leuk_fhir.model.hosvd import HOSVDClassifier

__all__ = ["CellClassifier", "HOSVDClassifier", "load_classifier"]
