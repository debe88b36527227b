"""Shared pixel-source behaviour: level checks, tiling, normalisation to RGB uint8."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from leuk_fhir.acquisition import Level, Tile
from leuk_fhir.errors import ImageTooLargeError, InputError
from leuk_fhir.sample_depth import deep_to_uint8


def to_rgb_uint8(array: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
    """Normalise grey, 16-bit, float or alpha pixels to (H, W, 3) uint8 RGB.

    Alpha is composited on white (a transparent background reads as empty glass).
    """
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InputError(f"expected a 2-D image, got pixel array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            top = float(np.nanmax(arr)) if arr.size else 1.0
            scale = 255.0 / top if top > 1.0 else 255.0
            arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
        else:
            arr = deep_to_uint8(arr, bits_stored)  # the rule training uses too
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 2:  # grey + alpha
        arr = np.concatenate([np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1:]], axis=2)
        channels = 4
    if channels == 4:
        alpha = arr[:, :, 3:4].astype(np.uint16)
        rgb = (arr[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
        return rgb.astype(np.uint8)
    if channels == 3:
        return np.ascontiguousarray(arr)
    raise InputError(f"unsupported number of colour channels: {channels}")


def check_pixel_limit(width: int, height: int, max_pixels: int, what: str) -> None:
    """Refuse reading ``width`` x ``height`` pixels at once when above ``max_pixels``."""
    if width <= 0 or height <= 0:
        raise InputError(f"{what} has empty pixel dimensions {width} x {height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what}: {width} x {height} px is above the limit image.max_pixels={max_pixels:,}",
            hint="raise image.max_pixels, or read it tile by tile",
        )


class TiledPixelSource:
    """Base class: subclasses set ``_levels``/``_max_pixels`` and implement ``_read``."""

    _levels: tuple[Level, ...]
    _max_pixels: int
    _frame_count: int = 1
    _mpp: float | None = None

    @property
    def levels(self) -> tuple[Level, ...]:
        return self._levels

    @property
    def frame_count(self) -> int:
        return self._frame_count

    @property
    def microns_per_pixel(self) -> float | None:
        return self._mpp

    def _level(self, level: int) -> Level:
        if not 0 <= level < len(self._levels):
            raise InputError(
                f"resolution level {level} does not exist (levels 0..{len(self._levels) - 1})"
            )
        return self._levels[level]

    def _read(self, x: int, y: int, width: int, height: int, level: int, frame: int) -> np.ndarray:
        """Read a region clipped to the image; ``x``/``y`` at ``level`` coordinates."""
        raise NotImplementedError

    def read_frame(self, index: int = 0) -> np.ndarray:
        if not 0 <= index < self._frame_count:
            raise InputError(f"frame {index} does not exist (frames 0..{self._frame_count - 1})")
        lvl = self._levels[0]
        check_pixel_limit(lvl.width, lvl.height, self._max_pixels, "frame")
        return self._read(0, 0, lvl.width, lvl.height, 0, index)

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        return self.read_frame_region(0, x, y, width, height, level)

    def read_frame_region(
        self, frame: int, x: int, y: int, width: int, height: int, level: int = 0
    ) -> np.ndarray:
        """Region of one frame; pixels outside the image read as white."""
        lvl = self._level(level)
        check_pixel_limit(width, height, self._max_pixels, "region")
        lx, ly = int(x / lvl.downsample), int(y / lvl.downsample)
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lvl.width), min(ly + height, lvl.height)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read(
                x0, y0, x1 - x0, y1 - y0, level, frame
            )
        return out

    def iter_tiles(self, tile_size: int, level: int = 0, overlap: int = 0) -> Iterator[Tile]:
        yield from self.iter_frame_tiles(0, tile_size, level, overlap)

    def iter_frame_tiles(
        self, frame: int, tile_size: int, level: int = 0, overlap: int = 0
    ) -> Iterator[Tile]:
        """Tiles of ``tile_size`` (clipped at the right/bottom edge), stepping ``tile_size - overlap``."""
        lvl = self._level(level)
        if tile_size <= 0 or not 0 <= overlap < tile_size:
            raise ValueError(f"need tile_size > overlap >= 0, got {tile_size}, {overlap}")
        step = tile_size - overlap
        nx = max(1, math.ceil((lvl.width - overlap) / step))
        ny = max(1, math.ceil((lvl.height - overlap) / step))
        for j in range(ny):
            for i in range(nx):
                x, y = i * step, j * step
                w, h = min(tile_size, lvl.width - x), min(tile_size, lvl.height - y)
                pixels = self._read(x, y, w, h, level, frame)
                yield Tile(
                    x=round(x * lvl.downsample),
                    y=round(y * lvl.downsample),
                    level=level,
                    pixels=pixels,
                )

    def close(self) -> None:
        pass

    def __enter__(self) -> TiledPixelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
