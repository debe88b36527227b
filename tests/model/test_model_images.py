"""Decoding bad and unusual images: clear errors or correct conversion."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from leuk_fhir.errors import ImageTooLargeError, InvalidImageError
from leuk_fhir.model.images import decode_image, prepare_batch, square_resize, to_rgb_uint8
from leuk_fhir.model.synthetic import generate_cell

LIMIT = 64_000_000


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_rgb_png_round_trips_exactly() -> None:
    cell = generate_cell("blast", 1, 64)
    assert np.array_equal(decode_image(_encode(Image.fromarray(cell)), LIMIT), cell)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_other_modes_become_rgb_uint8(mode: str) -> None:
    cell = Image.fromarray(generate_cell("normal", 2, 48))
    if mode == "I;16":
        gray = np.asarray(cell.convert("L")).astype(np.uint16) * 257
        image = Image.fromarray(gray)
        fmt = "PNG"
    else:
        image = cell.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(_encode(image, fmt), LIMIT)
    assert out.dtype == np.uint8 and out.shape == (48, 48, 3)
    if mode == "I;16":  # full-range 16-bit scaled to 8-bit, not clipped to white
        gray = np.asarray(cell.convert("L"))
        assert abs(out.mean() - gray.mean()) <= 1


def test_16_bit_images_scale_by_their_sample_depth() -> None:
    """One pixel above 255 used to switch the divisor from 255 to 65535 (mean 157 -> 1), and
    12-bit camera data in 16-bit files came out nearly black. Now the depth class of the
    brightest sample decides (leuk_fhir.sample_depth), never the image's own contrast."""
    gray = np.asarray(Image.fromarray(generate_cell("normal", 2, 48)).convert("L"))
    wide = gray.astype(np.uint16)

    def decoded(pixels: np.ndarray, fmt: str = "TIFF") -> np.ndarray:
        return decode_image(_encode(Image.fromarray(pixels), fmt), LIMIT)

    eight_bit = decode_image(_encode(Image.fromarray(gray)), LIMIT)
    assert np.array_equal(decoded(wide), eight_bit)  # values up to 255 stay as they are
    ten = wide * 4  # 10-bit data: scaled by 1023 whatever its brightest pixel
    dimmer = ten.copy()
    dimmer[ten > 700] = 700
    kept = ten <= 700
    assert np.array_equal(decoded(ten)[kept], decoded(dimmer)[kept])
    assert abs(decoded(ten).mean() - eight_bit.mean()) < 1.5
    twelve = (wide.astype(np.uint32) * 4095 // int(wide.max())).astype(np.uint16)
    assert decoded(twelve).max() == 255 and decoded(twelve, "PNG").mean() > 0.8 * eight_bit.mean()
    # a file that declares its top value (TIFF SMaxSampleValue) is scaled by it
    declared = io.BytesIO()
    Image.fromarray(twelve).save(declared, format="TIFF", tiffinfo={341: 8190})
    assert abs(int(decode_image(declared.getvalue(), LIMIT).max()) - 128) <= 1


def test_rgba_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)  # fully transparent black
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA")), LIMIT)
    assert (out == 255).all()


def test_truncated_file_is_an_invalid_image() -> None:
    data = _encode(Image.fromarray(generate_cell("blast", 3, 128)), "JPEG")
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], LIMIT, where="cell.jpg")


def test_not_an_image_is_an_invalid_image(tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        decode_image(path, LIMIT)
    with pytest.raises(InvalidImageError, match="cannot open"):
        decode_image(tmp_path / "missing.png", LIMIT)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = _encode(Image.new("RGB", (300, 200)))
    with pytest.raises(ImageTooLargeError, match="60,000 pixels exceeds the limit of 50,000"):
        decode_image(data, max_pixels=50_000)
    assert decode_image(data, max_pixels=60_000).shape == (200, 300, 3)


def test_tiny_images_are_rejected() -> None:
    with pytest.raises(InvalidImageError, match="too small"):
        decode_image(_encode(Image.new("RGB", (4, 30))), LIMIT)


def test_arrays_of_any_dtype_and_shape_convert() -> None:
    gray16 = np.arange(400, dtype=np.uint16).reshape(20, 20) * 160
    assert (
        to_rgb_uint8(gray16).max() == 255 * 63840 // 65535 + 1 or to_rgb_uint8(gray16).max() > 240
    )
    assert to_rgb_uint8(np.ones((10, 10, 3), dtype=np.float32)).max() == 255
    assert to_rgb_uint8(np.zeros((10, 10, 1), dtype=np.uint8)).shape == (10, 10, 3)
    with pytest.raises(InvalidImageError):
        to_rgb_uint8(np.zeros((10, 10, 2)))
    with pytest.raises(InvalidImageError, match="NaN"):
        to_rgb_uint8(np.full((10, 10, 3), np.nan))


def test_mixed_sizes_are_squared_without_distortion() -> None:
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :, 0] = 200
    squared = square_resize(wide, 30)
    assert squared.shape == (30, 30, 3)
    batch = prepare_batch([wide, generate_cell("blast", 1, 100), np.zeros((33, 33), np.uint8)], 32)
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.uint8


def test_sharpness_falls_with_blur_and_ignores_contrast() -> None:
    from scipy import ndimage

    from leuk_fhir.model.images import sharpness

    cells = np.stack([generate_cell(k, i, 64) for i, k in enumerate(["blast", "normal"] * 4)])
    blurred = np.stack([ndimage.gaussian_filter(c, (1.5, 1.5, 0)) for c in cells])
    assert (sharpness(blurred) < 0.7 * sharpness(cells)).all()
    # Halving the contrast around mid-grey leaves it (up to rounding to whole grey levels).
    faint = (128 + (cells.astype(np.int16) - 128) // 2).astype(np.uint8)
    assert np.allclose(sharpness(faint), sharpness(cells), rtol=0.1)
    assert sharpness(np.full((2, 16, 16, 3), 90, np.uint8)).tolist() == [0.0, 0.0]
