"""Confidence intervals and the cell-by-cell comparison of two heads."""

from __future__ import annotations

import numpy as np
import pytest

from leuk_fhir.model.statistics import comparison_text, mcnemar, wilson_interval


def test_wilson_interval_matches_textbook_values() -> None:
    # Newcombe (1998), and 5 of 10: the standard worked examples.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) is None
    # 98.55% of 4,000 cells, the PBC headline: about +-0.4 points.
    low, high = wilson_interval(3942, 4000)  # type: ignore[misc]
    assert 0.981 < low < 0.982 and 0.988 < high < 0.989


def test_mcnemar_counts_only_the_disagreements() -> None:
    a = np.array([True] * 50 + [True] * 1 + [False] * 9 + [False] * 5)
    b = np.array([True] * 50 + [False] * 1 + [True] * 9 + [False] * 5)
    result = mcnemar(a, b)
    assert (result["only_a"], result["only_b"]) == (1, 9)
    assert result["p_value"] == pytest.approx(22 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert "softmax is more accurate (p < 0.05)" in comparison_text("hosvd", "softmax", result)
    same = mcnemar(a, a)
    assert same == {"only_a": 0, "only_b": 0, "p_value": 1.0}
    assert "no evidence of a difference" in comparison_text("hosvd", "svm", same)
    with pytest.raises(ValueError, match="differ in shape"):
        mcnemar(a, a[:-1])
