"""Decoding and preparing cell images: any common format in, RGB uint8 squares out.

Grayscale, palette, RGBA and 16-bit images are converted to 8-bit RGB (deeper samples by the
rule the service uses too, :mod:`leuk_fhir.sample_depth`: the depth the file declares, else
the camera depth its brightest sample implies); unreadable or truncated
files raise :class:`~leuk_fhir.errors.InvalidImageError`; images above ``max_pixels`` raise
:class:`~leuk_fhir.errors.ImageTooLargeError` before their pixels are decoded.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from leuk_fhir.errors import ImageTooLargeError, InvalidImageError
from leuk_fhir.sample_depth import declared_bits, deep_to_uint8

#: Smallest side accepted for a cell image, in pixels.
MIN_SIDE = 8
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".ppm", ".pgm"}
)


def to_rgb_uint8(array: np.ndarray, where: str = "image", bits: int | None = None) -> np.ndarray:
    """Convert a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of any integer or float
    dtype to RGB uint8 (alpha dropped, floats read as 0..1). Integers other than uint8 are
    scaled by their sample depth, ``bits`` when the file declares it
    (:func:`~leuk_fhir.sample_depth.deep_to_uint8`)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InvalidImageError(
            f"{where}: expected an (H, W[, 1|3|4]) image array, got shape {a.shape}"
        )
    a = a[:, :, :3]
    if min(a.shape[:2]) < MIN_SIDE:
        raise InvalidImageError(
            f"{where}: {a.shape[1]}x{a.shape[0]} pixels is too small for a cell image "
            f"(minimum {MIN_SIDE} px a side)"
        )
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        return deep_to_uint8(a, bits)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise InvalidImageError(f"{where}: image contains NaN or infinite values")
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    raise InvalidImageError(f"{where}: unsupported pixel type {a.dtype}")


def _pil_to_rgb(image: Image.Image, where: str) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return to_rgb_uint8(np.asarray(image).astype(np.int64), where, declared_bits(image))
    if image.mode == "F":
        return to_rgb_uint8(np.asarray(image), where)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return to_rgb_uint8(np.asarray(image.convert("RGB")), where)


def decode_image(data: bytes | Path | str, max_pixels: int, where: str | None = None) -> np.ndarray:
    """Decode an image file (path or bytes) to RGB uint8, checking size before decoding pixels."""
    where = where or (str(data) if isinstance(data, Path | str) else "image")
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else Path(data).open("rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise InvalidImageError(f"{where}: cannot open: {exc.strerror or exc}") from exc
    with source, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{where}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                    f"{max_pixels:,}",
                    hint="raise image.max_pixels (LEUK_FHIR_IMAGE_MAX_PIXELS) if the file is trusted",
                )
            image.load()
            return _pil_to_rgb(image, where)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"{where}: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise InvalidImageError(f"{where}: not a readable image file") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidImageError(f"{where}: image is corrupt or truncated ({exc})") from exc


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Pad a crop to a square with its border colour (no distortion)."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    fill = np.median(border, axis=0).astype(np.uint8)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = image
    return canvas


def centre_crop(square: np.ndarray, fraction: float) -> np.ndarray:
    """The central ``fraction`` of a square image (at least one pixel a side)."""
    if fraction >= 1.0:
        return square
    side = square.shape[0]
    keep = max(1, round(side * fraction))
    start = (side - keep) // 2
    return square[start : start + keep, start : start + keep]


def square_resize(image: np.ndarray, size: int, crop: float = 1.0) -> np.ndarray:
    """Pad a crop to a square with its border colour, keep its central ``crop`` fraction
    (the model's framing, see :mod:`leuk_fhir.model.framing`), then resize to ``size``."""
    image = centre_crop(pad_to_square(image), crop)
    if image.shape[0] == size:
        return np.ascontiguousarray(image)
    return np.asarray(
        Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    )


def prepare_batch(images: Sequence[np.ndarray], size: int, crop: float = 1.0) -> np.ndarray:
    """RGB uint8 arrays of any size/dtype to one (n, size, size, 3) uint8 batch."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = square_resize(to_rgb_uint8(image, where=f"image {i}"), size, crop)
    return out


#: A cell blurrier than all but this share of the training cells ...
FOCUS_QUANTILE = 0.005
#: ... by more than this factor is out of focus (``indeterminate``).
FOCUS_MARGIN = 1.15


def sharpness(batch: np.ndarray) -> np.ndarray:
    """Focus of each prepared (n, s, s, 3) uint8 crop, as the model sees it: the RMS of the
    grey image's Laplacian over its standard deviation (independent of contrast and
    brightness; lower is blurrier, 0 for a flat image)."""
    g = np.asarray(batch, dtype=np.float32).mean(axis=3)
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1]
    return np.sqrt((lap**2).mean(axis=(1, 2))) / (g.std(axis=(1, 2)) + 1e-6)


def focus_floor(training_batch: np.ndarray) -> float:
    """The sharpness below which a crop is out of focus for a model trained on these crops."""
    return float(np.quantile(sharpness(training_batch), FOCUS_QUANTILE) / FOCUS_MARGIN)


def focus_scores(batch: np.ndarray, floor: float | None) -> np.ndarray:
    """``floor`` over each prepared crop's sharpness: above 1, out of focus (all 0 without a
    floor, as for model files written before the focus check)."""
    if floor is None:
        return np.zeros(len(batch))
    return floor / np.maximum(sharpness(batch), 1e-9)
