"""Whole slides: pyramidal TIFF through OpenSlide, DICOM WSI through wsidicom, tiling, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from leuk_fhir.acquisition import Scope
from leuk_fhir.adapters import open_acquisition, open_dicom_slide, sniff_format
from leuk_fhir.adapters.slides import MissingLevelError
from leuk_fhir.adapters.synthetic import synthetic_smear_field, write_dicom_wsi, write_pyramid_tiff
from leuk_fhir.errors import InputError, InvalidImageError

MPP = 13.0 / 90.0  # white cells drawn 90 px wide are 13 um across
SLIDE, BOXES = synthetic_smear_field(
    1600, 1200, white_cells=10, red_cells=200, cell_diameter=90, seed=11
)


def _reader(x: int, y: int, w: int, h: int) -> np.ndarray:
    out = np.full((h, w, 3), 255, np.uint8)
    part = SLIDE[y : y + h, x : x + w]
    out[: part.shape[0], : part.shape[1]] = part
    return out


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiff") / "slide.tif"
    return write_pyramid_tiff(
        path, 1600, 1200, _reader, tile_size=256, levels=3, microns_per_pixel=MPP
    )


@pytest.fixture(scope="module")
def dicom_wsi(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_dicom_wsi(
        tmp_path_factory.mktemp("wsi"), SLIDE, tile_size=256, levels=3, microns_per_pixel=MPP
    )


def test_pyramid_tiff_opens_through_openslide(pyramid_tiff: Path) -> None:
    assert sniff_format(pyramid_tiff) == "openslide:generic-tiff"
    acq = open_acquisition(pyramid_tiff)
    px = acq.pixels
    assert acq.scope == Scope.SLIDE
    assert [(lv.width, lv.height) for lv in px.levels] == [(1600, 1200), (800, 600), (400, 300)]
    assert [lv.downsample for lv in px.levels] == [1.0, 2.0, 4.0]
    assert px.microns_per_pixel == pytest.approx(MPP, rel=1e-3)
    region = px.read_region(300, 200, 256, 256)
    assert np.abs(region.astype(int) - SLIDE[200:456, 300:556]).mean() < 4  # JPEG q85
    low = px.read_region(300, 200, 128, 128, level=1)  # level-0 origin, level-1 size
    assert low.shape == (128, 128, 3)
    expected = SLIDE[200:456, 300:556].reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert np.abs(low.astype(float) - expected).mean() < 5
    with pytest.raises(InputError, match="level 3 does not exist"):
        px.read_region(0, 0, 10, 10, level=3)


def test_dicom_wsi_opens_with_all_levels(dicom_wsi: list[Path]) -> None:
    acq = open_dicom_slide(dicom_wsi)
    ds = pydicom.dcmread(dicom_wsi[0], stop_before_pixels=True)
    assert acq.scope == Scope.SLIDE and acq.dicom is not None
    assert acq.dicom.study_uid == ds.StudyInstanceUID and acq.dicom.sop_instance_uid is None
    assert acq.source_id == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}"
    assert acq.patient.identifier == "PAT-WSI-001" and acq.specimen.stain == "Wright-Giemsa stain"
    px = acq.pixels
    assert [(lv.width, lv.height) for lv in px.levels] == [(1600, 1200), (800, 600), (400, 300)]
    assert px.microns_per_pixel == pytest.approx(MPP, rel=1e-3)
    region = px.read_region(500, 300, 300, 200)
    assert np.abs(region.astype(int) - SLIDE[300:500, 500:800]).mean() < 4
    # the same slide also opens from its folder and from a single level-0 file
    assert open_acquisition(dicom_wsi[0].parent).scope == Scope.SLIDE


def test_dicom_wsi_tiles_stream_lazily(dicom_wsi: list[Path]) -> None:
    px = open_dicom_slide(dicom_wsi).pixels
    tiles = list(px.iter_tiles(512, level=1, overlap=64))
    assert all(t.level == 1 and t.pixels.shape[0] <= 512 for t in tiles)
    assert {(t.x, t.y) for t in tiles} == {(x, y) for x in (0, 896) for y in (0, 896)}


def test_missing_full_resolution_level_is_refused(dicom_wsi: list[Path]) -> None:
    with pytest.raises(MissingLevelError, match="full-resolution .* missing"):
        open_dicom_slide(dicom_wsi[1:])


def test_level_with_missing_tiles_is_refused(tmp_path: Path) -> None:
    paths = write_dicom_wsi(
        tmp_path, SLIDE[:512, :512], tile_size=256, levels=1, transfer_syntax=ExplicitVRLittleEndian
    )
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 3  # 4 tiles needed for 512 x 512
    ds.PixelData = ds.PixelData[: 3 * 256 * 256 * 3]
    ds.save_as(paths[0])
    with pytest.raises(MissingLevelError, match="3 of 4 tiles"):
        open_dicom_slide(paths)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_truncated_slide_file_is_refused(pyramid_tiff: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tif"
    data = pyramid_tiff.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises((InvalidImageError, InputError)):
        acq = open_acquisition(cut)
        for _ in acq.pixels.iter_tiles(512):
            pass


def test_aperio_svs_through_openslide(tmp_path: Path) -> None:
    path = write_pyramid_tiff(
        tmp_path / "slide.svs",
        1600,
        1200,
        _reader,
        tile_size=256,
        levels=2,
        microns_per_pixel=0.5,
        aperio=True,
    )
    assert sniff_format(path) == "openslide:aperio"
    acq = open_acquisition(path)
    assert acq.scope == Scope.SLIDE and acq.pixels.microns_per_pixel == 0.5
    assert [lv.width for lv in acq.pixels.levels] == [1600, 800]
    assert np.abs(acq.pixels.read_region(0, 0, 256, 256).astype(int) - SLIDE[:256, :256]).mean() < 4


def test_damaged_wsi_tile_is_a_typed_error_and_analyze_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier
) -> None:
    import json

    from PIL import Image

    from leuk_fhir.adapters.synthetic import damage_first_jpeg_frame
    from leuk_fhir.cli import main

    (path,) = write_dicom_wsi(tmp_path / "wsi", SLIDE[:512, :512], tile_size=256, levels=1)
    damage_first_jpeg_frame(pydicom.dcmread(path), keep_headers=False).save_as(path)
    with pytest.raises(InvalidImageError, match="slide region could not be decoded"):
        open_dicom_slide([path]).pixels.read_region(0, 0, 256, 256)
    Image.fromarray(SLIDE[:480, :640]).save(tmp_path / "field.png")
    code = main(["analyze", str(path.parent), str(tmp_path / "field.png"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    bad, good = doc["results"]
    assert code == 3 and doc["failed"] == 1 and bad["error"] == "invalid-image"
    assert good["scope"] == "field" and "error" not in good and "outcome" in good
