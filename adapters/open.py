"""Recognise a file by its content and open it as an :class:`~leuk_fhir.acquisition.Acquisition`."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leuk_fhir.acquisition import Acquisition, DicomReference, Level, PixelSource, Scope, Transport
from leuk_fhir.adapters._pixels import TiledPixelSource
from leuk_fhir.adapters.dicom_files import (
    DicomFramePixelSource,
    is_dicom_bytes,
    read_dicom,
    validate_dicom,
)
from leuk_fhir.adapters.dicom_metadata import (
    VL_WHOLE_SLIDE_MICROSCOPY,
    acquired_at,
    device_info,
    dicom_reference,
    patient_info,
    specimen_info,
)
from leuk_fhir.adapters.images import MEDIA_TYPES, PillowPixelSource
from leuk_fhir.adapters.slides import OpenSlidePixelSource, WsiDicomPixelSource, openslide_format
from leuk_fhir.errors import (
    ImageTooLargeError,
    InputError,
    InvalidImageError,
    UnsupportedFormatError,
)
from leuk_fhir.settings import ImageSettings

DEFAULT_IMAGE_SETTINGS = ImageSettings()
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
#: An image no larger than this on its longer side is taken as one cropped cell
#: (PBC single-cell images are 360 x 363; BCCD smear fields are 640 x 480).
CELL_MAX_SIDE_PX = 512
#: A white cell is 8-20 microns across: with a declared pixel spacing, an image whose longer
#: side is below this many microns shows one cell.
CELL_MAX_SIDE_UM = 40.0

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"II+\x00", 0, "tiff"),
    (b"MM\x00+", 0, "tiff"),
    (b"BM", 0, "bmp"),
)


def sniff_format(path: Path) -> str:
    """Name the format of ``path`` from its bytes: ``dicom``, ``png``, ``jpeg``, ``tiff``,
    ``bmp``, or ``openslide:<vendor>`` for a whole-slide file OpenSlide recognises."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise InputError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    if not head:
        raise InvalidImageError(f"{path.name} is empty")
    if is_dicom_bytes(head):
        return "dicom"
    found = next((fmt for magic, off, fmt in _MAGIC if head[off:].startswith(magic)), None)
    if found in (None, "tiff"):
        vendor = openslide_format(path)
        if vendor is not None and (found is None or _is_pyramid_tiff(path, vendor)):
            return f"openslide:{vendor}"
    if found is None:
        raise UnsupportedFormatError(
            f"{path.name} is not DICOM, TIFF, PNG, JPEG, BMP or a whole-slide format",
            hint="check the file; the extension is not used to recognise formats",
        )
    return found


def _is_pyramid_tiff(path: Path, vendor: str) -> bool:
    """A TIFF goes to OpenSlide when it is a vendor slide or a tiled (pyramidal) TIFF."""
    if vendor != "generic-tiff":
        return True
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page: Any = tif.pages[0]
            return bool(page.is_tiled) and (
                len(tif.pages) > 1 or page.imagewidth * page.imagelength > 4096 * 4096
            )
    except Exception:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def guess_scope(levels: Sequence[Level], mpp: float | None, pyramidal: bool) -> Scope:
    """CELL for a small image (~ one cell), FIELD for a larger one, SLIDE for a pyramid."""
    if pyramidal:
        return Scope.SLIDE
    side = max(levels[0].width, levels[0].height)
    if mpp:
        return Scope.CELL if side * mpp <= CELL_MAX_SIDE_UM else Scope.FIELD
    return Scope.CELL if side <= CELL_MAX_SIDE_PX else Scope.FIELD


def open_acquisition(
    path: Path,
    *,
    image_settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
    transport: Transport = Transport.FILE,
    scope: Scope | None = None,
    calling_ae_title: str | None = None,
) -> Acquisition:
    """Open one file (or a directory of DICOM instances) as an :class:`Acquisition`.

    Raises :class:`~leuk_fhir.errors.InvalidImageError` (not an image, truncated, no pixel
    data), :class:`~leuk_fhir.errors.UnsupportedFormatError` (format, SOP class or transfer
    syntax, naming the UID) or :class:`~leuk_fhir.errors.ImageTooLargeError`.
    """
    path = Path(path)
    if path.is_dir():
        return _open_dicom_directory(path, image_settings, transport, scope, calling_ae_title)
    if not path.is_file():
        raise InputError(f"{path.name} does not exist or is not a file")
    size = path.stat().st_size
    if size > image_settings.max_bytes and not _maybe_slide(path):
        raise _too_large(path.name, size, image_settings)
    fmt = sniff_format(path)
    if fmt == "dicom":
        return _open_dicom_file(path, image_settings, transport, scope, calling_ae_title)
    if fmt.startswith("openslide:"):
        pixels: TiledPixelSource = OpenSlidePixelSource(path, image_settings.max_pixels)
        digest = _sha256(path)
        return Acquisition(
            source_id=digest,
            pixels=pixels,
            scope=scope or Scope.SLIDE,
            transport=transport,
            content_sha256=digest,
            filename=path.name,
            media_type="image/tiff"
            if "tiff" in fmt or "aperio" in fmt
            else "application/octet-stream",
        )
    pixels = PillowPixelSource(path, image_settings.max_pixels)
    digest = _sha256(path)
    return Acquisition(
        source_id=digest,
        pixels=pixels,
        scope=scope or guess_scope(pixels.levels, pixels.microns_per_pixel, pyramidal=False),
        transport=transport,
        content_sha256=digest,
        filename=path.name,
        media_type=MEDIA_TYPES.get(pixels.format, f"image/{fmt}"),
    )


def _maybe_slide(path: Path) -> bool:
    """Whole slides may exceed max_bytes: they are read tile by tile (DICOM: checked once its
    SOP class is known, in :func:`_open_dicom_file`)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") or is_dicom_bytes(head)


def _too_large(name: str, size: int, image_settings: ImageSettings) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{name} is {size:,} bytes, above the limit image.max_bytes={image_settings.max_bytes:,}"
    )


def _open_dicom_file(
    path: Path,
    image_settings: ImageSettings,
    transport: Transport,
    scope: Scope | None,
    calling_ae_title: str | None,
) -> Acquisition:
    ds = read_dicom(path, name=path.name, defer_pixels=True, max_bytes=image_settings.max_bytes)
    if str(ds.get("SOPClassUID", "")) == VL_WHOLE_SLIDE_MICROSCOPY:
        return open_dicom_slide(
            [path],
            image_settings=image_settings,
            transport=transport,
            calling_ae_title=calling_ae_title,
        )
    size = path.stat().st_size
    if size > image_settings.max_bytes:
        raise _too_large(path.name, size, image_settings)
    validate_dicom(ds, image_settings, name=path.name, file_size=size)
    pixels = DicomFramePixelSource(path, ds, image_settings.max_pixels)
    ref = dicom_reference(ds, calling_ae_title)
    digest = _sha256(path)
    return _dicom_acquisition(
        ds, ref, pixels, source_id=ref.sop_instance_uid or digest, filename=path.name,
        content_sha256=digest, transport=transport, scope=scope,
    )


def _dicom_acquisition(
    ds: Any,
    ref: DicomReference,
    pixels: PixelSource,
    *,
    source_id: str,
    filename: str,
    transport: Transport,
    scope: Scope | None,
    content_sha256: str | None = None,
) -> Acquisition:
    """An Acquisition of DICOM pixels, its metadata read from the header ``ds``."""
    return Acquisition(
        source_id=source_id,
        pixels=pixels,
        scope=scope or guess_scope(pixels.levels, pixels.microns_per_pixel, pyramidal=False),
        transport=transport,
        content_sha256=content_sha256,
        filename=filename,
        media_type="application/dicom",
        acquired_at=acquired_at(ds),
        patient=patient_info(ds),
        specimen=specimen_info(ds),
        device=device_info(ds),
        dicom=ref,
    )


def open_dicom_slide(
    paths: Sequence[Path],
    *,
    image_settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
    transport: Transport = Transport.FILE,
    calling_ae_title: str | None = None,
) -> Acquisition:
    """Open the instances of one DICOM VL Whole Slide Microscopy series as a SLIDE."""
    paths = [Path(p) for p in paths]
    pixels = WsiDicomPixelSource(paths, image_settings.max_pixels)
    ds = pixels.first_dataset
    ref = dicom_reference(ds, calling_ae_title)
    ref = dataclasses.replace(ref, sop_instance_uid=None) if len(paths) > 1 else ref
    return Acquisition(
        source_id="/".join(u for u in (ref.study_uid, ref.series_uid) if u) or _sha256(paths[0]),
        pixels=pixels,
        scope=Scope.SLIDE,
        transport=transport,
        filename=paths[0].name if len(paths) == 1 else paths[0].parent.name,
        media_type="application/dicom",
        acquired_at=acquired_at(ds),
        patient=patient_info(ds),
        specimen=specimen_info(ds),
        device=device_info(ds),
        dicom=ref,
    )


class MultiInstancePixelSource(TiledPixelSource):
    """Frames of several DICOM instances of one study, in order, as one source."""

    def __init__(self, sources: Sequence[DicomFramePixelSource], max_pixels: int) -> None:
        self._sources = list(sources)
        self._index = [(s, f) for s in self._sources for f in range(s.frame_count)]
        self._levels = self._sources[0].levels
        self._frame_count = len(self._index)
        self._mpp = self._sources[0].microns_per_pixel
        self._max_pixels = max_pixels

    def _read(self, x: int, y: int, width: int, height: int, level: int, frame: int) -> np.ndarray:
        source, local = self._index[frame]
        return source._read(x, y, width, height, level, local)

    def read_frame(self, index: int = 0) -> np.ndarray:
        if not 0 <= index < self._frame_count:
            raise InputError(f"frame {index} does not exist (frames 0..{self._frame_count - 1})")
        source, local = self._index[index]
        return source.read_frame(local)

    def close(self) -> None:
        for s in self._sources:
            s.close()


def _open_dicom_directory(
    folder: Path,
    image_settings: ImageSettings,
    transport: Transport,
    scope: Scope | None,
    calling_ae_title: str | None,
) -> Acquisition:
    """A spooled study: a whole slide when it holds WSI instances, else all frames in order."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    headers = []
    for p in files:
        with p.open("rb") as fh:
            if not is_dicom_bytes(fh.read(132)):
                continue
        ds = read_dicom(p, name=p.name, defer_pixels=True, max_bytes=image_settings.max_bytes)
        if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) != MEDIA_STORAGE_DIRECTORY:
            headers.append((p, ds))  # a DICOMDIR (CD/DVD export) only indexes the others
    if not headers:
        raise InvalidImageError(f"{folder.name} holds no DICOM images")
    _check_one_patient_study(folder.name, [ds for _, ds in headers])
    if any(str(ds.get("SOPClassUID", "")) == VL_WHOLE_SLIDE_MICROSCOPY for _, ds in headers):
        return open_dicom_slide(
            [p for p, _ in headers],
            image_settings=image_settings,
            transport=transport,
            calling_ae_title=calling_ae_title,
        )
    if len(headers) == 1:
        return _open_dicom_file(headers[0][0], image_settings, transport, scope, calling_ae_title)
    headers.sort(key=lambda h: (str(h[1].get("SeriesInstanceUID", "")), _order(h[1])))
    sources = []
    for p, ds in headers:
        validate_dicom(ds, image_settings, name=p.name, file_size=p.stat().st_size)
        sources.append(DicomFramePixelSource(p, ds, image_settings.max_pixels))
    pixels = MultiInstancePixelSource(sources, image_settings.max_pixels)
    first = headers[0][1]
    ref = dicom_reference(first, calling_ae_title)
    ref = dataclasses.replace(ref, sop_instance_uid=None, series_uid=None)
    return _dicom_acquisition(
        first, ref, pixels, source_id=ref.study_uid, filename=folder.name,
        transport=transport, scope=scope,
    )


def _order(ds: Any) -> tuple[int, int]:
    """Sort key by InstanceNumber (0 when absent); a malformed one sorts last (it only orders)."""
    try:
        return (0, int(ds.get("InstanceNumber", 0) or 0))
    except (TypeError, ValueError, OverflowError):
        return (1, 0)


def _check_one_patient_study(name: str, headers: Sequence[Any]) -> None:
    """Refuse a folder whose instances are not all of one patient and one identified study:
    never attribute one patient's frames to another."""
    keys = {
        tuple(str(ds.get(k, "") or "").strip() for k in ("PatientID", "IssuerOfPatientID",
                                                          "StudyInstanceUID"))
        for ds in headers
    }  # fmt: skip
    if len(keys) > 1:
        raise InvalidImageError(
            f"{name} mixes instances of different patients or studies: not one acquisition"
        )
    if len(headers) > 1 and not next(iter(keys))[2]:
        raise InvalidImageError(
            f"{name}: instances without Study Instance UID (0020,000D) are not pooled"
        )
