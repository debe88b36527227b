"""Romanowsky stain facts shared by cell detection and cell framing.

In Wright, Giemsa and May-Gruenwald-Giemsa smears white-cell nuclei take up the basic dye and
read blue-violet: their blue channel stands well above green, which pink red cells, pale
background and plasma do not.
"""

from __future__ import annotations

import numpy as np

#: Minimum (blue - green) of a nucleus pixel in 8-bit RGB (measured on BCCD and PBC smears).
NUCLEUS_STAIN_THRESHOLD = 40


def nucleus_mask(rgb: np.ndarray, threshold: int = NUCLEUS_STAIN_THRESHOLD) -> np.ndarray:
    """Pixels whose blue exceeds green by ``threshold`` and that are not brighter in red than blue."""
    r = rgb[..., 0].astype(np.int16)
    g = rgb[..., 1].astype(np.int16)
    b = rgb[..., 2].astype(np.int16)
    return ((b - g) >= threshold) & (b >= r - 10)
