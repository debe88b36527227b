"""From an acquisition to findings: detect white cells, crop, classify, aggregate.

One function, :func:`analyze`, chooses by :class:`~leuk_fhir.acquisition.Scope`:

- CELL: each frame is one cell, classified whole;
- FIELD: each frame is a smear field; white cells are detected, cropped and classified;
- SLIDE: tiles are streamed at the coarsest level where cells are still ~40 pixels wide,
  white cells are detected per tile, each cell is cropped at full resolution and classified.
  A cell found in the overlap of two tiles is kept once (by the tile whose core holds its
  centre). Memory stays bounded by the tile size and the classification batch.

The classifier is any object with ``classify(list[np.ndarray]) -> list[CellFinding]`` and
``info -> ModelInfo`` (:class:`leuk_fhir.model.CellClassifier`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from leuk_fhir.acquisition import Acquisition, Scope
from leuk_fhir.adapters.detection import (
    DetectionSettings,
    cell_diameter_px,
    detect_white_cells,
)
from leuk_fhir.findings import CellFinding, Findings, ModelInfo
from leuk_fhir.settings import ImageSettings

DEFAULT_IMAGE_SETTINGS = ImageSettings()
DEFAULT_DETECTION_SETTINGS = DetectionSettings()
log = logging.getLogger(__name__)

#: Cells are detected at the coarsest level where they are still this many pixels across.
MIN_DETECTION_DIAMETER_PX = 40.0
#: Crop side / detected cell box side. PBC single-cell images (the training data's framing:
#: the cell centred with neighbouring red cells around it) are 360 px for a ~156 px box.
CROP_CONTEXT = 2.3
#: Crops buffered between the slide-reading thread and classification.
SLIDE_QUEUE_CROPS = 96
#: Crops sent to the classifier per call.
CLASSIFY_BATCH = 32


class Classifier(Protocol):
    """What :func:`analyze` needs from :class:`leuk_fhir.model.CellClassifier`."""

    @property
    def info(self) -> ModelInfo: ...

    def classify(self, crops: Sequence[np.ndarray]) -> list[CellFinding]: ...


@dataclasses.dataclass(frozen=True)
class _CropRequest:
    box: tuple[int, int, int, int]  # level-0 x, y, w, h
    frame: int
    pixels: np.ndarray


def square_crop_box(
    box: tuple[int, int, int, int], context: float = CROP_CONTEXT
) -> tuple[int, int, int]:
    """The square (x, y, side) centred on ``box`` that the classifier sees: ``context`` times
    the box's longer side, so a detected cell is framed like a training cell image."""
    x, y, w, h = box
    side = max(1, round(max(w, h) * context))
    return x + w // 2 - side // 2, y + h // 2 - side // 2, side


def _crop_from_array(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Square crop around ``box``; outside the image reads as white."""
    x, y, side = square_crop_box(box)
    out = np.full((side, side, 3), 255, np.uint8)
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, w), min(y + side, h)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = frame[y0:y1, x0:x1]
    return out


class _BatchClassifier:
    """Collects crops and classifies them in fixed-size batches (bounded memory)."""

    def __init__(self, classifier: Classifier, batch: int) -> None:
        self._classifier = classifier
        self._batch = batch
        self._pending: list[_CropRequest] = []
        self.cells: list[CellFinding] = []

    def add(self, request: _CropRequest) -> None:
        self._pending.append(request)
        if len(self._pending) >= self._batch:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        results = self._classifier.classify([r.pixels for r in self._pending])
        if len(results) != len(self._pending):
            raise RuntimeError(
                f"classifier returned {len(results)} findings for {len(self._pending)} crops"
            )
        for request, finding in zip(self._pending, results, strict=True):
            self.cells.append(dataclasses.replace(finding, box=request.box, frame=request.frame))
        self._pending = []


def analyze(
    acquisition: Acquisition,
    classifier: Classifier,
    image_settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
    *,
    detection: DetectionSettings = DEFAULT_DETECTION_SETTINGS,
    progress: Callable[[int, int], None] | None = None,
) -> Findings:
    """Classify every white cell of ``acquisition``; return per-cell evidence and aggregates.

    ``progress(done, total)`` is called per frame or tile.
    """
    batcher = _BatchClassifier(classifier, CLASSIFY_BATCH)
    pixels = acquisition.pixels
    if acquisition.scope == Scope.SLIDE:
        _analyze_slide(acquisition, batcher, image_settings, detection, progress)
    else:
        diameter = cell_diameter_px(pixels.microns_per_pixel)
        for index in range(pixels.frame_count):
            frame = pixels.read_frame(index)
            if acquisition.scope == Scope.CELL:
                h, w = frame.shape[:2]
                batcher.add(_CropRequest((0, 0, w, h), index, frame))
            else:
                for cand in detect_white_cells(frame, diameter, detection):
                    batcher.add(_CropRequest(cand.box, index, _crop_from_array(frame, cand.box)))
            if progress:
                progress(index + 1, pixels.frame_count)
    batcher.flush()
    return Findings(acquisition=acquisition, model=classifier.info, cells=tuple(batcher.cells))


def choose_detection_level(acquisition: Acquisition) -> int:
    """Coarsest level where a white cell is still ``MIN_DETECTION_DIAMETER_PX`` wide."""
    diameter = cell_diameter_px(acquisition.pixels.microns_per_pixel)
    best = 0
    for i, level in enumerate(acquisition.pixels.levels):
        if diameter / level.downsample >= MIN_DETECTION_DIAMETER_PX:
            best = i
    return best


def slide_tiles(acquisition: Acquisition, tile_size: int) -> tuple[int, int, int, float]:
    """(level, tile size, overlap, cell diameter at level) used to stream a slide."""
    level = choose_detection_level(acquisition)
    lvl = acquisition.pixels.levels[level]
    diameter = cell_diameter_px(acquisition.pixels.microns_per_pixel) / lvl.downsample
    overlap = math.ceil(2 * diameter)
    tile = max(tile_size, 3 * overlap)
    return level, tile, overlap, diameter


def _analyze_slide(
    acquisition: Acquisition,
    batcher: _BatchClassifier,
    image_settings: ImageSettings,
    detection: DetectionSettings,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Two stages on two threads: tile reading + detection + cropping (a producer thread, the
    only one touching the pixel source) feeds classification (this thread) through a bounded
    queue, so decoding and the CNN overlap while memory stays bounded."""
    crops = _slide_crops(acquisition, image_settings, detection, progress)
    for request in _prefetched(crops, maxsize=SLIDE_QUEUE_CROPS):
        batcher.add(request)


def _slide_crops(
    acquisition: Acquisition,
    image_settings: ImageSettings,
    detection: DetectionSettings,
    progress: Callable[[int, int], None] | None,
) -> Iterator[_CropRequest]:
    pixels = acquisition.pixels
    level, tile_size, overlap, diameter = slide_tiles(acquisition, image_settings.tile_size)
    lvl = pixels.levels[level]
    step = tile_size - overlap
    nx = max(1, math.ceil((lvl.width - overlap) / step))
    ny = max(1, math.ceil((lvl.height - overlap) / step))
    total = nx * ny
    half = overlap / 2
    for done, tile in enumerate(_tiles(pixels, tile_size, level, overlap), start=1):
        tx, ty = round(tile.x / lvl.downsample), round(tile.y / lvl.downsample)
        i, j = tx // step, ty // step
        lo_x = 0.0 if i == 0 else tx + half
        lo_y = 0.0 if j == 0 else ty + half
        hi_x = math.inf if i == nx - 1 else tx + step + half
        hi_y = math.inf if j == ny - 1 else ty + step + half
        for cand in detect_white_cells(tile.pixels, diameter, detection):
            cx, cy = cand.centre
            if not (lo_x <= tx + cx < hi_x and lo_y <= ty + cy < hi_y):
                continue  # another tile owns this cell (overlap de-duplication)
            bx, by, bw, bh = cand.box
            box0 = (
                round((tx + bx) * lvl.downsample),
                round((ty + by) * lvl.downsample),
                round(bw * lvl.downsample),
                round(bh * lvl.downsample),
            )
            x, y, side = square_crop_box(box0)
            yield _CropRequest(box0, 0, pixels.read_region(x, y, side, side, 0))
        if progress:
            progress(done, total)


_END = object()


def _prefetched(items: Iterator[_CropRequest], maxsize: int) -> Iterator[_CropRequest]:
    """Run ``items`` on a worker thread, buffering at most ``maxsize``; errors re-raised here.

    If the consumer stops early (an exception while classifying), the worker is told to stop
    and exits at its next item.
    """
    buffer: queue.Queue[object] = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    worker = threading.Thread(target=work, name="slide-tiles", daemon=True)
    worker.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join(timeout=10)


def _tiles(pixels: object, tile_size: int, level: int, overlap: int) -> Iterator:
    return pixels.iter_tiles(tile_size, level=level, overlap=overlap)  # type: ignore[attr-defined]


def findings_summary(findings: Findings, *, cells: bool = True) -> dict:
    """A JSON-ready summary: counts, blast percentage, outcome and (optionally) per-cell evidence."""
    acq = findings.acquisition
    out: dict = {
        "source_id": acq.source_id,
        "filename": acq.filename,
        "scope": str(acq.scope),
        "model": {
            "name": findings.model.name,
            "version": findings.model.version,
            "is_demo": findings.model.is_demo,
        },
        "cells_total": len(findings.cells),
        "cells_classified": findings.classified_count,
        "counts": findings.counts,
        "blast_count": findings.blast_count,
        "blast_percentage": findings.blast_percentage,
        "outcome": str(findings.outcome),
        "confidence": round(findings.confidence, 4),
    }
    if cells:
        out["cells"] = [
            {
                "label": c.label,
                "confidence": round(c.confidence, 4),
                "box": list(c.box) if c.box else None,
                "frame": c.frame,
                **(
                    {"indeterminate_reason": c.indeterminate_reason}
                    if c.indeterminate_reason
                    else {}
                ),
            }
            for c in findings.cells
        ]
    return out
