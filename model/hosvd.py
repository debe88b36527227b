"""HOSVD subspace classifier over stacks of feature tensors (Savas & Eldén 2007).

For each class the training feature maps, arranged as a (channels x positions x samples)
tensor ``A``, are decomposed by a truncated higher-order SVD (De Lathauwer, De Moor &
Vandewalle, SIAM J. Matrix Anal. Appl. 21(4), 2000)::

    A = S x1 U x2 V x3 W

Modes 1 and 2 are truncated to ranks (r1, r2), which compresses and denoises; the core slices
``S[:, :, k]`` along the sample mode are mutually orthogonal, so the leading ``k`` slices,
normalised and mapped back with ``U`` and ``V``, form an orthonormal basis of "basis images"
of that class. A test tensor ``D`` is projected on each class basis and goes to the class
with the smallest relative residual ``||D - P_c D||_F / ||D||_F`` (B. Savas and L. Eldén,
"Handwritten digit classification using higher order singular value decomposition",
Pattern Recognition 40(3):993-1003, 2007). A class may hold several subspaces (k-means
sub-classes, or labelled ones: the kinds of cell inside a class such as "other"); its residual
is then the smallest over them.

The mathematics are plain functions written against tensorly; :class:`HOSVDClassifier` is a
thin scikit-learn-style estimator that picks ranks, basis size and sub-classes by inner
cross-validation, turns residuals into calibrated probabilities (temperature fitted on
out-of-fold residuals) and flags samples far from every class as out of distribution.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorly as tl
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from leuk_fhir.errors import NotFittedError


@dataclass(frozen=True)
class SubspaceBasis:
    """An orthonormal basis of one class (or sub-class) subspace.

    ``channel_factors`` U (C x r1), ``position_factors`` V (P x r2), and ``basis`` (K x r1*r2):
    row k is the k-th normalised core slice ``S[:, :, k]`` flattened in C order, so the k-th
    basis image is ``U @ basis[k].reshape(r1, r2) @ V.T``.
    """

    channel_factors: np.ndarray
    position_factors: np.ndarray
    basis: np.ndarray


def as_feature_tensor(features: np.ndarray) -> np.ndarray:
    """Reshape (n, C, H, W) or (n, C, P) feature maps to float64 (n, C, P)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"feature stack must have shape (n, channels, ...), got {x.shape}")
    if x.ndim == 2:
        x = x[:, :, None]
    return x.reshape(x.shape[0], x.shape[1], -1)


def _leading_left_vectors(matrix: np.ndarray, k: int) -> np.ndarray:
    """Leading ``k`` left singular vectors of a matrix, via the eigenvectors of its Gram matrix
    (the smaller side; much cheaper than a full SVD of a wide unfolding)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[0] <= m.shape[1]:
        w, vec = np.linalg.eigh(m @ m.T)
        order = np.argsort(w)[::-1]
        w, vec = w[order], vec[:, order]
    else:
        w, right = np.linalg.eigh(m.T @ m)
        order = np.argsort(w)[::-1]
        w, right = w[order], right[:, order]
        keep = w > max(w[0], 0.0) * 1e-12 if w.size else w > 0
        vec = (m @ right[:, keep]) / np.sqrt(w[keep])[None, :]
        w = w[keep]
        vec, _ = np.linalg.qr(vec)  # re-orthonormalise
    keep = int(min(k, int(np.sum(w > max(w[0], 0.0) * 1e-12)) if w.size else 0))
    return vec[:, : max(keep, 1)]


def hosvd_factors(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The class tensor (C x P x n) and the full mode-1 and mode-2 factor matrices of its HOSVD."""
    tensor = tl.tensor(np.transpose(as_feature_tensor(samples), (1, 2, 0)))
    u = _leading_left_vectors(tl.to_numpy(tl.unfold(tensor, 0)), tensor.shape[0])
    v = _leading_left_vectors(tl.to_numpy(tl.unfold(tensor, 1)), tensor.shape[1])
    return tl.to_numpy(tensor), u, v


def basis_from_factors(
    tensor: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    channel_rank: int,
    position_rank: int,
    n_basis: int,
) -> SubspaceBasis:
    """Truncate the factors to (r1, r2), compress, and keep the ``n_basis`` leading core slices."""
    u = u[:, : max(1, min(channel_rank, u.shape[1]))]
    v = v[:, : max(1, min(position_rank, v.shape[1]))]
    compressed = tl.tenalg.multi_mode_dot(tl.tensor(tensor), [u, v], modes=[0, 1], transpose=True)
    # Sample-mode unfolding (n, r1*r2): its right singular vectors are the normalised core
    # slices S[:, :, k] of the HOSVD, mutually orthogonal.
    unfolded = tl.to_numpy(tl.unfold(compressed, 2))
    slices = _leading_left_vectors(unfolded.T, n_basis).T
    return SubspaceBasis(
        np.ascontiguousarray(u), np.ascontiguousarray(v), np.ascontiguousarray(slices)
    )


def hosvd_class_basis(
    samples: np.ndarray, channel_rank: int, position_rank: int, n_basis: int
) -> SubspaceBasis:
    """Truncated HOSVD of one class's (n, C, P) samples and the basis of its leading core slices.

    Follows Savas & Eldén (2007), sections 3-4: factor matrices of modes 1 and 2 from the
    singular vectors of the mode unfoldings, projection to the (r1 x r2 x n) compressed tensor,
    and the singular vectors of its sample-mode unfolding, which are the normalised core slices.
    """
    tensor, u, v = hosvd_factors(samples)
    return basis_from_factors(tensor, u, v, channel_rank, position_rank, n_basis)


def cumulative_relative_residuals(samples: np.ndarray, subspace: SubspaceBasis) -> np.ndarray:
    """Relative residuals of (n, C, P) samples for every basis size 1..K: shape (n, K).

    With an orthonormal basis the least-squares residual needs no solve:
    ``||D - P D||^2 = ||D||^2 - sum_k <D, A_k>^2``.
    """
    x = as_feature_tensor(samples)
    norms2 = np.einsum("ncp,ncp->n", x, x) + 1e-12
    n, c, p = x.shape
    u, v = subspace.channel_factors, subspace.position_factors
    # U^T D V for every sample as two large matrix products (BLAS-friendly): (n, r1, r2).
    xv = (x.reshape(n * c, p) @ v).reshape(n, c, v.shape[1])
    reduced = (xv.transpose(0, 2, 1).reshape(-1, c) @ u).reshape(n, v.shape[1], u.shape[1])
    coords = reduced.transpose(0, 2, 1).reshape(n, -1) @ subspace.basis.T  # (n, K)
    captured = np.cumsum(coords**2, axis=1)
    return np.sqrt(np.clip(1.0 - captured / norms2[:, None], 0.0, 1.0))


def relative_residuals(samples: np.ndarray, subspace: SubspaceBasis) -> np.ndarray:
    """Relative residual of each (n, C, P) sample to the full basis: shape (n,)."""
    return cumulative_relative_residuals(samples, subspace)[:, -1]


def feature_norms(samples: np.ndarray) -> np.ndarray:
    """Frobenius norm of each sample's feature tensor."""
    x = as_feature_tensor(samples)
    return np.linalg.norm(x.reshape(len(x), -1), axis=1)


def _orthonormal_columns(matrix: np.ndarray) -> np.ndarray:
    """Re-orthonormalise float32-stored factors in float64 (QR, signs kept)."""
    q, r = np.linalg.qr(np.asarray(matrix, dtype=np.float64))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def _labelled_groups(members: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """One class's samples split by their sub-class labels (groups of at least two samples;
    the whole class when no label has two)."""
    groups = [members[labels == value] for value in np.unique(labels)]
    return [g for g in groups if len(g) >= 2] or [members]


def _inner_splits(
    y_index: np.ndarray, groups: np.ndarray | None, n_folds: int, random_state: int | None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool]:
    """The inner cross-validation's splits, and whether they keep groups apart: grouped when
    every class spans two or more groups and every training part keeps every class."""
    n_classes = int(y_index.max()) + 1
    if groups is not None:
        groups = np.asarray(groups)
        per_class = min(len(np.unique(groups[y_index == c])) for c in range(n_classes))
        k = min(n_folds, per_class)
        if k >= 2:
            grouped = StratifiedGroupKFold(k, shuffle=True, random_state=random_state)
            splits = list(grouped.split(y_index, y_index, groups))
            if all(len(np.unique(y_index[train])) == n_classes for train, _ in splits):
                return splits, True
    plain = StratifiedKFold(n_folds, shuffle=True, random_state=random_state)
    return list(plain.split(y_index, y_index)), False


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def residual_probabilities(residuals: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities ``softmax(-residual / temperature)`` (argmax = smallest residual)."""
    return _softmax(-np.asarray(residuals, dtype=np.float64) / max(temperature, 1e-6))


def fit_temperature(residuals: np.ndarray, y_index: np.ndarray) -> float:
    """Temperature minimising the log-loss of held-out residuals (one-parameter calibration)."""

    def nll(log_t: float) -> float:
        p = residual_probabilities(residuals, float(np.exp(log_t)))
        return float(-np.mean(np.log(p[np.arange(len(y_index)), y_index] + 1e-12)))

    result = minimize_scalar(nll, bounds=(np.log(1e-4), np.log(10.0)), method="bounded")
    return float(np.exp(result.x))


class HOSVDClassifier(ClassifierMixin, BaseEstimator):
    """Nearest-subspace classifier with HOSVD class bases (scikit-learn estimator).

    Parameters are ``"auto"`` (chosen by ``cv``-fold inner cross-validation on the training
    set) or fixed values: ``channel_rank`` / ``position_rank`` truncate modes 1 and 2 (an int,
    or a float in (0, 1] read as a fraction of the mode size), ``n_basis`` is the number of
    core slices per subspace, ``n_subspaces`` the number of k-means sub-classes per class.
    ``fit(X, y, subclasses=s)`` gives each labelled sub-class its own subspace instead
    (``n_subspaces_`` is then 0); residuals, probabilities and the out-of-distribution rule
    stay per class.
    ``ood_quantile`` and ``ood_margin`` set the out-of-distribution rule: a sample is out of
    distribution when its residual to the nearest class exceeds ``margin x quantile`` of the
    held-out nearest-class residuals (at least 0.01), or its feature-map energy lies outside
    the training range widened by ``margin``.
    """

    def __init__(
        self,
        channel_rank: int | float | str = "auto",
        position_rank: int | float | str = "auto",
        n_basis: int | str = "auto",
        n_subspaces: int | str = "auto",
        cv: int = 3,
        ood_quantile: float = 0.995,
        ood_margin: float = 1.15,
        random_state: int = 0,
    ) -> None:
        self.channel_rank = channel_rank
        self.position_rank = position_rank
        self.n_basis = n_basis
        self.n_subspaces = n_subspaces
        self.cv = cv
        self.ood_quantile = ood_quantile
        self.ood_margin = ood_margin
        self.random_state = random_state

    # -- hyper-parameter grid -------------------------------------------------------------
    @staticmethod
    def _rank(value: int | float | str, size: int) -> int:
        if isinstance(value, str):
            raise ValueError(f"rank must be 'auto', an int or a fraction, not {value!r}")
        if isinstance(value, float) and 0 < value <= 1:
            return max(1, int(round(value * size)))
        return max(1, min(int(value), size))

    def _grid(self, n_channels: int, n_positions: int) -> list[tuple[int, int, int]]:
        ch: list[int | float | str] = (
            [0.5, 1.0] if self.channel_rank == "auto" else [self.channel_rank]
        )
        pos: list[int | float | str] = (
            [0.5, 1.0] if self.position_rank == "auto" else [self.position_rank]
        )
        sub = [1, 3] if self.n_subspaces == "auto" else [int(self.n_subspaces)]
        if n_positions == 1:
            pos = [1]
        ranks = {
            (self._rank(c, n_channels), self._rank(p, n_positions))
            for c, p in itertools.product(ch, pos)
        }
        return sorted((r1, r2, s) for (r1, r2), s in itertools.product(ranks, sub))

    def _basis_sizes(self) -> list[int]:
        if self.n_basis == "auto":
            return [2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
        return [int(self.n_basis)]

    # -- fitting ----------------------------------------------------------------------------
    def _fit_subspaces(
        self,
        x: np.ndarray,
        y_index: np.ndarray,
        rank_pairs: list[tuple[int, int]],
        n_sub: int,
        k_max: int,
        labelled: np.ndarray | None = None,
    ) -> dict[tuple[int, int], list[tuple[int, SubspaceBasis]]]:
        """Subspaces of every class for each (r1, r2); mode factors computed once per group.
        With ``labelled`` (a sub-class label per sample) each labelled sub-class gets one."""
        out: dict[tuple[int, int], list[tuple[int, SubspaceBasis]]] = {p: [] for p in rank_pairs}
        for c in range(len(self.classes_)):
            members = y_index == c
            groups = (
                self._subclasses(x[members], n_sub)
                if labelled is None
                else _labelled_groups(x[members], labelled[members])
            )
            for group in groups:
                tensor, u, v = hosvd_factors(group)
                for r1, r2 in rank_pairs:
                    out[(r1, r2)].append((c, basis_from_factors(tensor, u, v, r1, r2, k_max)))
        return out

    def _subclasses(self, members: np.ndarray, n_sub: int) -> list[np.ndarray]:
        if n_sub <= 1 or len(members) < 6 * n_sub:
            return [members]
        from sklearn.cluster import KMeans

        pooled = members.mean(axis=2)
        pooled = pooled / (np.linalg.norm(pooled, axis=1, keepdims=True) + 1e-12)
        labels = KMeans(n_sub, n_init=3, random_state=self.random_state).fit_predict(pooled)
        groups = [members[labels == k] for k in range(n_sub)]
        return [g for g in groups if len(g) >= 2] or [members]

    def _class_residuals_all_k(
        self, x: np.ndarray, subspaces: list[tuple[int, SubspaceBasis]], sizes: list[int]
    ) -> np.ndarray:
        """Residual per (basis size, sample, class), the minimum over each class's subspaces."""
        out = np.full((len(sizes), len(x), len(self.classes_)), np.inf)
        for c, sub in subspaces:
            cum = cumulative_relative_residuals(x, sub)
            for i, k in enumerate(sizes):
                out[i, :, c] = np.minimum(out[i, :, c], cum[:, min(k, cum.shape[1]) - 1])
        return out

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        subclasses: np.ndarray | None = None,
        groups: np.ndarray | None = None,
    ) -> HOSVDClassifier:
        """Fit class bases; choose hyper-parameters by inner CV; calibrate on held-out residuals.

        ``subclasses`` (optional, one label per sample) names the kind of cell inside its class:
        each labelled sub-class gets its own subspace and k-means sub-classes are not tried.
        ``groups`` (optional, one per sample: the patient) keeps each group on one side of every
        inner split, so the choice, the temperature and the out-of-distribution thresholds are
        made on patients the bases never saw (``cv_grouped_``); with too few groups per class
        for two splits, the inner CV falls back to splitting samples.
        """
        x = as_feature_tensor(X)
        y = np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"X has {len(x)} samples but y has {len(y)} labels")
        labelled = None if subclasses is None else np.asarray(subclasses)
        if labelled is not None and len(labelled) != len(y):
            raise ValueError(f"{len(labelled)} sub-class labels for {len(y)} samples")
        if groups is not None and len(groups) != len(y):
            raise ValueError(f"{len(groups)} groups for {len(y)} samples")
        if not np.all(np.isfinite(x)):
            raise ValueError("feature tensors contain NaN or infinite values")
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("HOSVDClassifier needs at least two classes")
        self.n_features_in_ = int(np.prod(x.shape[1:]))
        self.feature_shape_ = tuple(int(s) for s in x.shape[1:])
        grid = self._grid(x.shape[1], x.shape[2])
        if labelled is not None:
            grid = sorted({(r1, r2, 0) for r1, r2, _ in grid})
        sizes = self._basis_sizes()
        min_count = int(np.bincount(y_index).min())
        n_folds = int(min(self.cv, min_count))
        if n_folds < 2:
            raise ValueError("every class needs at least two samples")

        # Out-of-fold residuals for every grid point and basis size.
        oof = np.zeros((len(grid), len(sizes), len(x), len(self.classes_)))
        splits, self.cv_grouped_ = _inner_splits(y_index, groups, n_folds, self.random_state)
        pairs = sorted({(r1, r2) for r1, r2, _ in grid})
        for train, test in splits:
            for n_sub in sorted({s for _, _, s in grid}):
                fitted = self._fit_subspaces(
                    x[train],
                    y_index[train],
                    pairs,
                    n_sub,
                    max(sizes),
                    None if labelled is None else labelled[train],
                )
                for g, (r1, r2, s) in enumerate(grid):
                    if s != n_sub:
                        continue
                    oof[g, :, test, :] = np.transpose(
                        self._class_residuals_all_k(x[test], fitted[(r1, r2)], sizes), (1, 0, 2)
                    )
        accuracy = (oof.argmin(axis=3) == y_index[None, None, :]).mean(axis=2)
        # Best accuracy; ties go to the largest mean held-out margin (how much closer a sample
        # is to its own class than to the nearest other), then to the smaller model.
        true_res = np.take_along_axis(oof, y_index[None, None, :, None], axis=3)[..., 0]
        other = oof.copy()
        np.put_along_axis(other, y_index[None, None, :, None], np.inf, axis=3)
        margin = ((other.min(axis=3) - true_res) / (other.min(axis=3) + 1e-12)).mean(axis=2)
        best_score = accuracy.max()
        candidates = [
            (-round(float(margin[g, k]), 4), grid[g][2], grid[g][0] * grid[g][1], sizes[k], g, k)
            for g, k in zip(*np.nonzero(accuracy >= best_score - 1e-12), strict=True)
        ]
        *_, g_best, k_best = min(candidates)
        r1, r2, n_sub = grid[g_best]
        self.channel_rank_, self.position_rank_, self.n_subspaces_ = r1, r2, n_sub
        self.n_basis_ = sizes[k_best]
        self.cv_accuracy_ = float(best_score)
        self.cv_results_ = {
            "grid": [list(p) for p in grid],
            "basis_sizes": sizes,
            "accuracy": accuracy.tolist(),
        }
        held_out = oof[g_best, k_best]
        self.temperature_ = fit_temperature(held_out, y_index)
        # n held-out samples cannot support a probability closer to 0 or 1 than about 1/n.
        self.probability_floor_ = 1.0 / (len(x) + 2)
        # Out-of-distribution thresholds: a margin above the ``ood_quantile`` of the held-out
        # residual to the *nearest* class, per nearest class (global when it has few samples).
        nearest, nearest_residual = held_out.argmin(axis=1), held_out.min(axis=1)
        overall = np.quantile(nearest_residual, self.ood_quantile)
        self.ood_thresholds_ = np.array(
            [
                max(
                    self.ood_margin
                    * (
                        np.quantile(nearest_residual[nearest == c], self.ood_quantile)
                        if np.sum(nearest == c) >= 20
                        else overall
                    ),
                    0.01,
                )
                for c in range(len(self.classes_))
            ]
        )
        # ... and the range of feature-map energy seen in training (catches inputs that excite
        # the CNN far more or far less than any cell did: noise, flat colours, wrong stains).
        norms = np.linalg.norm(x.reshape(len(x), -1), axis=1)
        self.norm_range_ = np.array(
            [
                np.quantile(norms, 1.0 - self.ood_quantile) / self.ood_margin,
                np.quantile(norms, self.ood_quantile) * self.ood_margin,
            ]
        )
        self.subspaces_ = self._fit_subspaces(
            x, y_index, [(r1, r2)], n_sub, self.n_basis_, labelled
        )[(r1, r2)]
        return self

    # -- prediction ---------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "subspaces_"):
            raise NotFittedError("HOSVDClassifier is not fitted yet: call fit() first")

    def residuals(self, X: np.ndarray) -> np.ndarray:
        """Relative residual of each sample to each class (columns follow ``classes_``)."""
        self._check_fitted()
        x = as_feature_tensor(X)
        if tuple(x.shape[1:]) != self.feature_shape_:
            raise ValueError(
                f"expected feature tensors of shape {self.feature_shape_}, got {x.shape[1:]}"
            )
        out = np.full((len(x), len(self.classes_)), np.inf)
        for c, sub in self.subspaces_:
            out[:, c] = np.minimum(out[:, c], relative_residuals(x, sub))
        return out

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Negative residuals (larger is more likely)."""
        return -self.residuals(X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (columns follow ``classes_``): ``softmax(-r / T)`` with
        T fitted on held-out residuals, floored at 1/(n_train + 2)."""
        p = residual_probabilities(self.residuals(X), self.temperature_)
        floor = getattr(self, "probability_floor_", 0.0)
        return (1.0 - floor * p.shape[1]) * p + floor

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The class with the smallest relative residual."""
        residuals = self.residuals(X)
        return self.classes_[residuals.argmin(axis=1)]

    def is_out_of_distribution(self, X: np.ndarray) -> np.ndarray:
        """True where a sample is far from every class (see :meth:`out_of_distribution_scores`)."""
        x = as_feature_tensor(X)
        return self.out_of_distribution_scores(self.residuals(x), feature_norms(x)) > 1.0

    def out_of_distribution_scores(
        self, residuals: np.ndarray, norms: np.ndarray | None = None
    ) -> np.ndarray:
        """Above 1 means out of distribution: the largest of (residual to the nearest class /
        that class's threshold) and, when ``norms`` are given, how far the feature-map energy
        lies outside the range seen in training (ratio to the nearer bound)."""
        self._check_fitted()
        residuals = np.asarray(residuals)
        nearest = residuals.argmin(axis=1)
        score = residuals[np.arange(len(residuals)), nearest] / self.ood_thresholds_[nearest]
        norm_range = getattr(self, "norm_range_", None)
        if norms is not None and norm_range is not None:
            norms = np.maximum(np.asarray(norms, dtype=np.float64), 1e-12)
            score = np.maximum(score, np.maximum(norm_range[0] / norms, norms / norm_range[1]))
        return score

    # -- state for the model artifact -------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able metadata and plain numpy arrays that rebuild the fitted classifier."""
        self._check_fitted()
        meta = {
            "params": self.get_params(),
            "classes": [str(c) for c in self.classes_],
            "feature_shape": list(self.feature_shape_),
            "channel_rank": self.channel_rank_,
            "position_rank": self.position_rank_,
            "n_basis": self.n_basis_,
            "n_subspaces": self.n_subspaces_,
            "cv_accuracy": self.cv_accuracy_,
            "cv_grouped": bool(self.cv_grouped_),
            "temperature": self.temperature_,
            "probability_floor": self.probability_floor_,
            "subspace_classes": [int(c) for c, _ in self.subspaces_],
        }
        arrays: dict[str, np.ndarray] = {
            "ood_thresholds": self.ood_thresholds_,
            "norm_range": self.norm_range_,
        }
        for i, (_, sub) in enumerate(self.subspaces_):
            arrays[f"subspace{i}.channel_factors"] = sub.channel_factors.astype(np.float32)
            arrays[f"subspace{i}.position_factors"] = sub.position_factors.astype(np.float32)
            arrays[f"subspace{i}.basis"] = sub.basis.astype(np.float32)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> HOSVDClassifier:
        """Rebuild a fitted classifier from :meth:`to_state` output."""
        clf = cls(**meta["params"])
        clf.classes_ = np.array(meta["classes"])
        clf.feature_shape_ = tuple(meta["feature_shape"])
        clf.n_features_in_ = int(np.prod(clf.feature_shape_))
        clf.channel_rank_ = int(meta["channel_rank"])
        clf.position_rank_ = int(meta["position_rank"])
        clf.n_basis_ = int(meta["n_basis"])
        clf.n_subspaces_ = int(meta["n_subspaces"])
        clf.cv_accuracy_ = float(meta["cv_accuracy"])
        clf.cv_grouped_ = bool(meta.get("cv_grouped", False))
        clf.temperature_ = float(meta["temperature"])
        clf.probability_floor_ = float(meta.get("probability_floor", 0.0))
        clf.ood_thresholds_ = np.asarray(arrays["ood_thresholds"], dtype=np.float64)
        if "norm_range" in arrays:
            clf.norm_range_ = np.asarray(arrays["norm_range"], dtype=np.float64)
        clf.subspaces_ = [
            (
                int(c),
                SubspaceBasis(
                    _orthonormal_columns(arrays[f"subspace{i}.channel_factors"]),
                    _orthonormal_columns(arrays[f"subspace{i}.position_factors"]),
                    _orthonormal_columns(np.asarray(arrays[f"subspace{i}.basis"]).T).T,
                ),
            )
            for i, c in enumerate(meta["subspace_classes"])
        ]
        return clf
