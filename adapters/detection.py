"""White-cell detection in Romanowsky-stained smears (Wright, Giemsa, May-Gruenwald-Giemsa).

White-cell nuclei take up the basic dye and read blue-violet: their blue channel stands well
above green, which pink red cells, pale platelets-free background and plasma do not. The
detector thresholds that nucleus-stain signal (B - G), closes lobed nuclei (neutrophils) into
one blob, filters blobs by size and shape relative to the expected cell diameter, and returns
a box around each cell (nucleus plus a rim of cytoplasm).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from leuk_fhir.stain import NUCLEUS_STAIN_THRESHOLD, nucleus_mask

#: Diameter of a white cell in microns (lymphocyte 7-15, neutrophil 12-15, blast 10-20).
WHITE_CELL_DIAMETER_UM = 13.0
#: Expected white-cell diameter in pixels when the image declares no pixel spacing
#: (BCCD-like 100x oil fields; BCCD white-cell boxes average 183 x 164 pixels).
DEFAULT_CELL_DIAMETER_PX = 170.0

Box = tuple[int, int, int, int]  # x, y, width, height


@dataclass(frozen=True)
class DetectionSettings:
    """Tunable thresholds of :func:`detect_white_cells` (defaults measured on BCCD)."""

    #: Minimum (blue - green) of a nucleus pixel.
    stain_threshold: int = NUCLEUS_STAIN_THRESHOLD
    #: Nucleus blob area limits, as fractions of the expected cell disc area.
    min_nucleus_area: float = 0.10
    max_nucleus_area: float = 1.6
    #: Closing radius (fraction of the cell diameter) joining the lobes of one nucleus.
    closing_radius: float = 0.08
    #: Longest / shortest side of the blob box.
    max_elongation: float = 3.5
    #: Cell box side = max(nucleus box * ``box_scale``, ``min_box`` * cell diameter).
    box_scale: float = 1.2
    min_box: float = 0.9
    #: Images whose cells are wider than this are block-averaged down before detection
    #: (detection needs ~40 px per cell; boxes are scaled back to the input's pixels).
    working_diameter_px: float = 40.0


@dataclass(frozen=True)
class CellCandidate:
    """A detected white cell: its box, nucleus area and mean stain, in the image's pixels."""

    box: Box
    nucleus_area: int
    stain: float

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


def cell_diameter_px(microns_per_pixel: float | None) -> float:
    """Expected white-cell diameter in level-0 pixels."""
    return (
        WHITE_CELL_DIAMETER_UM / microns_per_pixel
        if microns_per_pixel
        else DEFAULT_CELL_DIAMETER_PX
    )


def detect_white_cells(
    rgb: np.ndarray, diameter_px: float, settings: DetectionSettings = DetectionSettings()
) -> list[CellCandidate]:
    """Find white cells in an (H, W, 3) uint8 RGB image whose cells are ``diameter_px`` wide."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        return []
    factor = int(diameter_px // settings.working_diameter_px)
    if factor > 1 and min(rgb.shape[:2]) >= 2 * factor:
        small = _downsample(rgb, factor)
        found = detect_white_cells(small, diameter_px / factor, settings)
        h, w = rgb.shape[:2]
        return [
            CellCandidate(
                (
                    c.box[0] * factor,
                    c.box[1] * factor,
                    min(c.box[2] * factor, w - c.box[0] * factor),
                    min(c.box[3] * factor, h - c.box[1] * factor),
                ),
                c.nucleus_area * factor * factor,
                c.stain,
            )
            for c in found
        ]
    mask = nucleus_mask(rgb, settings.stain_threshold)
    if not mask.any():
        return []
    radius = max(1, round(settings.closing_radius * diameter_px))
    structure = _disc(radius)
    mask = ndimage.binary_closing(np.pad(mask, radius), structure=structure)[
        radius:-radius, radius:-radius
    ]
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    cell_area = math.pi * (diameter_px / 2) ** 2
    min_area, max_area = (
        settings.min_nucleus_area * cell_area,
        settings.max_nucleus_area * cell_area,
    )
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    stain = rgb[..., 2].astype(np.float32) - rgb[..., 1]
    stains = ndimage.mean(stain, labels, index=np.arange(1, count + 1))
    h, w = mask.shape
    out: list[CellCandidate] = []
    for i, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None or not min_area <= areas[i] <= max_area:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        bw, bh = x1 - x0, y1 - y0
        if max(bw, bh) > settings.max_elongation * max(min(bw, bh), 1):
            continue
        side_w = max(bw * settings.box_scale, settings.min_box * diameter_px)
        side_h = max(bh * settings.box_scale, settings.min_box * diameter_px)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        bx0, by0 = max(0, round(cx - side_w / 2)), max(0, round(cy - side_h / 2))
        bx1, by1 = min(w, round(cx + side_w / 2)), min(h, round(cy + side_h / 2))
        out.append(CellCandidate((bx0, by0, bx1 - bx0, by1 - by0), int(areas[i]), float(stains[i])))
    return out


def _downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Block-average by ``factor`` (the edge remainder is dropped)."""
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    blocks = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return blocks.mean(axis=(1, 3), dtype=np.float32).astype(np.uint8)


def _disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius


# --- evaluation against annotated boxes (BCCD, Pascal VOC) -------------------------------


def iou(a: Box, b: Box) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


def centre_in_box(detected: Box, truth: Box) -> bool:
    cx, cy = detected[0] + detected[2] / 2, detected[1] + detected[3] / 2
    return truth[0] <= cx <= truth[0] + truth[2] and truth[1] <= cy <= truth[1] + truth[3]


@dataclass(frozen=True)
class DetectionScore:
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def recall(self) -> float:
        n = self.true_positives + self.false_negatives
        return self.true_positives / n if n else 1.0

    @property
    def precision(self) -> float:
        n = self.true_positives + self.false_positives
        return self.true_positives / n if n else 1.0

    def __add__(self, other: DetectionScore) -> DetectionScore:
        return DetectionScore(
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
        )


def score_detections(
    detected: Sequence[Box], truth: Sequence[Box], criterion: str = "iou"
) -> DetectionScore:
    """Greedy one-to-one matching; ``criterion`` is ``iou`` (IoU >= 0.5) or ``centre``
    (the detection's centre lies inside the true box)."""
    unmatched = list(truth)
    tp = 0
    for det in detected:
        if criterion == "iou":
            best = max(unmatched, key=lambda t: iou(det, t), default=None)
            ok = best is not None and iou(det, best) >= 0.5
        else:
            best = next((t for t in unmatched if centre_in_box(det, t)), None)
            ok = best is not None
        if ok and best is not None:
            unmatched.remove(best)
            tp += 1
    return DetectionScore(tp, len(detected) - tp, len(unmatched))


def load_voc_boxes(xml_path: Path, label: str = "WBC") -> list[Box]:
    """Boxes of ``label`` from a Pascal VOC annotation file, as (x, y, width, height)."""
    root = ET.parse(xml_path).getroot()
    boxes: list[Box] = []
    for obj in root.iter("object"):
        if (obj.findtext("name") or "").strip() != label:
            continue
        bb = obj.find("bndbox")
        if bb is None:
            continue
        x0, y0, x1, y1 = (int(float(bb.findtext(k) or 0)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x0, y0, x1 - x0, y1 - y0))
    return boxes


def bccd_samples(root: Path) -> Iterable[tuple[Path, list[Box]]]:
    """(image, white-cell boxes) for every annotated BCCD field under ``root`` (the BCCD dir)."""
    for xml in sorted((root / "Annotations").glob("*.xml")):
        image = root / "JPEGImages" / f"{xml.stem}.jpg"
        if image.exists():
            yield image, load_voc_boxes(xml)
