"""Robustness to another microscope's look: accuracy under mild, realistic image shifts.

A model trained at one site meets images from other microscopes and scanners: another
magnification, a stronger or paler stain, a colour cast, slight defocus, JPEG compression,
sensor noise. This trains a default model on the training part of fold 1 of the PBC 5-fold
split that `leuk-fhir evaluate` uses (8 classes, or lymphocyte vs rest with --binary), then
classifies that fold's 800 held-out cells as they are and under each shift, applied to the
full-resolution image before the model prepares it. It prints, per shift, the accuracy of
the HOSVD head and of the softmax head over all cells, and the share the HOSVD head answers
`indeterminate` (accuracy counts those with their nearest class, as `evaluate` does).

Usage: nice -n 10 .venv/bin/python benchmarks/model_shift.py [--binary] [--augmentation scanner]
       [--model M]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from leuk_fhir.model import load_classifier
from leuk_fhir.model.dataset import drop_duplicates, list_images, stratified_folds
from leuk_fhir.model.images import decode_image

REPO = Path(__file__).resolve().parent.parent
PBC = REPO.parent / "shared" / "datasets" / "pbc"
RESULTS = REPO / "benchmarks" / "results"
LIMIT = 64_000_000

Shift = Callable[[np.ndarray], np.ndarray]


def magnify(factor: float) -> Shift:
    """Another objective or camera: the cell drawn ``factor`` times larger in the same frame
    (zoomed in and cropped, or shrunk and surrounded by the image's own border)."""

    def shift(image: np.ndarray) -> np.ndarray:
        h, w, _ = image.shape
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        scaled = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        if factor >= 1:
            top, left = (scaled.shape[0] - h) // 2, (scaled.shape[1] - w) // 2
            return np.ascontiguousarray(scaled[top : top + h, left : left + w])
        pad_y, pad_x = h - scaled.shape[0], w - scaled.shape[1]
        return np.pad(
            scaled,
            ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
            mode="edge",
        )

    return shift


def stain(gains: tuple[float, float, float]) -> Shift:
    """Stain strength per colour channel in optical density (Beer-Lambert): gains above 1 are
    a darker, longer stain; a gain per channel is a stain of another hue."""
    g = np.asarray(gains, dtype=np.float64)

    def shift(image: np.ndarray) -> np.ndarray:
        od = -np.log((image.astype(np.float64) + 1.0) / 256.0)
        return np.clip(256.0 * np.exp(-od * g) - 1.0, 0, 255).round().astype(np.uint8)

    return shift


def blur(sigma: float) -> Shift:
    def shift(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, (sigma, sigma, 0))

    return shift


def jpeg(quality: int) -> Shift:
    def shift(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    return shift


def noise(sigma: float, seed: int = 0) -> Shift:
    rng = np.random.default_rng(seed)

    def shift(image: np.ndarray) -> np.ndarray:
        noisy = image.astype(np.float64) + rng.normal(0.0, sigma, image.shape)
        return np.clip(noisy, 0, 255).round().astype(np.uint8)

    return shift


def gamma(value: float) -> Shift:
    """Brighter (below 1) or darker (above 1) illumination and exposure."""

    def shift(image: np.ndarray) -> np.ndarray:
        return (255.0 * (image / 255.0) ** value).round().astype(np.uint8)

    return shift


SHIFTS: dict[str, Shift | None] = {
    "as acquired": None,
    "magnification x0.8": magnify(0.8),
    "magnification x0.9": magnify(0.9),
    "magnification x1.1": magnify(1.1),
    "magnification x1.25": magnify(1.25),
    "stain paler (OD x0.8)": stain((0.8, 0.8, 0.8)),
    "stain darker (OD x1.25)": stain((1.25, 1.25, 1.25)),
    "stain more eosin (OD x0.9/1.15/1.0)": stain((0.9, 1.15, 1.0)),
    "stain more azure (OD x1.15/0.9/1.0)": stain((1.15, 0.9, 1.0)),
    "defocus (blur sigma 1.5 px)": blur(1.5),
    "defocus (blur sigma 3 px)": blur(3.0),
    "JPEG quality 50": jpeg(50),
    "sensor noise (sigma 8)": noise(8.0),
    "exposure brighter (gamma 0.8)": gamma(0.8),
    "exposure darker (gamma 1.25)": gamma(1.25),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", action="store_true", help="lymphocyte vs rest")
    parser.add_argument("--model", type=Path, help="use this model instead of training one")
    parser.add_argument(
        "--augmentation", default="standard", help="training augmentation (standard, scanner)"
    )
    args = parser.parse_args()
    items, _, _ = drop_duplicates(list_images(PBC))  # as `evaluate` reads the folder
    labels = np.array([i.label for i in items])
    train, test = stratified_folds(labels, 5, seed=0)[0]
    task = "binary" if args.binary else "8class"
    model = args.model
    if model is None:
        from leuk_fhir.cli import main as cli_main

        RESULTS.mkdir(parents=True, exist_ok=True)
        manifest = RESULTS / f"shift-train-{task}.csv"
        manifest.write_text(
            "path,label\n" + "".join(f"{items[i].path},{items[i].label}\n" for i in train)
        )
        model = RESULTS / f"pbc-shift-{task}-{args.augmentation}.lfm"
        if not model.exists():
            t0 = time.perf_counter()
            extra = ["--augmentation", args.augmentation]
            extra += ["--binary-positive", "lymphocyte"] if args.binary else []
            assert cli_main(["train", str(manifest), "--out", str(model), *extra]) == 0
            print(f"trained {model.name} on {len(train)} cells in {time.perf_counter() - t0:.0f} s")
    clf = load_classifier(model, device="cpu")
    truth = labels[test]
    if args.binary:
        truth = np.where(truth == "lymphocyte", "lymphocyte", "other")
    names = np.array(clf.class_names)
    cells = [decode_image(items[i].path, LIMIT) for i in test]
    print(
        f"model {clf.info.name} ({model.name}), {len(cells)} held-out cells of fold 1, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'shift':38s} {'hosvd':>7s} {'softmax':>8s} {'indeterminate':>14s}")
    for name, shift in SHIFTS.items():
        images = cells if shift is None else [shift(c) for c in cells]
        out = clf.run(images)
        hosvd = np.mean(names[out.residuals.argmin(axis=1)] == truth)
        softmax = np.mean(names[out.softmax.argmax(axis=1)] == truth)
        flagged = np.mean(out.ood_scores > 1.0)
        print(f"{name:38s} {100 * hosvd:6.2f}% {100 * softmax:7.2f}% {100 * flagged:13.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
