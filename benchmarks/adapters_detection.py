"""White-cell detection on BCCD: recall and precision against the annotated WBC boxes.

A detection is a true positive under two criteria, both printed: IoU >= 0.5 with an unmatched
true box (strict: the box must fit the cell), and centre-in-box (the detection's centre lies
inside an unmatched true box: "the cell was found"). Matching is greedy and one-to-one.
Usage: nice -n 10 .venv/bin/python benchmarks/adapters_detection.py [--bccd DIR] [--split test]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from leuk_fhir.adapters.detection import (
    DEFAULT_CELL_DIAMETER_PX,
    DetectionScore,
    DetectionSettings,
    bccd_samples,
    detect_white_cells,
    score_detections,
)

DEFAULT_BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "bccd" / "BCCD"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bccd", type=Path, default=DEFAULT_BCCD)
    parser.add_argument("--split", choices=["all", "train", "val", "test"], default="all")
    args = parser.parse_args()
    samples = list(bccd_samples(args.bccd))
    if args.split != "all":
        names = set((args.bccd / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split())
        samples = [(p, b) for p, b in samples if p.stem in names]
    settings = DetectionSettings()
    by_iou = by_centre = DetectionScore(0, 0, 0)
    seconds = 0.0
    for image, truth in samples:
        rgb = np.asarray(Image.open(image).convert("RGB"))
        t0 = time.perf_counter()
        found = detect_white_cells(rgb, DEFAULT_CELL_DIAMETER_PX, settings)
        seconds += time.perf_counter() - t0
        boxes = [c.box for c in found]
        by_iou += score_detections(boxes, truth, "iou")
        by_centre += score_detections(boxes, truth, "centre")
    print(
        f"BCCD fields: {len(samples)} ({args.split}), annotated white cells: {by_iou.true_positives + by_iou.false_negatives}"
    )
    print(f"cell diameter assumed: {DEFAULT_CELL_DIAMETER_PX:.0f} px; settings: {settings}")
    for name, s in (("IoU >= 0.5", by_iou), ("centre-in-box", by_centre)):
        print(
            f"{name:14s} recall {s.recall:.3f}  precision {s.precision:.3f}  (TP {s.true_positives}, FP {s.false_positives}, FN {s.false_negatives})"
        )
    print(f"detection time: {1000 * seconds / max(len(samples), 1):.1f} ms per 640x480 field")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
