"""The neutral acquisition record every adapter yields.

Whatever the source (a PNG on disk, a DICOM instance received over C-STORE, a whole-slide
pyramid), the classifier and the FHIR mapping only ever see an :class:`Acquisition`: metadata
plus a :class:`PixelSource` that reads pixels lazily (whole image, frames, regions, tiles).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol, runtime_checkable

import numpy as np


class Scope(enum.StrEnum):
    """What one acquisition shows: a single cropped cell, a smear field, or a whole slide."""

    CELL = "cell"
    FIELD = "field"
    SLIDE = "slide"


class Transport(enum.StrEnum):
    """How the acquisition reached leuk-fhir."""

    FILE = "file"
    HTTP = "http"
    C_STORE = "c-store"
    STOW_RS = "stow-rs"
    DICOMWEB_PULL = "dicomweb-pull"


@dataclass(frozen=True)
class Level:
    """One resolution level of a pixel source; level 0 is full resolution."""

    width: int
    height: int
    downsample: float = 1.0


@dataclass(frozen=True)
class Tile:
    """A tile read from a pixel source, with its position in level-0 pixel coordinates."""

    x: int
    y: int
    level: int
    pixels: np.ndarray  # (H, W, 3) uint8 RGB at ``level``


@runtime_checkable
class PixelSource(Protocol):
    """Lazy access to the pixels of an acquisition. All arrays are (H, W, 3) uint8 RGB."""

    @property
    def levels(self) -> tuple[Level, ...]:
        """Resolution levels, level 0 first."""
        ...

    @property
    def frame_count(self) -> int:
        """Number of frames (1 for a single image; >1 for multi-frame DICOM)."""
        ...

    @property
    def microns_per_pixel(self) -> float | None:
        """Pixel spacing at level 0, when the source declares it."""
        ...

    def read_frame(self, index: int = 0) -> np.ndarray:
        """Read one whole frame at level 0 (refuses frames above the configured pixel limit)."""
        ...

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """Read a region; ``x``/``y`` in level-0 coordinates, ``width``/``height`` at ``level``."""
        ...

    def iter_tiles(self, tile_size: int, level: int = 0, overlap: int = 0) -> Iterator[Tile]:
        """Stream tiles covering the image at ``level``; memory stays bounded by ``tile_size``."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


@dataclass(frozen=True)
class PatientInfo:
    """Patient demographics as the source declares them (DICOM Patient module or user input)."""

    identifier: str | None = None
    identifier_system: str | None = None
    name: str | None = None  # DICOM PN style "Family^Given" or free text
    birth_date: date | None = None
    sex: str | None = None  # DICOM M / F / O, or FHIR male / female / other / unknown


@dataclass(frozen=True)
class SpecimenInfo:
    """The specimen: a peripheral blood smear by default."""

    identifier: str | None = None
    type: str = "peripheral blood smear"
    stain: str | None = None
    collected_at: datetime | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """The acquiring device (microscope, slide scanner)."""

    manufacturer: str | None = None
    model: str | None = None
    serial_number: str | None = None
    software_versions: str | None = None


@dataclass(frozen=True)
class DicomReference:
    """DICOM identity of the source, when it came as DICOM."""

    study_uid: str
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    calling_ae_title: str | None = None


@dataclass(frozen=True)
class Acquisition:
    """One image (cell, field, or slide) and everything known about where it came from.

    ``source_id`` is stable for the same input: the SOP Instance UID (or Study UID for a
    slide) for DICOM, else the sha256 of the file's bytes. It seeds report identifiers, so
    sending the same image twice yields the same FHIR identifiers.
    """

    source_id: str
    pixels: PixelSource
    scope: Scope
    transport: Transport = Transport.FILE
    content_sha256: str | None = None
    filename: str | None = None
    media_type: str | None = None  # e.g. image/png, application/dicom
    acquired_at: datetime | None = None
    patient: PatientInfo = field(default_factory=PatientInfo)
    specimen: SpecimenInfo = field(default_factory=SpecimenInfo)
    device: DeviceInfo = field(default_factory=DeviceInfo)
    dicom: DicomReference | None = None
