"""A float64 NumPy reference for the similarity measures of ``hf_cka.measures``.

Written from the papers' formulas, deliberately by other routes than the package (covariance
whitening instead of orthonormal bases, explicit loops over samples and pairs), and sharing no
code with it.

* Mutual kNN (Huh et al. 2024): ``mean_i |N_k^X(i) ∩ N_k^Y(i)| / k``, neighbours by the inner
  product of L2-normalised features, self excluded, ties to the lower index.
* Procrustes (Ding et al. 2021): ``||X^T Y||_*`` for centred ``X``, ``Y`` with unit Frobenius norm.
* CCA (Hotelling 1936): the canonical correlations are the singular values of
  ``Sxx^{-1/2} Sxy Syy^{-1/2}`` (pseudo-inverse square roots on the non-null eigenspaces).
* SVCCA (Raghu et al. 2017): CCA of the top singular directions keeping ``keep`` of the variance.
* PWCCA (Morcos et al. 2018): ``sum_i a_i rho_i / sum_i a_i`` with ``a_i = sum_j |<h_i, x_j>|``.
* RSA (Kriegeskorte et al. 2008): Spearman correlation (average ranks for ties) of the upper
  triangles of the dissimilarity matrices.
"""

from __future__ import annotations

import numpy as np


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Mean fraction of shared k nearest neighbours."""

    def neighbours(features: np.ndarray) -> list[set[int]]:
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        unit = features / np.where(norms > 0, norms, 1.0)
        kernel = unit @ unit.T
        n = len(features)
        return [
            set(sorted((j for j in range(n) if j != i), key=lambda j: (-kernel[i, j], j))[:k])
            for i in range(n)
        ]

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    shared = [len(a & b) / k for a, b in zip(neighbours(x), neighbours(y), strict=True)]
    return float(np.mean(shared))


def procrustes(x: np.ndarray, y: np.ndarray) -> float:
    """Nuclear norm of ``X^T Y`` after centring and Frobenius normalisation."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    return float(np.linalg.svd(x.T @ y, compute_uv=False).sum())


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """``cov^{-1/2}`` on the eigenvectors with non-negligible eigenvalues, 0 elsewhere."""
    values, vectors = np.linalg.eigh(cov)
    keep = values > values.max() * 1e-10
    return (vectors[:, keep] / np.sqrt(values[keep])) @ vectors[:, keep].T


def cca(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical correlations (descending) and the unit-norm canonical variates of ``x``."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    whiten_x, whiten_y = _inverse_sqrt(x.T @ x), _inverse_sqrt(y.T @ y)
    rank = min(np.linalg.matrix_rank(x), np.linalg.matrix_rank(y))
    u, rho, _ = np.linalg.svd(whiten_x @ (x.T @ y) @ whiten_y)
    variates = x @ (whiten_x @ u[:, :rank])  # a_i = Sxx^{-1/2} u_i, h_i = X a_i
    return rho[:rank], variates


def svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    """Mean canonical correlation of the top singular directions explaining ``keep``."""

    def reduce(features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64) - np.mean(features, axis=0)
        u, s, _ = np.linalg.svd(features, full_matrices=False)
        s = s[: np.linalg.matrix_rank(features)]
        explained = np.cumsum(s**2) / np.sum(s**2)
        kept = len(s) if keep >= 1 else int(np.argmax(explained >= keep)) + 1
        return u[:, :kept] * s[:kept]

    rho, _ = cca(reduce(x), reduce(y))
    return float(np.mean(rho))


def pwcca(x: np.ndarray, y: np.ndarray) -> float:
    """Canonical correlations weighted by how much of ``x``'s neurons each variate carries."""
    rho, variates = cca(x, y)
    centred = np.asarray(x, np.float64) - np.mean(x, axis=0)
    weights = np.array(
        [
            sum(abs(variates[:, i] @ centred[:, j]) for j in range(centred.shape[1]))
            for i in range(len(rho))
        ]
    )
    return float(np.sum(weights * rho) / np.sum(weights))


def _dissimilarity(a: np.ndarray, b: np.ndarray, distance: str) -> float:
    if distance == "euclidean":
        return float(np.sqrt(np.sum((a - b) ** 2)))
    if distance == "cosine":
        return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(1.0 - np.corrcoef(a, b)[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; each tied value gets ``#smaller + (#equal + 1) / 2``."""
    return np.array([np.sum(values < v) + (np.sum(values == v) + 1) / 2 for v in values])


def rsa(x: np.ndarray, y: np.ndarray, distance: str = "correlation") -> float:
    """Spearman correlation of the upper triangles of the two RDMs."""

    def upper(features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64)
        n = len(features)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        return np.array([_dissimilarity(features[i], features[j], distance) for i, j in pairs])

    return float(np.corrcoef(_average_ranks(upper(x)), _average_ranks(upper(y)))[0, 1])
