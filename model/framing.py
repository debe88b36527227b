"""Framing: how much of each cell image, around its centre, the CNN sees.

Single-cell images differ in how much they show around the cell: a PBC image is 360 px for a
white cell of 100-200 px, with red cells all around; ALL-IDB2 and C-NMC crops are nearly filled
by their cell. The CNN looks at a 64 px square, so pixels spent on the surroundings are pixels
taken from the nucleus and cytoplasm. The model therefore keeps the central ``crop`` fraction of
every (squared) image before resizing; the fraction is stored in the model file and applied to
every image it classifies, so training and inference see cells the same way.

``--crop auto`` (the default of ``train`` and ``evaluate``) measures it on the images, without
labels: in a sample, find the stained nucleus nearest the centre (:func:`nucleus_extent`), take
the 95th percentile of its extent (the side of the smallest centred square that holds it, as a
fraction of the image side), add a rim of cytoplasm and round up. PBC gives 0.6, which measured
+0.6 points on PBC 8 classes (docs/model.md); images already filled by their cell give 1.0 (no
crop). When too few images show a nucleus the stain rule recognises (another stain, grey or
synthetic images), the answer is 1.0: auto never crops what it cannot see.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from leuk_fhir.stain import nucleus_mask

#: Side (px) images are reduced to for the nucleus search: ample for a cell's outline, cheap.
WORK_SIDE = 96
#: The crop holds the nucleus of this share of images ...
COVERAGE = 0.95
#: ... times this (a rim of cytoplasm) ...
RIM = 1.1
#: ... rounded up to a multiple of this, and never below ``MIN_CROP``.
STEP = 0.05
MIN_CROP = 0.3
#: Below this share of images with a recognisable nucleus, auto keeps the whole image.
MIN_FOUND_SHARE = 0.8
#: Images measured (evenly spaced over the dataset).
SAMPLE = 400
#: A stained blob smaller than this share of the image is debris or a platelet fragment.
MIN_BLOB_SHARE = 0.003


@dataclass(frozen=True)
class Framing:
    """The crop fraction a model uses, and how it was arrived at (for reports and model cards)."""

    crop: float
    method: str  # "auto" or "fixed"
    sampled: int = 0
    with_nucleus: int = 0
    extent_quantile: float | None = None  # COVERAGE quantile of the nucleus extent

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.method == "fixed":
            if self.crop >= 1.0:
                return "whole image (no crop)"
            return f"central {self.crop:.0%} of each image (set by --crop)"
        if self.extent_quantile is None:
            return (
                f"whole image: only {self.with_nucleus} of {self.sampled} sampled images showed "
                "a stained nucleus, so auto framing did not crop"
            )
        kept = "whole image" if self.crop >= 1.0 else f"central {self.crop:.0%} of each image"
        return (
            f"{kept} (auto: {COVERAGE:.0%} of {self.with_nucleus} sampled nuclei lie within "
            f"the central {self.extent_quantile:.0%})"
        )


def nucleus_extent(square: np.ndarray) -> float | None:
    """Side of the smallest centred square holding the stained nucleus nearest the centre, as a
    fraction of the side of ``square`` (an (s, s, 3) uint8 image); None when none is found."""
    small = np.asarray(
        Image.fromarray(square).resize(
            (WORK_SIDE, WORK_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0
        )
    )
    mask = ndimage.binary_closing(nucleus_mask(small), iterations=2)
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    centre = (WORK_SIDE - 1) / 2
    best: tuple[slice, slice] | None = None
    best_distance = math.inf
    for i, where in enumerate(ndimage.find_objects(labels)):
        if where is None or areas[i] < MIN_BLOB_SHARE * WORK_SIDE * WORK_SIDE:
            continue
        ys, xs = np.nonzero(labels[where] == i + 1)
        distance = float(
            np.min((ys + where[0].start - centre) ** 2 + (xs + where[1].start - centre) ** 2)
        )
        if distance < best_distance:
            best, best_distance = where, distance
    if best is None:
        return None
    rows, cols = best
    half = max(
        centre - rows.start + 0.5,
        rows.stop - 0.5 - centre,
        centre - cols.start + 0.5,
        cols.stop - 0.5 - centre,
    )
    return min(1.0, 2 * half / WORK_SIDE)


def choose_crop(squares: Iterable[np.ndarray]) -> Framing:
    """Auto framing from square RGB images (see the module docstring). ``squares`` may be a
    generator: each image is measured and let go before the next (full-size smear fields)."""
    extents = [nucleus_extent(s) for s in squares]
    found = np.array([e for e in extents if e is not None])
    if len(extents) == 0 or len(found) < MIN_FOUND_SHARE * len(extents):
        return Framing(1.0, "auto", len(extents), len(found))
    quantile = float(np.quantile(found, COVERAGE))
    crop = min(1.0, max(MIN_CROP, math.ceil(round(quantile * RIM / STEP, 6)) * STEP))
    return Framing(round(crop, 4), "auto", len(extents), len(found), round(quantile, 4))


def sample_indices(n: int, sample: int = SAMPLE) -> np.ndarray:
    """Evenly spaced indices of at most ``sample`` of ``n`` images (deterministic)."""
    return np.unique(np.linspace(0, n - 1, num=min(n, sample)).round().astype(int))


def parse_crop(text: str) -> float | None:
    """``--crop`` value: "auto" -> None, else a fraction in (0, 1] (ValueError otherwise)."""
    if text.strip().lower() == "auto":
        return None
    message = f"crop must be 'auto' or a fraction in (0, 1], not {text!r}"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(message) from None
    if not 0.0 < value <= 1.0 or math.isnan(value):
        raise ValueError(message)
    return value
