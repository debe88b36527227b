"""Samples deeper than 8 bits to 8 bits: one rule for training (``model``) and the service
(``adapters``), so a model sees a 16-bit image the same way in both.

A file's declared depth wins (DICOM BitsStored, TIFF SMaxSampleValue). Without one, the depth is
inferred from the brightest sample, rounded up to the depths cameras write (10, 12, 14 or 16
bits): a 12-bit camera's images all scale by 4095 however bright each one is, so the rule never
stretches an image's contrast and one bright pixel moves nothing but its own depth class.
Values up to 255 are taken as 8-bit data in a wider container and kept as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Sample depths inferred from the brightest value (the depths camera sensors write).
CAMERA_DEPTHS = (10, 12, 14, 16)


def sample_bits(max_value: int, declared: int | None = None) -> int:
    """Bits per sample: ``declared`` when given, else inferred from ``max_value``."""
    if declared:
        return int(declared)
    if max_value <= 255:
        return 8
    for bits in CAMERA_DEPTHS:
        if max_value < 1 << bits:
            return bits
    return int(max_value).bit_length()


def deep_to_uint8(samples: np.ndarray, declared_bits: int | None = None) -> np.ndarray:
    """Integer samples of any depth to uint8 by :func:`sample_bits` (negatives read as 0)."""
    a = np.clip(np.asarray(samples), 0, None)
    bits = sample_bits(int(a.max(initial=0)), declared_bits)
    if bits <= 8:
        return np.clip(a, 0, 255).astype(np.uint8)
    top = float((1 << bits) - 1)
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def declared_bits(image: Any) -> int | None:
    """The sample depth a deep image file declares (a Pillow TIFF's SMaxSampleValue), if any."""
    tags = getattr(image, "tag_v2", None)
    value = tags.get(341) if tags is not None else None
    value = value[0] if isinstance(value, tuple) and value else value
    return int(value).bit_length() if isinstance(value, int | float) and value > 255 else None
