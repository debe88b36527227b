"""How far to trust an accuracy: its confidence interval, and whether two heads really differ.

A 5-fold figure on 4,000 cells moves by 0.025 points per cell, on ALL-IDB2's 260 by 0.38; the
reports therefore give, beside each head's accuracy, the Wilson score interval of the share of
cells it got right (every cell is held out exactly once), and compare heads on the very same
cells with McNemar's exact test: only the cells one head gets right and the other wrong count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054


def mean_of_known(values: list[float | None]) -> float | None:
    """Mean of the values that are known (None: undefined, such as the AUC of a class with no
    cells); None when none is."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def wilson_interval(right: int, total: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion ``right / total`` (None for no cells)."""
    if total <= 0:
        return None
    p = right / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    low = 0.0 if right == 0 else max(0.0, centre - half)  # exact at the ends, not 1 - 1e-16
    high = 1.0 if right == total else min(1.0, centre + half)
    return low, high


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of two classifiers' per-cell correctness on the same cells:
    ``only_a`` cells only A got right, ``only_b`` only B, and the two-sided p-value of that
    split under "equally accurate" (a binomial test with p = 1/2; 1.0 when they never
    disagree)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"correctness arrays differ in shape: {a.shape} vs {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p_value = 1.0
    if only_a + only_b:
        from scipy.stats import binomtest

        p_value = float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p_value": p_value}


def comparison_text(name_a: str, name_b: str, result: dict[str, Any]) -> str:
    """One line for a report: the split of the disagreements and what it says."""
    p = result["p_value"]
    verdict = (
        f"{name_a if result['only_a'] > result['only_b'] else name_b} is more accurate (p < 0.05)"
        if p < 0.05
        else "no evidence of a difference (p >= 0.05)"
    )
    return (
        f"{name_a} vs {name_b}: {result['only_a']} cell(s) only {name_a} got right, "
        f"{result['only_b']} only {name_b}; McNemar exact p = {p:.3g}: {verdict}"
    )
