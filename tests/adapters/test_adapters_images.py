"""Plain images: format sniffing by content, mode normalisation, scope guess, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leuk_fhir.acquisition import Scope
from leuk_fhir.adapters import open_acquisition, sniff_format
from leuk_fhir.errors import ImageTooLargeError, InvalidImageError, UnsupportedFormatError
from leuk_fhir.settings import ImageSettings


@pytest.mark.parametrize(
    "fmt,expected", [("PNG", "png"), ("JPEG", "jpeg"), ("TIFF", "tiff"), ("BMP", "bmp")]
)
def test_formats_recognised_by_content_not_extension(
    tmp_path: Path, pbc_cell: np.ndarray, fmt: str, expected: str
) -> None:
    path = tmp_path / "cell.dat"  # misleading extension on purpose
    Image.fromarray(pbc_cell).save(path, format=fmt)
    assert sniff_format(path) == expected
    acq = open_acquisition(path)
    pixels = acq.pixels.read_frame()
    assert pixels.shape == pbc_cell.shape and pixels.dtype == np.uint8
    tolerance = 12 if fmt == "JPEG" else 0
    assert np.abs(pixels.astype(int) - pbc_cell).mean() <= tolerance
    assert acq.scope == Scope.CELL  # 360 x 363: one cell
    assert acq.media_type == f"image/{expected}"
    assert acq.content_sha256 == acq.source_id and len(acq.source_id) == 64


def test_field_scope_for_bccd_sized_image(tmp_path: Path, bccd_field: np.ndarray) -> None:
    path = tmp_path / "field.png"
    Image.fromarray(bccd_field).save(path)
    assert open_acquisition(path).scope == Scope.FIELD


def test_16bit_grey_rgba_palette_normalised_to_rgb8(tmp_path: Path) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    g16 = open_acquisition(tmp_path / "g16.png").pixels.read_frame()
    assert g16.shape == (64, 64, 3) and g16.dtype == np.uint8
    assert g16[-1, -1, 0] == ramp[-1, -1] >> 8 and (g16[..., 0] == g16[..., 2]).all()

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255  # top half opaque red, bottom transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = open_acquisition(tmp_path / "rgba.png").pixels.read_frame()
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[-1, -1]) == (255, 255, 255)

    Image.fromarray(np.full((20, 20, 3), (10, 120, 240), np.uint8)).convert("P").save(
        tmp_path / "pal.png"
    )
    pal = open_acquisition(tmp_path / "pal.png").pixels.read_frame()
    assert pal.shape == (20, 20, 3) and abs(int(pal[5, 5, 2]) - 240) < 20

    Image.fromarray(np.full((20, 30), 77, np.uint8), "L").save(tmp_path / "grey.bmp", format="BMP")
    grey = open_acquisition(tmp_path / "grey.bmp").pixels.read_frame()
    assert grey.shape == (20, 30, 3) and (grey == 77).all()


def test_regions_and_tiles_cover_the_image(tmp_path: Path, bccd_field: np.ndarray) -> None:
    Image.fromarray(bccd_field).save(tmp_path / "f.png")
    px = open_acquisition(tmp_path / "f.png").pixels
    assert np.array_equal(px.read_region(10, 20, 30, 40), bccd_field[20:60, 10:40])
    edge = px.read_region(630, 470, 20, 20)  # outside reads as white glass
    assert np.array_equal(edge[:10, :10], bccd_field[470:, 630:]) and (edge[10:, 10:] == 255).all()
    canvas = np.zeros_like(bccd_field)
    for tile in px.iter_tiles(256, overlap=32):
        h, w = tile.pixels.shape[:2]
        canvas[tile.y : tile.y + h, tile.x : tile.x + w] = tile.pixels
    assert np.array_equal(canvas, bccd_field)


def test_not_an_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is a text file, not a picture\n" * 10)
    with pytest.raises(UnsupportedFormatError, match="not DICOM, TIFF, PNG, JPEG, BMP"):
        open_acquisition(path)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        open_acquisition(empty)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused(tmp_path: Path, bccd_field: np.ndarray, fmt: str) -> None:
    full = tmp_path / "full"
    Image.fromarray(bccd_field).save(full, format=fmt)
    cut = tmp_path / "cut"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        open_acquisition(cut).pixels.read_frame()


def test_pixel_limit_refuses_large_images(tmp_path: Path, bccd_field: np.ndarray) -> None:
    Image.fromarray(bccd_field).save(tmp_path / "f.png")
    with pytest.raises(ImageTooLargeError, match="above the limit"):
        open_acquisition(tmp_path / "f.png", image_settings=ImageSettings(max_pixels=100_000))


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path: Path) -> None:
    # A small PNG that declares 10000 x 10000 pixels: refused from its header alone.
    Image.new("1", (10000, 10000)).save(tmp_path / "bomb.png", optimize=True)
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000
    with pytest.raises(ImageTooLargeError):
        open_acquisition(tmp_path / "bomb.png", image_settings=ImageSettings(max_pixels=50_000_000))


def _two_page_tiff(path: Path, second: tuple[int, int]) -> Path:
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        tw.write(np.full((120, 160, 3), 220, np.uint8), photometric="rgb")
        tw.write(np.zeros((*second, 3), np.uint8), photometric="rgb", compression="zlib")
    return path


def test_oversized_later_tiff_page_is_refused_before_decoding(tmp_path: Path) -> None:
    import tifffile

    path = _two_page_tiff(tmp_path / "two.tif", (1200, 1000))
    with tifffile.TiffFile(path) as tif:  # wreck page 1's data: decoding it would fail
        offset, count = tif.pages[1].dataoffsets[0], tif.pages[1].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xa5" * count
    path.write_bytes(bytes(data))
    px = open_acquisition(path, image_settings=ImageSettings(max_pixels=1_000_000)).pixels
    assert px.frame_count == 2 and px.read_frame(0).shape == (120, 160, 3)
    with pytest.raises(ImageTooLargeError, match=r"page 1: 1000 x 1200 px .*max_pixels=1,000,000"):
        px.read_frame(1)


def test_pillow_bomb_guard_is_image_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _two_page_tiff(tmp_path / "two.tif", (1200, 1000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # Pillow's guard below ours
    px = open_acquisition(path).pixels
    with pytest.raises(ImageTooLargeError, match="image.max_pixels"):
        px.read_frame(1)


def test_error_messages_name_the_file_not_the_server_path(tmp_path: Path) -> None:
    bad = tmp_path / "upload.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"garbage" * 20)  # Pillow names the path it opened
    with pytest.raises(InvalidImageError, match="upload.jpg") as err:
        open_acquisition(bad).pixels.read_frame()
    assert str(tmp_path) not in str(err.value)


def test_png_with_missing_rows_is_refused(tmp_path: Path) -> None:
    import struct
    import zlib

    field = np.full((48, 64, 3), 200, np.uint8)
    rows = b"".join(b"\x00" + field[y].tobytes() for y in range(24))  # half the rows

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    (tmp_path / "short.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )  # fmt: skip
    with pytest.raises(InvalidImageError, match="ends before its last row"):
        open_acquisition(tmp_path / "short.png").pixels.read_frame()
    Image.fromarray(field).save(tmp_path / "full.png")
    assert np.array_equal(open_acquisition(tmp_path / "full.png").pixels.read_frame(), field)
