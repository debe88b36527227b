"""Plain images (TIFF, PNG, JPEG, BMP) through Pillow: single cells or smear fields."""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from leuk_fhir.acquisition import Level
from leuk_fhir.adapters._pixels import TiledPixelSource, check_pixel_limit, to_rgb_uint8
from leuk_fhir.errors import ImageTooLargeError, InvalidImageError
from leuk_fhir.sample_depth import declared_bits

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff", "BMP": "image/bmp"}
_BOMB = (Image.DecompressionBombWarning, Image.DecompressionBombError)


def _reason(exc: BaseException, path: Path) -> str:
    """The error text with the server path reduced to the file name."""
    return str(exc).replace(str(path), path.name)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode (1, L, P, I;16, I, F, RGBA, CMYK, ...) to (H, W, 3) uint8."""
    if im.mode == "P":
        im = im.convert("RGBA")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        im = im.convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        return to_rgb_uint8(np.asarray(im).astype(np.int64), declared_bits(im))
    if im.mode == "F":
        return to_rgb_uint8(np.asarray(im).astype(np.float32))
    return to_rgb_uint8(np.asarray(im))


def _png_rows_missing(path: Path) -> bool:
    """True when a non-interlaced PNG's image data ends before its last row. Pillow reads
    the missing rows as black when the zlib stream is complete but short."""
    data, pos, idat, ihdr = path.read_bytes(), 8, [], b""
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if kind == b"IHDR":
            ihdr = data[pos + 8 : pos + 8 + length]
        elif kind == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if len(ihdr) < 13 or ihdr[12] != 0:  # interlaced: rows are not contiguous, not checked
        return False
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(ihdr[9], 1)
    need = height * (1 + (width * channels * ihdr[8] + 7) // 8)
    inflater, got, pending = zlib.decompressobj(), 0, b"".join(idat)
    while pending and got < need:  # counted in 1 MiB steps, never held whole
        got += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    return got < need


class PillowPixelSource(TiledPixelSource):
    """A plain image; decoded once on first read (it is bounded by ``max_pixels``)."""

    def __init__(self, path: Path, max_pixels: int) -> None:
        self._path = Path(path)
        self._max_pixels = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self._image = Image.open(self._path)
        except Image.DecompressionBombError as exc:
            raise self._too_large() from exc
        except (
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
            TypeError,
            KeyError,
        ) as exc:
            raise InvalidImageError(
                f"{self._path.name} is not a readable image (truncated or corrupt): "
                f"{_reason(exc, self._path)}"
            ) from exc
        width, height = self._image.size
        check_pixel_limit(width, height, max_pixels, f"image {self._path.name}")
        self.format = self._image.format or "unknown"
        self._levels = (Level(width, height),)
        try:
            self._frame_count = int(getattr(self._image, "n_frames", 1))
        except Exception as exc:  # Pillow walks every IFD/frame header here
            raise InvalidImageError(
                f"{self._path.name} is truncated or corrupt: {_reason(exc, self._path)}"
            ) from exc
        self._cache: tuple[int, np.ndarray] | None = None
        self._mpp = None  # plain images rarely carry a trustworthy pixel spacing

    def _decode(self, frame: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == frame:
            return self._cache[1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self._image.seek(frame)
                width, height = self._image.size  # each page is checked before it is decoded
                check_pixel_limit(
                    width, height, self._max_pixels, f"{self._path.name} page {frame}"
                )
                self._image.load()
            if self.format == "PNG" and frame == 0 and _png_rows_missing(self._path):
                raise InvalidImageError(
                    f"{self._path.name}: PNG image data ends before its last row"
                )
            pixels = _pil_to_rgb(self._image)
        except _BOMB as exc:
            raise self._too_large() from exc
        except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError) as exc:
            raise InvalidImageError(
                f"{self._path.name} could not be decoded (truncated or corrupt): "
                f"{_reason(exc, self._path)}"
            ) from exc
        self._cache = (frame, pixels)
        return pixels

    def _too_large(self) -> ImageTooLargeError:
        return ImageTooLargeError(
            f"{self._path.name}: too many pixels to decode (decompression-bomb guard, "
            f"limit image.max_pixels={self._max_pixels:,})"
        )

    def _read(self, x: int, y: int, width: int, height: int, level: int, frame: int) -> np.ndarray:
        return self._decode(frame)[y : y + height, x : x + width]

    def close(self) -> None:
        self._cache = None
        self._image.close()
