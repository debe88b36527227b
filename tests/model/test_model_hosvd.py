"""The HOSVD classifier on feature tensors drawn from known subspaces."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from leuk_fhir.errors import NotFittedError
from leuk_fhir.model.hosvd import (
    HOSVDClassifier,
    hosvd_class_basis,
    relative_residuals,
)

C, P = 12, 9


def _subspace_samples(rng: np.random.Generator, basis: np.ndarray, n: int) -> np.ndarray:
    """n (C, P) samples that are random combinations of the given basis matrices."""
    return np.einsum("kcp,nk->ncp", basis, rng.standard_normal((n, basis.shape[0])))


@pytest.fixture()
def three_subspaces() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    bases = [rng.standard_normal((3, C, P)) for _ in range(3)]
    x = np.concatenate([_subspace_samples(rng, b, 30) for b in bases])
    y = np.repeat(np.array(["a", "b", "c"]), 30)
    xt = np.concatenate([_subspace_samples(rng, b, 15) for b in bases])
    yt = np.repeat(np.array(["a", "b", "c"]), 15)
    return x, y, xt, yt, bases


def test_member_of_a_class_subspace_has_near_zero_residual() -> None:
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((4, C, P))
    sub = hosvd_class_basis(_subspace_samples(rng, basis, 50), C, P, 4)
    # The basis images are orthonormal.
    assert np.allclose(sub.basis @ sub.basis.T, np.eye(4), atol=1e-8)
    members = _subspace_samples(rng, basis, 10)
    assert relative_residuals(members, sub).max() < 1e-6
    outsiders = rng.standard_normal((10, C, P))
    assert relative_residuals(outsiders, sub).min() > 0.5


def test_classifier_is_exact_on_known_subspaces(three_subspaces) -> None:
    x, y, xt, yt, _ = three_subspaces
    clf = HOSVDClassifier(random_state=0).fit(x, y)
    assert clf.score(xt, yt) == 1.0
    residuals = clf.residuals(xt)
    own = residuals[np.arange(len(yt)), np.searchsorted(clf.classes_, yt)]
    assert own.max() < 1e-6  # inner CV kept enough ranks and basis images
    proba = clf.predict_proba(xt)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert (clf.classes_[proba.argmax(axis=1)] == yt).all()


def test_random_tensors_are_out_of_distribution(three_subspaces) -> None:
    x, y, xt, _, _ = three_subspaces
    clf = HOSVDClassifier(random_state=0).fit(x, y)
    noise = np.random.default_rng(3).standard_normal((20, C, P))
    assert clf.is_out_of_distribution(noise).all()
    assert not clf.is_out_of_distribution(xt).any()


def test_a_class_made_of_two_kinds_needs_two_subspaces() -> None:
    """Class 'mixed' is the union of two 3-d subspaces; with a 3-image basis one subspace per
    class cannot hold it, k-means sub-classes can. Non-negative maps and coefficients, like
    ReLU feature maps."""
    rng = np.random.default_rng(4)
    kinds = [np.abs(rng.standard_normal((3, C, P))) for _ in range(3)]

    def _subspace_samples(rng: np.random.Generator, basis: np.ndarray, n: int) -> np.ndarray:
        return np.einsum("kcp,nk->ncp", basis, rng.uniform(0.2, 1.0, (n, basis.shape[0])))

    x = np.concatenate([_subspace_samples(rng, k, 40) for k in kinds])
    y = np.array(["single"] * 40 + ["mixed"] * 80)
    xt = np.concatenate([_subspace_samples(rng, k, 20) for k in kinds])
    yt = np.array(["single"] * 20 + ["mixed"] * 40)
    one = HOSVDClassifier(n_basis=3, n_subspaces=1, channel_rank=1.0, position_rank=1.0).fit(x, y)
    two = HOSVDClassifier(n_basis=3, n_subspaces=2, channel_rank=1.0, position_rank=1.0).fit(x, y)
    assert two.score(xt, yt) == 1.0
    mixed = xt[yt == "mixed"]
    column = list(two.classes_).index("mixed")
    assert two.residuals(mixed)[:, column].max() < 1e-6  # each kind sits in its own subspace
    assert one.residuals(mixed)[:, column].mean() > 0.03  # one 3-d basis cannot hold both kinds


def test_scikit_learn_estimator_conventions(three_subspaces) -> None:
    x, y, xt, _, _ = three_subspaces
    clf = HOSVDClassifier(n_basis=5, cv=2, random_state=7)
    assert clf.get_params()["n_basis"] == 5
    assert not hasattr(clf, "classes_")  # __init__ only stores parameters
    with pytest.raises(NotFittedError):
        clf.predict(xt)
    assert clf.fit(x, y) is clf
    copy = clone(clf)
    assert copy.get_params() == clf.get_params() and not hasattr(copy, "subspaces_")
    assert clf.n_basis_ == 5
    # (n, C, H, W) maps are accepted too.
    assert (clf.predict(xt.reshape(len(xt), C, 3, 3)) == clf.predict(xt)).all()


def test_state_round_trip_predicts_the_same(three_subspaces) -> None:
    x, y, xt, _, _ = three_subspaces
    clf = HOSVDClassifier(random_state=0).fit(x, y)
    meta, arrays = clf.to_state()
    again = HOSVDClassifier.from_state(meta, arrays)
    assert np.allclose(again.residuals(xt), clf.residuals(xt), atol=1e-4)
    assert (again.predict(xt) == clf.predict(xt)).all()


def test_bad_training_input_is_rejected() -> None:
    x = np.random.default_rng(0).standard_normal((10, C, P))
    with pytest.raises(ValueError, match="two classes"):
        HOSVDClassifier().fit(x, np.zeros(10))
    with pytest.raises(ValueError, match="labels"):
        HOSVDClassifier().fit(x, np.zeros(9))
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        HOSVDClassifier().fit(bad, np.arange(10) % 2)


def _patients(rng: np.random.Generator, class_bases: list[np.ndarray], count: int, cells: int):
    """Cells of ``count`` patients (alternating classes): each patient adds three directions of
    its own to its class subspace, as a patient's stain and smear add their own look."""
    x, y, groups = [], [], []
    for p in range(count):
        own = rng.standard_normal((3, C, P))
        basis = np.concatenate([class_bases[p % 2], own])
        x.append(_subspace_samples(rng, basis, cells))
        y += [p % 2] * cells
        groups += [f"patient{p}"] * cells
    return np.concatenate(x), np.array(y), np.array(groups)


def test_grouped_inner_cv_calibrates_on_patients_the_bases_never_saw() -> None:
    rng = np.random.default_rng(0)
    class_bases = [rng.standard_normal((2, C, P)) for _ in range(2)]
    x, y, groups = _patients(rng, class_bases, 12, 10)
    new, new_y, _ = _patients(rng, class_bases, 6, 10)
    plain = HOSVDClassifier(random_state=0).fit(x, y)
    grouped = HOSVDClassifier(random_state=0).fit(x, y, groups=groups)
    assert not plain.cv_grouped_ and grouped.cv_grouped_
    # Calibrated on held-out cells of patients it had seen, the plain fit's thresholds are so
    # tight that new patients' cells all look out of distribution; held-out patients fix that.
    assert plain.is_out_of_distribution(new).mean() > 0.9
    assert grouped.is_out_of_distribution(new).mean() < 0.1
    assert grouped.score(new, new_y) > 0.9
    meta, arrays = grouped.to_state()
    assert HOSVDClassifier.from_state(meta, arrays).cv_grouped_


def test_inner_splits_keep_groups_apart_or_fall_back() -> None:
    from leuk_fhir.model.hosvd import _inner_splits

    y = np.repeat([0, 1], 30)
    groups = np.array([f"g{i // 5}" for i in range(60)])  # six groups per class
    splits, grouped = _inner_splits(y, groups, 3, 0)
    assert grouped and len(splits) == 3
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])
        assert set(y[train]) == {0, 1}
    assert sorted(np.concatenate([t for _, t in splits]).tolist()) == list(range(60))
    # One class from a single patient: no grouped split can train on it and test it.
    one = np.where(y == 0, "g0", groups)
    splits, grouped = _inner_splits(y, one, 3, 0)
    assert not grouped and len(splits) == 3
    with pytest.raises(ValueError, match="groups for"):
        HOSVDClassifier().fit(np.zeros((60, C, P)) + 1, y, groups=groups[:10])
