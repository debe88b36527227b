"""Plain images (TIFF, PNG, JPEG, BMP) through Pillow: single cells or smear fields."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from leuk_fhir.acquisition import Level
from leuk_fhir.adapters._pixels import TiledPixelSource, check_pixel_limit, to_rgb_uint8
from leuk_fhir.errors import ImageTooLargeError, InvalidImageError

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff", "BMP": "image/bmp"}


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode (1, L, P, I;16, I, F, RGBA, CMYK, ...) to (H, W, 3) uint8."""
    if im.mode == "P":
        im = im.convert("RGBA")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        im = im.convert("RGB")
    if im.mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.uint16)
        return to_rgb_uint8(arr, 16)
    if im.mode in ("I", "F"):
        arr = np.asarray(im)
        top = float(arr.max()) if arr.size else 0.0
        if im.mode == "I":
            bits = 16 if top > 255 else 8
            return to_rgb_uint8(np.clip(arr, 0, 65535).astype(np.uint16), bits)
        return to_rgb_uint8(arr.astype(np.float32))
    return to_rgb_uint8(np.asarray(im))


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
            raise ImageTooLargeError(f"{self._path.name}: {exc}") from exc
        except (
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
            TypeError,
            KeyError,
        ) as exc:
            raise InvalidImageError(
                f"{self._path.name} is not a readable image (truncated or corrupt): {exc}"
            ) from exc
        width, height = self._image.size
        check_pixel_limit(width, height, max_pixels, f"image {self._path.name}")
        self.format = self._image.format or "unknown"
        self._levels = (Level(width, height),)
        try:
            self._frame_count = int(getattr(self._image, "n_frames", 1))
        except Exception as exc:  # Pillow walks every IFD/frame header here
            raise InvalidImageError(f"{self._path.name} is truncated or corrupt: {exc}") from exc
        self._cache: tuple[int, np.ndarray] | None = None
        self._mpp = None  # plain images rarely carry a trustworthy pixel spacing

    def _decode(self, frame: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == frame:
            return self._cache[1]
        try:
            self._image.seek(frame)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self._image.load()
            width, height = self._image.size
            check_pixel_limit(width, height, self._max_pixels, f"frame {frame}")
            pixels = _pil_to_rgb(self._image)
        except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError) as exc:
            raise InvalidImageError(
                f"{self._path.name} could not be decoded (truncated or corrupt): {exc}"
            ) from exc
        self._cache = (frame, pixels)
        return pixels

    def _read(self, x: int, y: int, width: int, height: int, level: int, frame: int) -> np.ndarray:
        return self._decode(frame)[y : y + height, x : x + width]

    def close(self) -> None:
        self._cache = None
        self._image.close()
