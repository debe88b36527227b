"""From acquisition to findings with the real demo classifier: cell, field, slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leuk_fhir.acquisition import Scope
from leuk_fhir.adapters import open_acquisition
from leuk_fhir.adapters.detection import (
    DetectionScore,
    bccd_samples,
    detect_white_cells,
    score_detections,
)
from leuk_fhir.adapters.synthetic import (
    bccd_tile_reader,
    synthetic_smear_field,
    write_dicom_microscopy,
    write_pyramid_tiff,
)
from leuk_fhir.analysis import analyze, slide_tiles
from leuk_fhir.errors import InvalidImageError
from leuk_fhir.findings import INDETERMINATE
from leuk_fhir.settings import ImageSettings


def test_single_cell_is_classified_whole(tmp_path: Path, pbc_cell: np.ndarray, classifier) -> None:
    Image.fromarray(pbc_cell).save(tmp_path / "cell.png")
    acq = open_acquisition(tmp_path / "cell.png")
    findings = analyze(acq, classifier, ImageSettings())
    assert acq.scope == Scope.CELL and len(findings.cells) == 1
    cell = findings.cells[0]
    assert cell.box == (0, 0, pbc_cell.shape[1], pbc_cell.shape[0])
    assert cell.label in {c.name for c in classifier.info.classes} | {INDETERMINATE}
    assert findings.model == classifier.info
    assert sum(findings.counts.values()) == 1


def test_multiframe_dicom_cells_one_finding_per_frame(
    tmp_path: Path, pbc_cell: np.ndarray, classifier
) -> None:
    path = write_dicom_microscopy(
        tmp_path / "cells.dcm", [pbc_cell, pbc_cell[::-1]], pixel_spacing_um=0.07
    )
    findings = analyze(open_acquisition(path), classifier)
    assert [c.frame for c in findings.cells] == [0, 1]


def test_field_white_cells_detected_cropped_classified(
    tmp_path: Path, bccd_root: Path, classifier
) -> None:
    image = bccd_root / "JPEGImages" / "BloodImage_00000.jpg"
    truth = dict(bccd_samples(bccd_root))[image]
    findings = analyze(open_acquisition(image), classifier)
    assert findings.acquisition.scope == Scope.FIELD
    boxes = [c.box for c in findings.cells]
    assert score_detections(boxes, truth, "iou").recall == 1.0
    assert len(findings.cells) == len(truth)
    if findings.classified_count:
        assert findings.blast_percentage is not None and 0 <= findings.blast_percentage <= 100


def test_detection_recall_precision_on_bccd_subset(bccd_root: Path) -> None:
    """Every 8th annotated BCCD field (46 fields); full figures: benchmarks/adapters_detection.py."""
    total = DetectionScore(0, 0, 0)
    for image, truth in list(bccd_samples(bccd_root))[::8]:
        rgb = np.asarray(Image.open(image).convert("RGB"))
        boxes = [c.box for c in detect_white_cells(rgb, 170.0)]
        total += score_detections(boxes, truth, "iou")
    assert total.recall >= 0.85 and total.precision >= 0.85, total


def test_synthetic_field_exact_detection() -> None:
    field, truth = synthetic_smear_field(
        800, 600, white_cells=4, red_cells=60, cell_diameter=120, seed=2
    )
    found = detect_white_cells(field, 120.0)
    assert score_detections([c.box for c in found], truth, "iou") == DetectionScore(4, 0, 0)


def test_slide_streams_tiles_and_deduplicates_overlaps(tmp_path: Path, classifier) -> None:
    plane, truth = synthetic_smear_field(
        3000, 2000, white_cells=30, red_cells=600, cell_diameter=90, seed=21
    )

    def reader(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        part = plane[y : y + h, x : x + w]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    path = write_pyramid_tiff(
        tmp_path / "s.tif", 3000, 2000, reader, tile_size=256, levels=3, microns_per_pixel=13 / 90
    )
    acq = open_acquisition(path)
    settings = ImageSettings(tile_size=256)
    level, tile, overlap, _ = slide_tiles(acq, settings.tile_size)
    assert level == 1 and overlap < tile  # 90 px cells -> 45 px at level 1
    ticks: list[tuple[int, int]] = []
    findings = analyze(acq, classifier, settings, progress=lambda d, t: ticks.append((d, t)))
    boxes = [c.box for c in findings.cells]
    score = score_detections(boxes, truth, "centre")
    assert score == DetectionScore(30, 0, 0), score  # each cell once, none twice
    assert ticks[-1][0] == ticks[-1][1] > 1


def test_bccd_tile_reader_is_seamless() -> None:
    fields = [np.full((4, 6, 3), i, np.uint8) for i in range(3)]
    read = bccd_tile_reader(fields)
    whole = read(0, 0, 20, 10)
    assert np.array_equal(read(5, 3, 7, 4), whole[3:7, 5:12])


def _slide(tmp_path: Path) -> Path:
    plane, _ = synthetic_smear_field(
        2048, 2048, white_cells=12, red_cells=300, cell_diameter=90, seed=8
    )

    def reader(x: int, y: int, w: int, h: int) -> np.ndarray:
        return plane[y : y + h, x : x + w]

    return write_pyramid_tiff(
        tmp_path / "s.tif", 2048, 2048, reader, tile_size=256, levels=2, microns_per_pixel=13 / 90
    )


def test_slide_errors_surface_and_stop_the_reader(tmp_path: Path, classifier) -> None:
    import threading

    class Failing:
        info = classifier.info

        def classify(self, crops):
            raise RuntimeError("classifier exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        analyze(open_acquisition(_slide(tmp_path)), Failing(), ImageSettings(tile_size=256))
    assert not any(t.name == "slide-tiles" for t in threading.enumerate())

    path = _slide(tmp_path)
    data = bytearray(path.read_bytes())
    lo, hi = len(data) // 5, len(data) // 2  # level-0 tile data: JPEG streams overwritten
    data[lo:hi] = bytes(hi - lo)
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidImageError):
        analyze(open_acquisition(path), classifier, ImageSettings(tile_size=256))
