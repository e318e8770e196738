"""Pure tensor math of CKA: Gram matrices, centering, HSIC estimators and full-data CKA.

Conventions follow Kornblith et al. (2019), "Similarity of Neural Network Representations
Revisited". For features ``X (n, p)`` and ``Y (n, q)`` with Gram matrices ``K`` and ``L``:

* biased HSIC:   ``HSIC_b(K, L) = tr(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n``;
* unbiased HSIC (Song et al. 2012), written with U-centering (Szekely & Rizzo 2014):
  ``HSIC_u(K, L) = <U(K), U(L)>_F / (n (n - 3))`` where ``U(K)_ij = K~_ij - r_i / (n - 2)
  - r_j / (n - 2) + s / ((n - 1)(n - 2))`` off the diagonal and ``0`` on it, ``K~`` is ``K``
  with a zeroed diagonal, ``r = K~ 1`` and ``s = 1^T K~ 1``;
* ``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

Every function computes in float64 whatever the floating input dtype (integer, bool and complex
features are refused). Functions taking Gram matrices accept a leading batch dimension
(``(..., n, n)``) so that all layers are handled at once. CKA is invariant to rescaling either
representation, so :func:`cka` first multiplies each one by a power of two that brings its largest
entry near 1 (exact in binary floating point): any finite float64 input gives the value of the
unscaled input, where Gram matrices of features near ``1e78`` or ``1e-90`` would overflow or
underflow. This module imports only torch: no ``torch.nn``, transformers or accelerate.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .errors import (
    BatchTooSmallError,
    InvalidInputError,
    NonFiniteActivationError,
    ShapeMismatchError,
)

Kernel = Literal["linear", "rbf"]
KERNELS: tuple[str, ...] = ("linear", "rbf")


def as_features(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as a float64 ``(n, d)`` matrix (trailing dimensions are flattened).

    Raises:
        InvalidInputError: ``x`` is complex, integer or bool (CKA needs real floating features).
        ShapeMismatchError: ``x`` is a scalar, or has no feature (a zero-width dimension).
        BatchTooSmallError: ``x`` has no sample (zero rows).
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.is_complex():
        raise InvalidInputError(
            f"expected real floating-point features, got {x.dtype}; CKA is defined for real "
            "features: pass x.real and x.imag as separate representations, or their "
            "concatenation torch.cat([x.real, x.imag], dim=-1)"
        )
    if not x.is_floating_point():
        raise InvalidInputError(
            f"expected floating-point features, got {x.dtype}; convert them first with .float() "
            "or .double()"
        )
    if x.dim() == 0:
        raise ShapeMismatchError(
            "expected features of shape (n_samples, dim), got a scalar; pass one row per sample"
        )
    if x.shape[0] == 0:
        raise BatchTooSmallError(
            f"expected at least one sample (row), got features of shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ShapeMismatchError(
            f"expected at least one feature per sample, got features of shape {tuple(x.shape)}"
        )
    x = x.detach()
    if x.dim() == 1:
        x = x[:, None]
    elif x.dim() > 2:
        x = x.reshape(x.shape[0], -1)
    return x.to(torch.float64)


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel Gram matrix ``K = X X^T`` in float64."""
    x = as_features(x)
    return x @ x.T


def gram_rbf(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """RBF Gram matrix ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` in float64.

    The bandwidth follows Kornblith et al.: ``sigma^2 = threshold^2 * median(D)`` where ``D`` is
    the full ``(n, n)`` matrix of squared pairwise distances (diagonal zeros included).
    """
    check_threshold(threshold)
    x = as_features(x)
    sq_dist = squared_distances(x)
    sigma2 = threshold**2 * _median(sq_dist)
    # all samples identical (sigma2 = 0): the kernel is constant, CKA is undefined; selected on
    # the device, as an `if` would read sigma2 back to the host for every layer of every batch
    return torch.where(sigma2 == 0, 1.0, torch.exp(-sq_dist / (2.0 * sigma2)))


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` if it is a valid RBF bandwidth factor (finite and > 0), else raise
    :class:`InvalidInputError` naming it."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise InvalidInputError(
            f"expected a finite RBF threshold > 0 (the bandwidth is threshold * the median "
            f"distance), got threshold={threshold!r}; the default is 1.0"
        )
    return float(threshold)


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``||x_i - x_j||^2`` of the rows of ``x``, in float64.

    Computed from the differences, not as ``|a|^2 + |b|^2 - 2ab``: that expansion leaves
    rounding residues (~1e-17) between identical rows, which would turn the median bandwidth of
    duplicated samples into noise. Identical rows get exactly 0.
    """
    x = as_features(x)
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()


def gram(x: torch.Tensor, kernel: Kernel = "linear", threshold: float = 1.0) -> torch.Tensor:
    """Gram matrix of ``x`` for ``kernel`` in ``{"linear", "rbf"}``."""
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x, threshold)
    raise InvalidInputError(f"expected kernel in {KERNELS}, got {kernel!r}")


def center_gram(k: torch.Tensor) -> torch.Tensor:
    """Double-centred Gram matrix ``H K H`` (``H = I - 11^T / n``) over the last two dims."""
    k = k.to(torch.float64)
    row_means = k.mean(dim=-1, keepdim=True)
    col_means = k.mean(dim=-2, keepdim=True)
    return k - row_means - col_means + row_means.mean(dim=-2, keepdim=True)


def u_center_gram(k: torch.Tensor) -> torch.Tensor:
    """U-centred Gram matrix ``U(K)`` (Szekely & Rizzo 2014) over the last two dims.

    ``U(K)_ij = K~_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2))`` for ``i != j`` and ``0`` on the
    diagonal, with ``K~ = K - diag(K)``, ``r = K~ 1``, ``s = 1^T K~ 1``. Needs ``n >= 4``.
    """
    n = k.shape[-1]
    if n < 4:
        raise BatchTooSmallError(
            f"the unbiased HSIC estimator needs at least 4 samples per batch, got {n}; "
            "use a larger batch or debiased=False"
        )
    k = k.to(torch.float64).clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    row_sums = k.sum(dim=-1)
    total = row_sums.sum(dim=-1)
    k -= row_sums[..., :, None] / (n - 2)
    k -= row_sums[..., None, :] / (n - 2)
    k += (total / ((n - 1) * (n - 2)))[..., None, None]
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Biased HSIC ``tr(K H L H) / (n - 1)^2`` (Gretton et al. 2005)."""
    n = k.shape[-1]
    return (center_gram(k) * l.to(torch.float64)).sum(dim=(-2, -1)) / (n - 1) ** 2


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC ``<U(K), U(L)> / (n (n - 3))`` (Song et al. 2012)."""
    n = k.shape[-1]
    return (u_center_gram(k) * u_center_gram(l)).sum(dim=(-2, -1)) / (n * (n - 3))


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: Kernel = "linear",
    debiased: bool = False,
    threshold: float = 1.0,
) -> torch.Tensor:
    """Full-data CKA of ``x (n, p)`` and ``y (n, q)`` as a float64 scalar tensor.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the biased HSIC by default and the
    unbiased one (U-centering) when ``debiased=True``; the ``1/(n-1)^2`` and ``1/(n(n-3))``
    factors cancel in the ratio. ``kernel="rbf"`` uses ``sigma^2 = threshold^2 * median`` of
    the squared pairwise distances. The value is never clamped: a debiased estimate can be
    slightly negative. It is NaN when either representation is constant over the samples.
    Both kernels are invariant to an isotropic scaling of either side, so each side is first
    scaled by a power of two (exact) to bring its largest entry near 1: any finite float64 input
    gives the value of the unscaled input.

    Args:
        x: features of the first representation, one row per sample.
        y: features of the second representation for the same samples, in the same order.
        kernel: ``"linear"`` or ``"rbf"``.
        debiased: use the unbiased HSIC estimator (Song et al. 2012); needs ``n >= 4``.
        threshold: RBF bandwidth as a fraction of the median distance.

    Returns:
        A 0-d float64 tensor.

    Raises:
        NonFiniteActivationError: ``x`` or ``y`` holds NaN or Inf.
        InvalidInputError: complex, integer or bool features, an unknown kernel, or an RBF
            ``threshold`` that is not finite and > 0.
        ShapeMismatchError: ``x`` and ``y`` have different numbers of rows.

    Example:
        >>> import torch
        >>> from hf_cka.functional import cka
        >>> gen = torch.Generator().manual_seed(0)
        >>> x, noise = torch.randn(200, 16, generator=gen), torch.randn(200, 16, generator=gen)
        >>> rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
        >>> print(f"{cka(x, 1e6 * x @ rotation):.6f}")  # invariant to rotation and scale
        1.000000
        >>> 0.4 < float(cka(x, x + noise)) < 0.6
        True
        >>> abs(float(cka(x, noise, debiased=True))) < 0.05  # unrelated features: about 0
        True
    """
    if kernel == "rbf":
        check_threshold(threshold)
    x, y = _finite_features(x, "x"), _finite_features(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(
            f"x and y must have one row per sample for the same samples, got {x.shape[0]} and "
            f"{y.shape[0]} rows"
        )
    x, y = unit_scale(x), unit_scale(y)  # exact: keeps Gram entries and their squares in range
    if kernel == "linear":  # shift invariant: centre (and rescale) against cancellation
        x, y = unit_scale(x - x.mean(dim=0)), unit_scale(y - y.mean(dim=0))
    k, l = gram(x, kernel, threshold), gram(y, kernel, threshold)  # noqa: E741
    center = u_center_gram if debiased else center_gram
    kc, lc = center(k), center(l)
    if _constant(kc, k) or _constant(lc, l):  # CKA undefined: NaN, never a rounding residue
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (kc * lc).sum() / (kc.norm() * lc.norm())


def _constant(centred: torch.Tensor, raw: torch.Tensor) -> bool:
    """Whether centring removed all but rounding of a Gram matrix (a constant representation).

    Same rule as the accumulators: centred energy at most ``1e-20`` of the raw energy.
    """
    return bool(centred.square().sum() <= 1e-20 * raw.square().sum())


def _median(x: torch.Tensor) -> torch.Tensor:
    """Median of all entries, averaging the two middle ones for an even count (as numpy does)."""
    values = x.reshape(-1).sort().values
    count = values.numel()
    return (values[(count - 1) // 2] + values[count // 2]) / 2


def _finite_features(x: torch.Tensor, name: str) -> torch.Tensor:
    """``as_features(x)``, refusing NaN or Inf (the accumulators raise the same error)."""
    x = as_features(x)
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteActivationError(
            f"{name} holds NaN or Inf values; CKA is undefined for them: drop or repair those "
            "samples (a float16 model overflows easily: use float32 or bfloat16)"
        )
    return x


def scale_exponent(max_abs: torch.Tensor) -> torch.Tensor:
    """Exponent ``e`` (integer-valued, same shape) with ``max_abs = m 2^e``, ``0.5 <= m < 1``;
    ``0`` for zero (and for non-finite entries, which callers reject)."""
    return torch.frexp(max_abs.to(torch.float64)).exponent.to(torch.float64)


def scale_by_power_of_two(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """``x * 2^exponent``, exact (two factors, so that ``2^exponent`` itself never overflows)."""
    if exponent == 0:
        return x
    half = exponent // 2
    return x * 2.0**half * 2.0 ** (exponent - half)


def unit_scale(x: torch.Tensor) -> torch.Tensor:
    """``x`` times the power of two that brings its largest absolute entry into ``[0.5, 1)``
    (exact in binary floating point; a no-op for an all-zero ``x``)."""
    return scale_by_power_of_two(x, -int(scale_exponent(x.abs().max())))


def gram_from_distances(distances: torch.Tensor, kernel: Kernel, threshold: float) -> torch.Tensor:
    """Gram matrices ``(..., n, n)`` of the features whose squared distances are ``distances``.

    Linear: ``K = -H D H / 2``, the Gram of the column-centred features. RBF:
    ``K = exp(-D / (2 sigma^2))`` with ``sigma^2 = threshold^2 median(D)`` over the full matrix
    (diagonal zeros included, as :func:`hf_cka.functional.gram_rbf`), all ones when ``D = 0``.
    """
    d = distances.to(torch.float64)
    if kernel == "linear":
        return -0.5 * center_gram(d)
    if kernel != "rbf":
        raise InvalidInputError(f"expected kernel in {KERNELS}, got {kernel!r}")
    check_threshold(threshold)
    grams = []
    for layer in d.reshape(-1, *d.shape[-2:]):
        sigma2 = threshold**2 * _median(layer)  # selected on the device, as gram_rbf does
        grams.append(torch.where(sigma2 == 0, 1.0, torch.exp(-layer / (2.0 * sigma2))))
    return torch.stack(grams).reshape(d.shape)
