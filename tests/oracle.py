"""A small float64 NumPy reference implementation of CKA, written from the formulas.

It shares no code with ``hf_cka`` on purpose: the tests compare the package against it.

* Gram matrices (Kornblith et al. 2019): ``K = X X^T``; RBF ``K_ij = exp(-D_ij / (2 sigma^2))``
  with ``D`` the full ``(n, n)`` squared-distance matrix and ``sigma^2 = t^2 * median(D)``.
* Biased HSIC: ``tr(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n``.
* Unbiased HSIC (Song et al. 2012), computed two ways that must agree:
  ``<U(K), U(L)> / (n (n - 3))`` with the U-centering of Szekely & Rizzo (2014), and the
  closed form ``[tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n - 3))``.
* CKA: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.
* Minibatch CKA (Nguyen et al. 2020) with per-batch weights ``w_b = n_b``:
  ``CKA_ij = sum_b w_b c_bij / sqrt(sum_b w_b a_bi * sum_b w_b e_bj)``, and the delta-method
  standard error documented in ``hf_cka/metric.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def kornblith_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 data ``x (100, 10)`` and ``y = x + noise`` of the Kornblith et al. demo
    notebook (``np.random.seed(1337)``), whose CKA values DESIGN.md quotes."""
    rng = np.random.RandomState(1337)
    x = rng.randn(100, 10)
    y = rng.randn(100, 10) + x
    return torch.from_numpy(x), torch.from_numpy(y)


def gram_linear(x: np.ndarray) -> np.ndarray:
    """``X X^T``."""
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def gram_rbf(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """``exp(-D / (2 t^2 median(D)))`` with ``D_ij = ||x_i - x_j||^2`` (diagonal included)."""
    x = np.asarray(x, dtype=np.float64)
    sq_dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-sq_dist / (2.0 * threshold**2 * np.median(sq_dist)))


def gram(x: np.ndarray, kernel: str = "linear", threshold: float = 1.0) -> np.ndarray:
    """Gram matrix for ``kernel`` in ``{"linear", "rbf"}``."""
    return gram_linear(x) if kernel == "linear" else gram_rbf(x, threshold)


def center(k: np.ndarray) -> np.ndarray:
    """``H K H`` with ``H = I - 11^T / n``."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ k @ h


def u_center(k: np.ndarray) -> np.ndarray:
    """``U(K)``: ``K~_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2))`` off the diagonal, 0 on it."""
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    r = kt.sum(1)
    s = kt.sum()
    u = kt - r[:, None] / (n - 2) - r[None, :] / (n - 2) + s / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def hsic_biased(k: np.ndarray, l: np.ndarray) -> np.ndarray:  # noqa: E741
    """``tr(K H L H) / (n - 1)^2``."""
    n = k.shape[0]
    return np.trace(k @ center(l)) / (n - 1) ** 2


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """``<U(K), U(L)>_F / (n (n - 3))``."""
    n = k.shape[0]
    return float((u_center(k) * u_center(l)).sum() / (n * (n - 3)))


def hsic_song(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012), eq. 5: the unbiased HSIC in closed form."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    ones = np.ones(n)
    value = (
        np.trace(kt @ lt)
        + (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    )
    return float(value / (n * (n - 3)))


def cka(
    x: np.ndarray,
    y: np.ndarray,
    kernel: str = "linear",
    debiased: bool = False,
    threshold: float = 1.0,
) -> float:
    """Full-data CKA ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``."""
    k, l = gram(x, kernel, threshold), gram(y, kernel, threshold)  # noqa: E741
    hsic = hsic_unbiased if debiased else hsic_biased
    return float(hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)))


def batch_hsics(
    batches_a: Sequence[Sequence[np.ndarray]],
    batches_b: Sequence[Sequence[np.ndarray]],
    kernel: str = "linear",
    threshold: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-batch unbiased HSICs ``c (k, La, Lb)``, ``a (k, La)``, ``e (k, Lb)`` and ``n_b (k,)``.

    ``batches_a[b][i]`` is layer ``i`` of model A on batch ``b`` (likewise for B).
    """
    c, a, e, sizes = [], [], [], []
    for feats_a, feats_b in zip(batches_a, batches_b, strict=True):
        ka = [gram(f, kernel, threshold) for f in feats_a]
        kb = [gram(f, kernel, threshold) for f in feats_b]
        c.append([[hsic_song(ki, lj) for lj in kb] for ki in ka])
        a.append([hsic_song(ki, ki) for ki in ka])
        e.append([hsic_song(lj, lj) for lj in kb])
        sizes.append(np.asarray(feats_a[0]).shape[0])
    return np.array(c), np.array(a), np.array(e), np.array(sizes, dtype=np.float64)


def minibatch_cka(
    batches_a: Sequence[Sequence[np.ndarray]],
    batches_b: Sequence[Sequence[np.ndarray]],
    kernel: str = "linear",
    threshold: float = 1.0,
) -> np.ndarray:
    """``(La, Lb)`` minibatch CKA with batch weights ``w_b = n_b``."""
    c, a, e, w = batch_hsics(batches_a, batches_b, kernel, threshold)
    mean = lambda v: np.tensordot(w, v, axes=1) / w.sum()  # noqa: E731
    return mean(c) / np.sqrt(mean(a)[:, None] * mean(e)[None, :])


def minibatch_stderr(
    batches_a: Sequence[Sequence[np.ndarray]], batches_b: Sequence[Sequence[np.ndarray]]
) -> np.ndarray:
    """Delta-method standard error of linear minibatch CKA, directly from per-batch values.

    ``z_b = g_c c_b + g_a a_b + g_e e_b`` with ``g`` the gradient of ``C / sqrt(A E)`` at the
    weighted means; ``Var = k/(k-1) sum_b w_b^2 (z_b - z_bar)^2 / W^2`` with the ``w^2``-weighted
    mean ``z_bar``.
    """
    c, a, e, w = batch_hsics(batches_a, batches_b)
    a, e = a[:, :, None], e[:, None, :]
    mean = lambda v: np.tensordot(w, v, axes=1) / w.sum()  # noqa: E731
    cm, am, em = mean(c), mean(a), mean(e)
    root = np.sqrt(am * em)
    z = c / root - cm / (2 * am * root) * a - cm / (2 * em * root) * e
    ww = (w**2)[:, None, None]
    z_bar = (ww * z).sum(0) / ww.sum()
    k = len(w)
    return np.sqrt(k / (k - 1) * (ww * (z - z_bar) ** 2).sum(0)) / w.sum()
