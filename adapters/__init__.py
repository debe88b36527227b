"""Adapters: turn what medical devices send (files, DICOM, slides, network pushes) into Acquisition records.

Public surface::

    open_acquisition(path, image_settings=..., transport=..., scope=None) -> Acquisition
    open_dicom_slide(paths, ...) -> Acquisition        # multi-instance DICOM WSI
    sniff_format(path) -> str                          # "dicom", "png", ..., "openslide:<vendor>"

The format is recognised by content (DICOM preamble, image magic numbers, OpenSlide), never by
the file extension. Network transports live in :mod:`leuk_fhir.adapters.dicom_scp` (C-STORE),
:mod:`leuk_fhir.adapters.stow` (STOW-RS) and :mod:`leuk_fhir.adapters.dicomweb_pull` (WADO-RS).
"""

from __future__ import annotations

from leuk_fhir.adapters.open import (
    CELL_MAX_SIDE_PX,
    open_acquisition,
    open_dicom_slide,
    sniff_format,
)

__all__ = ["CELL_MAX_SIDE_PX", "open_acquisition", "open_dicom_slide", "sniff_format"]
