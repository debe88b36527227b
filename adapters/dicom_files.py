"""DICOM VL Microscopic / Slide-Coordinates / Secondary Capture images, read frame by frame.

Headers are read and validated up front (:func:`validate_dicom`); pixels are decoded one frame
at a time with :func:`pydicom.pixels.pixel_array` (``index=``), so a multi-frame instance never
sits decoded in memory as a whole.
"""

from __future__ import annotations

import io
import logging
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit

from leuk_fhir.acquisition import Level
from leuk_fhir.adapters._pixels import TiledPixelSource, check_pixel_limit, to_rgb_uint8
from leuk_fhir.adapters.dicom_metadata import ACCEPTED_SOP_CLASSES
from leuk_fhir.adapters.plugins import require_transfer_syntax
from leuk_fhir.errors import (
    ImageTooLargeError,
    InvalidImageError,
    LeukFhirError,
    UnsupportedFormatError,
)
from leuk_fhir.settings import ImageSettings

log = logging.getLogger(__name__)


class _PluginFailuresQuiet(logging.Filter):
    """pydicom logs each decoding plugin's failure as an ERROR with its traceback before it
    raises; :func:`decode_frame` turns that failure into one typed error with the reason, so
    the record is kept at DEBUG without the traceback (one line per bad frame, not thirty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_PluginFailuresQuiet())
DICOM_MAGIC_OFFSET = 128
DEFAULT_MAX_BYTES = ImageSettings().max_bytes
#: Inflated bytes read first from a Deflated data set, to check its declared size early.
_INFLATE_PEEK = 1 << 20
_PIXEL_DATA = 0x7FE00010
#: Plausible level-0 pixel spacing of a microscope image, in microns.
PLAUSIBLE_UM_PER_PX = (0.02, 20.0)


def is_dicom_bytes(head: bytes) -> bool:
    """True for a DICOM Part 10 file (128-byte preamble then ``DICM``)."""
    return head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def read_dicom(
    source: Path | bytes | BinaryIO,
    *,
    name: str = "DICOM data",
    defer_pixels: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Dataset:
    """Parse a Part 10 DICOM file, turning every parser failure into :class:`InvalidImageError`.

    ``defer_pixels`` leaves large values (Pixel Data) on disk until accessed. A Deflated data
    set is inflated here, bounded by ``max_bytes`` (:class:`ImageTooLargeError` beyond).
    """
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        if isinstance(fp, Path):
            with fp.open("rb") as fh:
                ds = _read_deflated(fh, name, max_bytes)
        else:
            start = fp.tell()
            ds = _read_deflated(fp, name, max_bytes)
            fp.seek(start)
        if ds is not None:
            return ds
        return pydicom.dcmread(fp, defer_size="256 KB" if defer_pixels else None)
    except LeukFhirError:
        raise
    except InvalidDicomError as exc:
        raise InvalidImageError(f"{name} is not a DICOM Part 10 file: {exc}") from exc
    except OSError as exc:
        raise InvalidImageError(f"{name} cannot be read: {exc.strerror or exc}") from exc
    except Exception as exc:  # pydicom raises many types on truncated/corrupt input
        raise InvalidImageError(f"{name} is truncated or corrupt DICOM: {exc}") from exc


def _read_deflated(fp: BinaryIO, name: str, max_bytes: int) -> Dataset | None:
    """The data set when ``fp`` is Deflated (inflated within ``max_bytes``), else None."""
    preamble = read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    body = inflate_dataset(fp.read(), max_bytes, name)
    ds = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True)
    return FileDataset(name, ds, preamble=preamble, file_meta=meta,
                       is_implicit_VR=False, is_little_endian=True)  # fmt: skip


def inflate_dataset(data: bytes, max_bytes: int, name: str) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set, never beyond ``max_bytes``.

    The header is inflated first and its declared pixel volume checked, so a deflate bomb is
    refused (:class:`ImageTooLargeError`) before its bulk is inflated.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = bytearray(inflater.decompress(data, min(_INFLATE_PEEK, max_bytes + 1)))
        _check_declared_size(bytes(out), max_bytes, name)
        while inflater.unconsumed_tail and len(out) <= max_bytes:
            out += inflater.decompress(inflater.unconsumed_tail, max_bytes + 1 - len(out))
    except zlib.error as exc:
        raise InvalidImageError(f"{name}: the Deflated data set is corrupt: {exc}") from exc
    if len(out) > max_bytes:
        raise ImageTooLargeError(
            f"{name}: inflates to more than image.max_bytes={max_bytes:,}",
            hint="raise image.max_bytes, or send it uncompressed or JPEG-compressed",
        )
    return bytes(out)


def _check_declared_size(head: bytes, max_bytes: int, name: str) -> None:
    try:
        ds = read_dataset(
            io.BytesIO(head), is_implicit_VR=False, is_little_endian=True,
            stop_when=lambda tag, vr, length: tag == _PIXEL_DATA,
        )  # fmt: skip
        declared = native_pixel_bytes(ds, name)
    except Exception:  # a header larger than the peek, or malformed: the inflate cap holds
        return
    if declared > max_bytes:
        raise _declared_too_large(name, declared, max_bytes)


def _declared_too_large(name: str, declared: int, max_bytes: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{name}: pixels above image.max_bytes={max_bytes:,} ({declared:,} bytes declared)"
    )


def int_attr(ds: Dataset, keyword: str, name: str, default: int | None = None) -> int:
    """An integer attribute; ``default`` when absent, :class:`InvalidImageError` when malformed
    (or absent without a default)."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            if default is None:
                raise InvalidImageError(f"{name} lacks {keyword}: not a usable image")
            return default
        return int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidImageError(f"{name}: {keyword} is not an integer: {exc}") from exc


def frame_count(ds: Dataset, name: str) -> int:
    """NumberOfFrames (1 when absent or 0); :class:`InvalidImageError` when malformed or < 0."""
    frames = int_attr(ds, "NumberOfFrames", name, 1) or 1
    if frames < 1:
        raise InvalidImageError(f"{name}: NumberOfFrames is {frames}, must be at least 1")
    return frames


def native_pixel_bytes(ds: Dataset, name: str) -> int:
    """Bytes of Pixel Data the header declares in native (uncompressed) encoding."""
    samples = int_attr(ds, "SamplesPerPixel", name)
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        samples = 2  # native 4:2:2 stores two samples per pixel
    pixels = int_attr(ds, "Rows", name) * int_attr(ds, "Columns", name) * frame_count(ds, name)
    return (pixels * samples * int_attr(ds, "BitsAllocated", name) + 7) // 8


def validate_dicom(
    ds: Dataset,
    image_settings: ImageSettings,
    *,
    name: str = "DICOM data",
    file_size: int | None = None,
) -> None:
    """Refuse what we cannot analyse, naming the UID or the limit that is breached.

    Checks: SOP class accepted, transfer syntax decodable, Image Pixel module sane, Pixel
    Data present and complete (native length, encapsulated frame count), dimensions within
    ``max_pixels`` per frame, native (or Deflated) pixel volume within ``max_bytes``.
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
    rows, cols = int_attr(ds, "Rows", name), int_attr(ds, "Columns", name)
    bits, samples = int_attr(ds, "BitsAllocated", name), int_attr(ds, "SamplesPerPixel", name)
    if bits not in (1, 8, 16, 32):
        raise InvalidImageError(f"{name}: BitsAllocated is {bits}, not 1, 8, 16 or 32")
    if samples not in (1, 3):
        raise UnsupportedFormatError(
            f"{name}: SamplesPerPixel is {samples}; only 1 (grey) or 3 (colour) are analysed"
        )
    check_pixel_limit(cols, rows, image_settings.max_pixels, f"{name} frame")
    frames = frame_count(ds, name)
    need = native_pixel_bytes(ds, name)
    if not ts.is_encapsulated and need > image_settings.max_bytes:
        raise _declared_too_large(name, need, image_settings.max_bytes)
    element: Any = ds.get_item("PixelData")  # a RawDataElement when read with defer_size
    deferred = getattr(element, "value", b"") is None  # read with defer_size: value not loaded
    if deferred:
        length = int(element.length)
        if not ts.is_encapsulated and length < need:
            raise InvalidImageError(f"{name}: Pixel Data is {length} bytes, {need} expected")
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
        have = len(ds.PixelData)
        if have < need:
            raise InvalidImageError(
                f"{name}: Pixel Data is {have} bytes, {need} expected (truncated)"
            )


def _decoding_plugin(ds: Dataset, name: str) -> str:
    """8-bit JPEG goes through Pillow (libjpeg-turbo), which fails on corrupt scan data where
    pylibjpeg-libjpeg silently returns a solid image; other syntaxes use pydicom's choice."""
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
    bits = int_attr(ds, "BitsStored", name, int_attr(ds, "BitsAllocated", name))
    return "pillow" if ts in (JPEGBaseline8Bit, JPEGExtended12Bit) and bits <= 8 else ""


def decode_frame(source: str | Dataset, ds: Dataset, index: int, name: str) -> np.ndarray:
    """Decode one frame of ``source`` (a path or an in-memory data set; ``ds`` its header)."""
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(source, index=index, decoding_plugin=_decoding_plugin(ds, name))
    except Exception as exc:
        reason = str(exc).replace(str(source), name) if isinstance(source, str) else exc
        raise InvalidImageError(f"{name}: frame {index} could not be decoded: {reason}") from exc


def check_first_frame(ds: Dataset, name: str) -> None:
    """Trial-decode frame 0 of a validated, in-memory instance (bounded by ``max_pixels``)."""
    decode_frame(ds, ds, 0, name)


class DicomFramePixelSource(TiledPixelSource):
    """Frames of one DICOM instance; each frame decoded on demand (the last one cached)."""

    def __init__(self, path: Path, ds: Dataset, max_pixels: int) -> None:
        self._path = Path(path)
        name = self._path.name
        self._max_pixels = max_pixels
        self._levels = (Level(int_attr(ds, "Columns", name), int_attr(ds, "Rows", name)),)
        self._frame_count = frame_count(ds, name)
        self._bits_stored = int_attr(ds, "BitsStored", name, int_attr(ds, "BitsAllocated", name))
        self._photometric = str(ds.get("PhotometricInterpretation", "RGB"))
        self._mpp = _pixel_spacing_um(ds)
        self._palette_ds = ds if self._photometric == "PALETTE COLOR" else None
        self._header = ds
        # Deflate compresses the whole data set: frames cannot be located in the file, so the
        # data set, inflated in full by read_dicom (bounded by max_bytes), is decoded from memory.
        ts = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
        self._source: str | Dataset = ds if ts == DeflatedExplicitVRLittleEndian else str(path)
        self._cache: tuple[int, np.ndarray] | None = None

    def _decode(self, frame: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == frame:
            return self._cache[1]
        from pydicom.pixels import apply_color_lut

        arr = decode_frame(self._source, self._header, frame, self._path.name)
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
        um = float(spacing[0]) * 1000.0 if spacing else None
    except (TypeError, ValueError, IndexError):
        return None
    low, high = PLAUSIBLE_UM_PER_PX
    if um is not None and not low <= um <= high:
        log.warning("Pixel Spacing %s mm is not plausible for a microscope: ignored", spacing[0])
        return None
    return um
