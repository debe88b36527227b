"""DICOM VL Microscopic / Slide-Coordinates / Secondary Capture images, read frame by frame.

Headers are read and validated up front (:func:`validate_dicom`); pixels are decoded one frame
at a time with :func:`pydicom.pixels.pixel_array` (``index=``), so a multi-frame instance never
sits decoded in memory as a whole.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from leuk_fhir.acquisition import Level
from leuk_fhir.adapters._pixels import TiledPixelSource, check_pixel_limit, to_rgb_uint8
from leuk_fhir.adapters.dicom_metadata import ACCEPTED_SOP_CLASSES
from leuk_fhir.adapters.plugins import require_transfer_syntax
from leuk_fhir.errors import InvalidImageError, UnsupportedFormatError
from leuk_fhir.settings import ImageSettings

DICOM_MAGIC_OFFSET = 128


def is_dicom_bytes(head: bytes) -> bool:
    """True for a DICOM Part 10 file (128-byte preamble then ``DICM``)."""
    return head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def read_dicom(
    source: Path | bytes | BinaryIO, *, name: str = "DICOM data", defer_pixels: bool = False
) -> Dataset:
    """Parse a Part 10 DICOM file, turning every parser failure into :class:`InvalidImageError`.

    ``defer_pixels`` leaves large values (Pixel Data) on disk until accessed.
    """
    fp: Path | BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(fp, defer_size="256 KB" if defer_pixels else None)
    except InvalidDicomError as exc:
        raise InvalidImageError(f"{name} is not a DICOM Part 10 file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on truncated/corrupt input
        raise InvalidImageError(f"{name} is truncated or corrupt DICOM: {exc}") from exc


def _expected_native_bytes(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    per_frame = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel)
    return (per_frame * frames * bits + 7) // 8


def validate_dicom(
    ds: Dataset,
    image_settings: ImageSettings,
    *,
    name: str = "DICOM data",
    file_size: int | None = None,
) -> None:
    """Refuse what we cannot analyse, naming the UID or the limit that is breached.

    Checks: SOP class accepted, transfer syntax decodable, Pixel Data present and complete
    (native length, encapsulated frame count), dimensions within ``max_pixels`` per frame.
    """
    sop_class = UID(
        str(ds.get("SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
    )
    if not sop_class:
        raise InvalidImageError(
            f"{name} has no SOP Class UID (0008,0016): not a usable DICOM instance"
        )
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise UnsupportedFormatError(
            f"{name}: unsupported SOP class {sop_class} ({sop_class.name or 'unknown'})",
            hint="send VL Microscopic, VL Slide-Coordinates Microscopic, VL Whole Slide "
            "Microscopy or Secondary Capture images",
        )
    ts = UID(str(getattr(ds.file_meta, "TransferSyntaxUID", "") or ""))
    if not ts:
        raise InvalidImageError(f"{name} has no Transfer Syntax UID in its file meta")
    require_transfer_syntax(ts)
    if "PixelData" not in ds:
        raise InvalidImageError(f"{name} has no Pixel Data (7FE0,0010): nothing to analyse")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        int(ds.BitsAllocated), int(ds.SamplesPerPixel)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidImageError(f"{name} lacks the Image Pixel module attributes: {exc}") from exc
    check_pixel_limit(cols, rows, image_settings.max_pixels, f"{name} frame")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    element: Any = ds.get_item("PixelData")  # a RawDataElement when read with defer_size
    deferred = getattr(element, "value", b"") is None  # read with defer_size: value not loaded
    if deferred:
        length = int(element.length)
        if not ts.is_encapsulated and length < _expected_native_bytes(ds):
            raise InvalidImageError(
                f"{name}: Pixel Data is {length} bytes, {_expected_native_bytes(ds)} expected"
            )
        if (
            file_size is not None
            and length != 0xFFFFFFFF
            and element.value_tell + length > file_size
        ):
            raise InvalidImageError(f"{name} is truncated inside its Pixel Data")
        return
    if ts.is_encapsulated:
        from pydicom.encaps import generate_frames

        try:
            found = sum(1 for _ in generate_frames(ds.PixelData, number_of_frames=frames))
        except Exception as exc:
            raise InvalidImageError(f"{name}: encapsulated Pixel Data is corrupt: {exc}") from exc
        if found < frames:
            raise InvalidImageError(
                f"{name}: Pixel Data holds {found} of {frames} frames (truncated)"
            )
    else:
        have, need = len(ds.PixelData), _expected_native_bytes(ds)
        if have < need:
            raise InvalidImageError(
                f"{name}: Pixel Data is {have} bytes, {need} expected (truncated)"
            )


class DicomFramePixelSource(TiledPixelSource):
    """Frames of one DICOM instance; each frame decoded on demand (the last one cached)."""

    def __init__(self, path: Path, ds: Dataset, max_pixels: int) -> None:
        self._path = Path(path)
        self._max_pixels = max_pixels
        self._levels = (Level(int(ds.Columns), int(ds.Rows)),)
        self._frame_count = int(ds.get("NumberOfFrames", 1) or 1)
        self._bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
        self._photometric = str(ds.get("PhotometricInterpretation", "RGB"))
        self._mpp = _pixel_spacing_um(ds)
        self._palette_ds = ds if self._photometric == "PALETTE COLOR" else None
        # Deflate compresses the whole data set: frames cannot be located in the file, so
        # the (size-limited) data set is decoded from memory instead.
        ts = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
        self._source: str | Dataset = str(self._path)
        if ts == DeflatedExplicitVRLittleEndian:
            self._source = read_dicom(self._path, name=self._path.name)
        self._cache: tuple[int, np.ndarray] | None = None

    def _decode(self, frame: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == frame:
            return self._cache[1]
        from pydicom.pixels import apply_color_lut, pixel_array

        try:
            arr = pixel_array(self._source, index=frame)
        except Exception as exc:
            raise InvalidImageError(
                f"{self._path.name}: frame {frame} could not be decoded: {exc}"
            ) from exc
        if self._palette_ds is not None:
            arr = apply_color_lut(arr, self._palette_ds)
            pixels = to_rgb_uint8(arr, 16 if arr.dtype != np.uint8 else 8)
        else:
            if self._photometric == "MONOCHROME1":
                arr = (1 << self._bits_stored) - 1 - arr.astype(np.int32)
            pixels = to_rgb_uint8(arr, self._bits_stored if arr.dtype != np.uint8 else 8)
        self._cache = (frame, pixels)
        return pixels

    def _read(self, x: int, y: int, width: int, height: int, level: int, frame: int) -> np.ndarray:
        return self._decode(frame)[y : y + height, x : x + width]

    def close(self) -> None:
        self._cache = None


def _pixel_spacing_um(ds: Dataset) -> float | None:
    """Level-0 pixel spacing in microns (PixelSpacing is in mm), when declared."""
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        for group in ds.get("SharedFunctionalGroupsSequence", []) or []:
            for measures in group.get("PixelMeasuresSequence", []) or []:
                spacing = measures.get("PixelSpacing")
    try:
        return float(spacing[0]) * 1000.0 if spacing else None
    except (TypeError, ValueError, IndexError):
        return None
