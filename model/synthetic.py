"""Procedural blood-cell images: lymphoblast-like ("blast") and lymphocyte-like ("normal").

A test fixture and the training set of the bundled demo model, never evidence of accuracy on
real smears. Each cell is drawn on a pale, pink-tinged background with a few red cells, a
blue-grey cytoplasm and a purple nucleus, with stain variation applied to the whole image:

* blast: large cell, high nucleus-to-cytoplasm ratio, round or irregular (cleft) nucleus, fine
  open chromatin, one to three pale nucleoli, a thin cytoplasm rim;
* normal: small mature lymphocyte, round dense nucleus with coarse clumped chromatin, no
  nucleoli, a narrow but visible rim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

CELL_KINDS = ("blast", "normal")


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise (chromatin texture)."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (noise - noise.mean()) / (noise.std() + 1e-9)


def _blob(
    yy: np.ndarray,
    xx: np.ndarray,
    cy: float,
    cx: float,
    radius: float,
    rng: np.random.Generator,
    irregularity: float,
) -> np.ndarray:
    """Soft mask of a roughly round blob with a wavy outline."""
    angle = np.arctan2(yy - cy, xx - cx)
    r = np.hypot(yy - cy, xx - cx)
    wobble = np.zeros_like(angle)
    for harmonic in (2, 3, 4, 5):
        wobble += rng.normal(0, irregularity / harmonic) * np.cos(
            harmonic * angle + rng.uniform(0, 2 * np.pi)
        )
    edge = radius * (1.0 + wobble)
    return np.clip(edge - r + 0.5, 0.0, 1.0)


def generate_cell(
    kind: str, rng: np.random.Generator | int | None = None, size: int = 128
) -> np.ndarray:
    """Draw one synthetic cell as an RGB uint8 array of shape (size, size, 3).

    ``kind`` is ``"blast"`` (lymphoblast-like) or ``"normal"`` (lymphocyte-like); ``rng`` is a
    numpy Generator or a seed, so the same seed gives the same image.
    """
    if kind not in CELL_KINDS:
        raise ValueError(f"kind must be one of {CELL_KINDS}, not {kind!r}")
    if size < 16:
        raise ValueError("size must be at least 16 pixels")
    rng = _rng(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    s = size / 128.0

    # Background plasma, slightly pink, with a few red cells (pale centres).
    background = np.array([0.93, 0.86, 0.88]) + rng.normal(0, 0.015, 3)
    image = np.ones((size, size, 3)) * background
    rbc_colour = np.array([0.86, 0.62, 0.66]) + rng.normal(0, 0.03, 3)
    for _ in range(rng.integers(1, 6)):
        cy, cx = rng.uniform(0, size, 2)
        rr = rng.uniform(14, 20) * s
        body = _blob(yy, xx, cy, cx, rr, rng, 0.03)
        pallor = _blob(yy, xx, cy, cx, rr * 0.45, rng, 0.05) * 0.5
        alpha = (body - pallor)[..., None]
        image = image * (1 - alpha) + rbc_colour * alpha

    cy, cx = size / 2 + rng.normal(0, 4 * s, 2)
    if kind == "blast":
        cell_r = rng.uniform(34, 42) * s
        nucleus_r = cell_r * rng.uniform(0.80, 0.90)
        irregular = rng.uniform(0.02, 0.09)
        chromatin_sigma, chromatin_amp = 1.0 * s, 0.05
        nucleus_colour = np.array([0.55, 0.40, 0.68])
        n_nucleoli = int(rng.integers(1, 4))
    else:
        cell_r = rng.uniform(22, 28) * s
        nucleus_r = cell_r * rng.uniform(0.72, 0.82)
        irregular = rng.uniform(0.0, 0.03)
        chromatin_sigma, chromatin_amp = 2.5 * s, 0.13
        nucleus_colour = np.array([0.36, 0.22, 0.50])
        n_nucleoli = 0

    cytoplasm = _blob(yy, xx, cy, cx, cell_r, rng, 0.03)
    cytoplasm_colour = np.array([0.66, 0.74, 0.88]) + rng.normal(0, 0.03, 3)
    image = image * (1 - cytoplasm[..., None]) + cytoplasm_colour * cytoplasm[..., None]

    ny, nx = cy + rng.normal(0, 2 * s), cx + rng.normal(0, 2 * s)
    nucleus = _blob(yy, xx, ny, nx, nucleus_r, rng, irregular)
    if kind == "blast" and rng.random() < 0.5:  # nuclear cleft / notch
        angle = rng.uniform(0, 2 * np.pi)
        notch = _blob(
            yy,
            xx,
            ny + nucleus_r * np.sin(angle),
            nx + nucleus_r * np.cos(angle),
            nucleus_r * 0.3,
            rng,
            0.05,
        )
        nucleus = np.clip(nucleus - notch, 0, 1)
    texture = _smooth_noise(rng, size, chromatin_sigma) * chromatin_amp
    nucleus_rgb = nucleus_colour[None, None, :] + rng.normal(0, 0.02, 3) + texture[..., None]
    for _ in range(n_nucleoli):
        offset = rng.uniform(0, 0.5) * nucleus_r
        angle = rng.uniform(0, 2 * np.pi)
        spot = _blob(
            yy,
            xx,
            ny + offset * np.sin(angle),
            nx + offset * np.cos(angle),
            rng.uniform(3.0, 5.0) * s,
            rng,
            0.05,
        )
        nucleus_rgb = nucleus_rgb + spot[..., None] * np.array([0.14, 0.14, 0.10])
    image = image * (1 - nucleus[..., None]) + nucleus_rgb * nucleus[..., None]

    # Stain variation (per-channel gain and offset), focus and sensor noise.
    image = image * rng.normal(1.0, 0.05, 3) + rng.normal(0.0, 0.02, 3)
    image = ndimage.gaussian_filter(
        image, (rng.uniform(0.3, 1.0) * s, rng.uniform(0.3, 1.0) * s, 0)
    )
    image = image + rng.normal(0, 0.012, image.shape)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_synthetic_dataset(
    folder: Path, per_class: int, seed: int = 0, size: int = 128, extension: str = ".png"
) -> Path:
    """Write ``per_class`` synthetic cells of each kind into ``folder/<kind>/`` sub-folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for kind in CELL_KINDS:
        target = Path(folder) / kind
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(generate_cell(kind, rng, size)).save(
                target / f"{kind}_{i:04d}{extension}"
            )
    return Path(folder)
