"""Full-data similarity measures beyond CKA, on two feature matrices of the same samples.

Every function takes ``x (n, p)`` and ``y (n, q)`` (one row per sample, the same samples in the
same order; trailing dimensions are flattened) and returns a 0-d float64 tensor, computed in
float64 whatever the input dtype. Values are never clamped; a measure that is undefined on the
data (a constant representation) is NaN.

* ``"cka"``: linear or RBF CKA, :func:`hf_cka.functional.cka` (Kornblith et al. 2019).
* ``"mutual_knn"``: mutual k-nearest-neighbour alignment (Huh et al. 2024).
* ``"procrustes"``: orthogonal Procrustes similarity (Ding et al. 2021; Williams et al. 2021).
* ``"svcca"``: singular vector CCA (Raghu et al. 2017).
* ``"pwcca"``: projection-weighted CCA (Morcos et al. 2018).
* ``"rsa"``: Spearman correlation of representational dissimilarity matrices
  (Kriegeskorte et al. 2008).

These measures need all samples at once, so a run holds the pooled features of every layer:
:func:`estimate_bytes` says how much memory that takes and refuses beyond a budget. This module
imports only torch: no ``torch.nn``, transformers or accelerate.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch

from .errors import (
    FullDataMemoryError,
    InvalidInputError,
    NonFiniteActivationError,
    ShapeMismatchError,
    byte_size,
    suggest,
)
from .functional import as_features, cka

Measure = Literal["cka", "mutual_knn", "procrustes", "svcca", "pwcca", "rsa"]
Distance = Literal["correlation", "euclidean", "cosine"]
DISTANCES: tuple[str, ...] = get_args(Distance)


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Mutual k-nearest-neighbour alignment of Huh et al. (2024).

    ``m = (1/n) sum_i |N_k^X(i) ∩ N_k^Y(i)| / k``, where ``N_k^X(i)`` are the ``k`` samples
    ``j != i`` with the largest kernel value ``<x_i / |x_i|, x_j / |x_j|>`` (inner product of
    L2-normalised features, as in the paper; a zero row stays zero). Ties are broken towards the
    lower sample index. The value lies in ``[0, 1]``: 1 when both representations give every
    sample the same neighbours; about ``k / (n - 1)`` for unrelated ones.

    Invariant to orthogonal maps and isotropic scaling of the features (so to permutations of
    features) and to a positive rescaling of any sample; not to translation (features are not
    centred) nor to general linear maps.

    Args:
        x: features of the first representation, one row per sample.
        y: features of the second representation for the same samples.
        k: neighbours per sample, ``1 <= k < n``.
    """
    x, y = _pair(x, y, min_samples=2)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise InvalidInputError(
            f"expected an integer k with 1 <= k < n_samples = {n} (a sample is not its own "
            f"neighbour), got k={k!r}; use a smaller k or more samples"
        )
    shared = _neighbour_mask(x, k) & _neighbour_mask(y, k)
    return shared.sum(dim=1).to(torch.float64).mean() / k


def procrustes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes similarity ``||X^T Y||_*`` of centred, unit-Frobenius features.

    With ``X`` and ``Y`` column-centred and scaled to ``||X||_F = ||Y||_F = 1`` (zero-padding the
    narrower one, which changes nothing), ``min_Q ||X - Y Q||_F^2 = 2 - 2 ||X^T Y||_*`` over
    orthogonal ``Q``, the nuclear norm being the sum of singular values (Schönemann 1966).
    This returns the similarity ``||X^T Y||_*`` in ``[0, 1]``; the Procrustes distance of Ding et
    al. (2021) is ``sqrt(2 - 2 * similarity)``, and Williams et al. (2021)'s angular shape metric
    is ``arccos(similarity)``. 1 means ``Y`` is a rotation (or reflection) of ``X``, up to
    translation and scale.

    Invariant to orthogonal maps, isotropic scaling and translation of either side (so to
    permutations of features); not to general linear maps. Symmetric in ``x`` and ``y``.
    """
    x, y = _pair(x, y, min_samples=2)
    x, y = _centred(x), _centred(y)
    norm_x, norm_y = x.norm(), y.norm()
    if norm_x == 0 or norm_y == 0:
        return _nan()
    # X^T Y (p x q) has the singular values of Zx^T Zy, with Z Z^T = X X^T and Z at most n wide
    cross = _compress(x / norm_x).T @ _compress(y / norm_y)
    return torch.linalg.svdvals(cross).sum()


def svcca(x: torch.Tensor, y: torch.Tensor, keep: float = 0.99) -> torch.Tensor:
    """Singular vector CCA of Raghu et al. (2017): mean canonical correlation after an SVD.

    Each side is centred and reduced to its top singular directions explaining a fraction
    ``keep`` of its variance (the fewest ``k`` with ``sum_{i<=k} s_i^2 >= keep * sum_i s_i^2``);
    the value is the mean of the ``min(k_x, k_y)`` canonical correlations ``rho_i`` of the
    reduced data, the singular values of ``U_x^T U_y`` with ``U`` their orthonormal bases. It
    lies in ``[0, 1]``. With ``keep=1`` every non-degenerate direction is kept. CCA needs
    ``n`` well above the kept dimensions: with ``k >= n - 1`` every correlation is 1.

    Invariant to orthogonal maps, isotropic scaling and translation of either side; with
    ``keep=1`` to every invertible linear map (CCA's invariance). Symmetric.

    Args:
        x: features of the first representation, one row per sample.
        y: features of the second representation for the same samples.
        keep: fraction of variance each side keeps, in ``(0, 1]``.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise InvalidInputError(f"expected keep in (0, 1], got {keep!r}")
    x, y = _pair(x, y, min_samples=2)
    basis_x, values_x = _basis(_centred(x))
    basis_y, values_y = _basis(_centred(y))
    if values_x.numel() == 0 or values_y.numel() == 0:
        return _nan()
    kept_x = basis_x[:, : _directions_kept(values_x, keep)]
    kept_y = basis_y[:, : _directions_kept(values_y, keep)]
    return torch.linalg.svdvals(kept_x.T @ kept_y).mean()


def pwcca(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Projection-weighted CCA of Morcos et al. (2018).

    With ``rho_i`` the canonical correlations of the centred ``X`` and ``Y`` and ``h_i`` the
    unit-norm canonical variates of ``X`` (``h_i = X a_i``),
    ``PWCCA = sum_i alpha_i rho_i / sum_i alpha_i``, ``alpha_i = sum_j |<h_i, x_j>|`` over the
    centred feature columns ``x_j`` of ``X``: directions that carry more of ``X``'s features
    weigh more. The weights come from ``x``, so ``pwcca(x, y) != pwcca(y, x)`` in general (the
    authors' released code weights by the side with fewer neurons: pass it first to match).
    In ``[0, 1]``.

    Invariant to isotropic scaling, translation and permutations (and sign flips) of the
    features of ``x``, and to every invertible linear map of ``y``; not to orthogonal maps of
    ``x``, which change the weights.
    """
    x, y = _pair(x, y, min_samples=2)
    x = _centred(x)
    basis_x, values_x = _basis(x)
    basis_y, values_y = _basis(_centred(y))
    if values_x.numel() == 0 or values_y.numel() == 0:
        return _nan()
    directions, correlations, _ = torch.linalg.svd(basis_x.T @ basis_y, full_matrices=False)
    variates = basis_x @ directions  # (n, m), orthonormal canonical variates of x
    weights = (x.T @ variates).abs().sum(dim=0)
    return (weights * correlations).sum() / weights.sum()


def rsa(x: torch.Tensor, y: torch.Tensor, distance: Distance = "correlation") -> torch.Tensor:
    """Representational similarity analysis (Kriegeskorte et al. 2008).

    The Spearman correlation of the upper triangles (``i < j``) of the two representational
    dissimilarity matrices ``D_ij = d(x_i, x_j)``, with tied dissimilarities given their average
    rank. ``d`` is ``"correlation"`` (``1 - Pearson r`` of the two samples' feature vectors),
    ``"cosine"`` (``1 - cos``) or ``"euclidean"``. In ``[-1, 1]``; NaN when all dissimilarities
    of a side are equal.

    Invariant to isotropic scaling and permutations of features for every ``d``, to any
    monotone change of the dissimilarities; ``"euclidean"`` and ``"cosine"`` also to
    orthogonal maps (``"euclidean"`` to translation too); ``"correlation"`` and ``"cosine"`` to
    a positive rescaling of any sample, ``"correlation"`` also to adding a constant to all
    features of a sample. Symmetric.
    """
    if distance not in DISTANCES:
        raise InvalidInputError(
            f"expected distance in {DISTANCES}, got {distance!r}.{suggest(distance, DISTANCES)}"
        )
    x, y = _pair(x, y, min_samples=3)
    return _pearson(_average_ranks(_rdm(x, distance)), _average_ranks(_rdm(y, distance)))


MEASURES: dict[str, Callable[..., torch.Tensor]] = {
    "cka": cka,
    "mutual_knn": mutual_knn,
    "procrustes": procrustes,
    "svcca": svcca,
    "pwcca": pwcca,
    "rsa": rsa,
}


MEASURE_LABELS: dict[str, str] = {
    "cka": "CKA",
    "mutual_knn": "mutual k-NN",
    "procrustes": "Procrustes similarity",
    "svcca": "SVCCA",
    "pwcca": "PWCCA",
    "rsa": "RSA (Spearman)",
}
"""How plots label each measure."""


def measure_label(metadata: Mapping[str, Any]) -> str:
    """The label of the measure a result's ``metadata`` records (``"CKA"`` when none)."""
    measure = metadata.get("measure") or "cka"
    return MEASURE_LABELS.get(measure, str(measure))


def similarity(
    x: torch.Tensor, y: torch.Tensor, measure: Measure = "cka", **params: object
) -> torch.Tensor:
    """``measure`` of ``x`` and ``y`` with its keyword ``params`` (``k=``, ``keep=``, ...).

    Raises:
        InvalidInputError: an unknown measure, or a parameter the measure does not take.
    """
    function = MEASURES.get(measure)
    if function is None:
        raise InvalidInputError(
            f"expected measure in {tuple(MEASURES)}, got {measure!r}.{suggest(measure, MEASURES)}"
        )
    accepted = list(measure_parameters(measure))
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InvalidInputError(
            f"measure {measure!r} takes the parameters {accepted}, got unknown {unknown}"
        )
    return function(x, y, **params)


def measure_parameters(measure: Measure) -> tuple[str, ...]:
    """Names of the keyword parameters ``measure`` takes (``("k",)`` for ``"mutual_knn"``)."""
    function = MEASURES.get(measure)
    if function is None:
        raise InvalidInputError(
            f"expected measure in {tuple(MEASURES)}, got {measure!r}.{suggest(measure, MEASURES)}"
        )
    return tuple(n for n in inspect.signature(function).parameters if n not in ("x", "y"))


def estimate_bytes(
    n_samples: int,
    dims_a: Sequence[int],
    dims_b: Sequence[int] | None = None,
    *,
    measure: Measure = "cka",
    max_bytes: int | None = None,
) -> int:
    """Peak bytes of a full-data ``measure`` over layers of widths ``dims_a`` x ``dims_b``.

    The pooled float64 features of every layer (``8 n (sum(dims_a) + sum(dims_b))``; side A
    only when ``dims_b=None``, self-similarity) plus the temporaries of the largest layer pair:
    ``(n, n)`` kernels, distances and sort orders for ``"cka"``, ``"mutual_knn"`` and ``"rsa"``,
    centred copies and SVD factors for ``"procrustes"``, ``"svcca"`` and ``"pwcca"``. An
    estimate, not counting the model or the batch being processed.

    Raises:
        FullDataMemoryError: the estimate exceeds ``max_bytes``; nothing is allocated.
    """
    if measure not in MEASURES:
        raise InvalidInputError(
            f"expected measure in {tuple(MEASURES)}, got {measure!r}.{suggest(measure, MEASURES)}"
        )
    sides = [list(dims_a)] if dims_b is None else [list(dims_a), list(dims_b)]
    if n_samples < 1 or not all(sides) or min(min(dims) for dims in sides) < 1:
        raise InvalidInputError(
            f"expected n_samples >= 1 and at least one positive width per side, got "
            f"n_samples={n_samples}, dims_a={list(dims_a)}, dims_b={dims_b}"
        )
    n = n_samples
    features = n * sum(sum(dims) for dims in sides)
    p, q = max(sides[0]), max(sides[-1])
    if measure in ("procrustes", "svcca", "pwcca"):
        rank = min(n, max(p, q))
        temporary = 3 * n * (p + q) + 2 * rank * rank
    else:
        temporary = 2 * n * (p + q) + 5 * n * n
    needed = 8 * (features + temporary)
    if max_bytes is not None and needed > max_bytes:
        raise FullDataMemoryError(
            f"measure {measure!r} on {n} samples needs about {byte_size(needed)} (the pooled "
            f"float64 features of {sum(len(d) for d in sides)} layers take "
            f"{byte_size(8 * features)}), but max_bytes allows {byte_size(max_bytes)}; "
            "use fewer samples or layers, raise max_bytes, or use measure='cka', whose "
            "minibatch and streaming estimators do not hold the features"
        )
    return needed


def _pair(x: torch.Tensor, y: torch.Tensor, *, min_samples: int) -> tuple[torch.Tensor, ...]:
    """Both sides as float64 ``(n, d)`` matrices, checked for shape and finiteness."""
    x, y = as_features(x), as_features(y)
    if x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(
            f"x and y must have one row per sample for the same samples, got {x.shape[0]} and "
            f"{y.shape[0]} rows"
        )
    if x.shape[0] < min_samples or x.shape[1] == 0 or y.shape[1] == 0:
        raise ShapeMismatchError(
            f"expected at least {min_samples} samples and one feature per side, got x of shape "
            f"{tuple(x.shape)} and y of shape {tuple(y.shape)}"
        )
    for name, features in (("x", x), ("y", y)):
        finite = torch.isfinite(features).all(dim=1)
        if not finite.all():
            row = int((~finite).nonzero()[0])
            raise NonFiniteActivationError(
                f"expected finite features, but {name} has NaN or Inf (first in sample {row}); "
                "check the layer's outputs or the model dtype"
            )
    return x, y


def _nan() -> torch.Tensor:
    return torch.tensor(float("nan"), dtype=torch.float64)


def _centred(x: torch.Tensor) -> torch.Tensor:
    """Column-centred features ``H X``."""
    return x - x.mean(dim=0)


def _compress(x: torch.Tensor) -> torch.Tensor:
    """A matrix ``Z`` at most ``n`` wide with ``Z Z^T = X X^T`` (``R^T`` of ``X^T = QR``)."""
    if x.shape[1] <= x.shape[0]:
        return x
    return torch.linalg.qr(x.T).R.T


def _basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis ``U`` (n, r) of the column space of ``x`` and its singular values.

    Directions with singular value at most ``max(n, d) * eps * s_max`` (numpy's rank
    tolerance) are rounding noise and dropped; an all-zero ``x`` has rank 0.
    """
    u, s, _ = torch.linalg.svd(_compress(x), full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return u[:, :0], s[:0]
    rank = int((s > max(x.shape) * torch.finfo(s.dtype).eps * s[0]).sum())
    return u[:, :rank], s[:rank]


def _directions_kept(values: torch.Tensor, keep: float) -> int:
    """Fewest leading directions whose squared singular values reach ``keep`` of the total."""
    energy = values.square()
    fractions = energy.cumsum(dim=0) / energy.sum()
    return min(int((fractions < keep).sum()) + 1, values.numel())


def _neighbour_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(n, n)`` bool mask of each sample's ``k`` nearest neighbours by cosine kernel."""
    norms = x.norm(dim=1, keepdim=True)
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    kernel = unit @ unit.T
    kernel.fill_diagonal_(-math.inf)  # a sample is not its own neighbour
    # a stable descending sort keeps tied samples in index order: ties go to the lower index
    order = torch.sort(kernel, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(kernel, dtype=torch.bool).scatter_(1, order, True)


def _rdm(x: torch.Tensor, distance: str) -> torch.Tensor:
    """Upper triangle (``i < j``, row-major) of the dissimilarity matrix of the rows of ``x``."""
    if distance == "euclidean":
        dissimilarity = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    else:
        if distance == "correlation":
            x = x - x.mean(dim=1, keepdim=True)
        norms = x.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            row = int((norms[:, 0] == 0).nonzero()[0])
            what = "constant" if distance == "correlation" else "zero"
            raise InvalidInputError(
                f"{distance} distance is undefined for sample {row}, whose features are "
                f"{what}; use distance='euclidean'"
            )
        unit = x / norms
        dissimilarity = 1.0 - unit @ unit.T
    n = dissimilarity.shape[0]
    rows, cols = torch.triu_indices(n, n, offset=1)
    return dissimilarity[rows, cols]


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..m`` of ``values``, tied values sharing the average of their ranks."""
    ordered, order = values.sort()
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(dim=0).to(torch.float64)  # 1-based rank of each group's last member
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[group]
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two vectors (NaN when either is constant)."""
    a, b = a - a.mean(), b - b.mean()
    scale = a.norm() * b.norm()
    return (a @ b) / scale if scale > 0 else _nan()
