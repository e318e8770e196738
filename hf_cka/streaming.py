"""Exact full-data linear CKA streamed batch by batch, and the choice of accumulator.

:class:`StreamingLinearCKA` gives the same numbers as ``functional.cka(X, Y)`` (Kornblith et al.
2019, biased HSIC) or ``functional.cka(X, Y, debiased=True)`` (unbiased HSIC, Song et al. 2012)
on the concatenation of all batches, without ever holding the ``(n, n)`` Gram matrices: it keeps
float64 sufficient statistics whose size depends on the layer widths only. For one layer pair with
features ``x_i`` (width ``p``) and ``y_i`` (width ``q``), ``K = X X^T``, ``L = Y Y^T``, ``K~`` the
Gram matrix with a zeroed diagonal, ``s_x = sum_i x_i``, ``a_i = ||x_i||^2``, ``b_i = ||y_i||^2``:

* ``tr(K~ L~) = ||X^T Y||_F^2 - sum_i a_i b_i``,
* ``1^T K~ 1 = ||s_x||^2 - sum_i a_i``,
* ``1^T K~ L~ 1 = sum_i (x_i.s_x - a_i)(y_i.s_y - b_i)
  = s_x^T (X^T Y) s_y - s_x.(sum_i b_i x_i) - s_y.(sum_i a_i y_i) + sum_i a_i b_i``,
* ``HSIC_u = [tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~L~ 1] / (n(n-3))``,
* ``HSIC_b = ||X_c^T Y_c||_F^2 / (n-1)^2`` with ``X_c^T Y_c = X^T Y - s_x s_y^T / n``.

The self terms ``HSIC(K, K)`` take ``y = x``: they need the per-layer ``X^T X``, ``s_x``,
``sum_i a_i``, ``sum_i a_i^2`` and ``sum_i a_i x_i``. The states are therefore, with ``P`` and
``Q`` the summed widths of the ``La`` and ``Lb`` layers (all layers of a side side by side):
``X^T Y`` ``(P, Q)`` (every layer pair at once: one matmul per batch), ``sum_i x_i b_i^T``
``(P, Lb)``, ``sum_i y_i a_i^T`` ``(Q, La)``, ``sum_i a_i b_i^T`` ``(La, Lb)``, and per side the
diagonal blocks ``X_l^T X_l`` (one matmul per layer), ``s_x``, ``sum a``, ``sum a^2``,
``sum a_i x_i``. For self-similarity (``num_layers_b=None``) side B is side A and ``X^T Y`` is
the ``(P, P)`` matrix ``X^T X``. Memory is ``O(P Q)`` (see :func:`estimate_bytes`); each batch
costs ``O(n P Q)``.

The sums and their re-expression at another shift or scale (``merge``, ``sync``) live in the
base class :class:`~hf_cka.moments.ShiftedMoments`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from .accumulation import (
    Features,
    check_finite_layers,
    check_same_samples,
    nan_constant_layers,
    scale_exponents,
    scaled_features,
    validated_features,
)
from .errors import BatchTooSmallError, EstimatorWarning, InvalidInputError, ShapeMismatchError
from .fulldata import FullDataMeasure
from .functional import Kernel
from .measures import Measure
from .metric import MinibatchCKA
from .moments import ShiftedMoments, estimate_bytes, gram_blocks

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "StreamingLinearCKA",
    "biased_dimension_warning",
    "estimate_bytes",
    "new_accumulator",
]

Estimator = Literal["minibatch", "linear", "debiased"]
ESTIMATORS: tuple[str, ...] = ("minibatch", "linear", "debiased")


def biased_dimension_warning(n: int, dims: Sequence[int], *, stacklevel: int = 2) -> None:
    """Warn (:class:`EstimatorWarning`) when biased CKA is used with fewer samples than features.

    With ``n < d`` the biased HSIC is dominated by the Gram diagonal and CKA is inflated towards 1
    even for independent representations (Murphy et al. 2024): Gaussian noise with ``n = 100``
    and ``d = 1000`` scores about 0.9.
    """
    width = max(dims, default=0)
    if n < width:
        warnings.warn(
            f"biased linear CKA with n={n} samples and layers of up to d={width} features is "
            "inflated towards 1 when n < d (independent data can score ~0.9); use the debiased "
            "estimator (estimator='debiased' or 'minibatch') or more samples, and compare with "
            "permutation_null()",
            EstimatorWarning,
            stacklevel=stacklevel,
        )


class StreamingLinearCKA(ShiftedMoments):
    """Exact full-data linear CKA (biased or debiased) accumulated batch by batch.

    Same interface as :class:`~hf_cka.metric.MinibatchCKA` (``update``, ``compute``, ``reset``,
    ``merge``, ``sync``, ``state_dict``/``load_state_dict``, ``n_samples``, ``n_batches``); the
    result equals ``functional.cka`` on all samples concatenated, whatever the batching. There is
    no ``compute_stderr``: batches are not exchangeable pieces of this estimator.

    The states are allocated when the layer widths are known: at construction when ``dims_a``
    (and ``dims_b``) are given, else at the first ``update``, on the device of its features.
    Pass the widths when using ``sync`` so that a process that saw no batch can take part.

    Args:
        num_layers_a: number of layers on side A.
        num_layers_b: number of layers on side B; ``None`` means self-similarity of side A.
        debiased: use the unbiased HSIC (``functional.cka(..., debiased=True)``); needs
            ``n >= 4`` samples in total. The default is the biased HSIC of Kornblith et al.
        layer_names_a: optional names used in messages.
        layer_names_b: optional names used in messages.
        max_bytes: memory budget; :class:`MemoryBudgetError` is raised before allocating states
            that :func:`estimate_bytes` says exceed it. ``None``: no limit.
        dims_a: optional widths of the A layers (allocates and checks the budget now).
        dims_b: optional widths of the B layers.
    """

    # ----------------------------------------------------------------------------- update
    def _add(self, features_a: Features, features_b: Features | None, batch_index: int) -> None:
        """Add one batch (``n >= 1`` samples); the first reveals the widths when not given."""
        first = self.n_samples == 0  # the first batch fixes the scale exponents of the run
        x, dims_a, exps_a = self._concat(features_a, "a", first, batch_index)
        y, dims_b, exps_b = (
            (x, None, exps_a)
            if features_b is None
            else self._concat(features_b, "b", first, batch_index)
        )
        check_same_samples(x.shape[0], y.shape[0])
        if not self.states:
            self._allocate(dims_a, dims_b, x.device)
        if (dims_a, dims_b or dims_a) != (self.dims_a, self.dims_b):
            raise ShapeMismatchError(
                f"layer widths changed from {self.dims_a} x {self.dims_b} to {dims_a} x "
                f"{dims_b or dims_a}; every batch must come from the same layers"
            )
        x, y = x.to(self._buffer.device), y.to(self._buffer.device)
        if first:  # the reference shift: this first batch's mean (scaled)
            self.exponents_a.copy_(exps_a)
            self.exponents_b.copy_(exps_b)
            self.shift_a.copy_(x.mean(0))
            self.shift_b.copy_(y.mean(0))
        self._accumulate(x - self.shift_a, None if features_b is None else y - self.shift_b)

    def _concat(
        self, features: Sequence[torch.Tensor], side: str, first: bool, batch_index: int
    ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """The scaled layers of one side side by side as float64 ``(n, P)``, their widths and
        their scale exponents (this batch's when ``first``, else the run's)."""
        count, names = (
            (self.num_layers_a, self.layer_names_a)
            if side == "a"
            else (self.num_layers_b, self.layer_names_b)
        )
        feats = validated_features(features, count, side.upper())
        exponents = scale_exponents(feats) if first else getattr(self, f"exponents_{side}")
        scaled = scaled_features(feats, exponents)
        # sum_i ||x_i||^4, the highest moment kept: NaN or Inf when any activation is, or when
        # activations far larger than the first batch's leave the float64 range
        quartic = torch.stack([x.square().sum(1).square().sum() for x in scaled])
        check_finite_layers(quartic, names, batch_index, feats, exponents)
        return torch.cat(scaled, dim=1), [f.shape[1] for f in feats], exponents

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Add the moments of shifted features ``x (n, P)`` and ``y (n, Q)`` (None: y = x)."""
        s = self.states
        xy = {"a": x, "b": x if y is None else y}
        norms = {"a": (x * x) @ self._segments["a"][0]}  # per-layer squared norms (n, L)
        norms["b"] = norms["a"] if y is None else (y * y) @ self._segments["b"][0]
        s["cross"].addmm_(x.T, xy["b"])
        s["cross_sq_ab"].addmm_(x.T, norms["b"])
        s["sq_sq"].addmm_(norms["a"].T, norms["b"])
        if y is not None:
            s["cross_sq_ba"].addmm_(y.T, norms["a"])
        for side, _ in self._sides():
            v, sq, (_, layer_of, slices) = xy[side], norms[side], self._segments[side]
            s[f"sum_{side}"] += v.sum(0)
            s[f"sq_{side}"] += sq.sum(0)
            s[f"self_sq_{side}"] += (v * sq[:, layer_of]).sum(0)
            s[f"quartic_{side}"] += (sq * sq).sum(0)
            for block, cols in zip(gram_blocks(s[f"gram_{side}"], slices), slices, strict=True):
                block.addmm_(v[:, cols].T, v[:, cols])
        s["n_samples"] += x.shape[0]
        s["n_batches"] += 1

    # ----------------------------------------------------------------------------- compute
    def compute(self) -> torch.Tensor:
        """The ``(La, Lb)`` float64 CKA matrix on all samples seen (CPU tensor).

        Cells of a constant layer are NaN (one :class:`ConstantLayerWarning`); values are never
        clamped. The biased estimator warns (:class:`EstimatorWarning`) when ``n < d``.

        Raises:
            InvalidInputError: no batch yet.
            BatchTooSmallError: ``debiased=True`` with fewer than 4 samples in total.
        """
        n = self.n_samples
        if n == 0:
            raise InvalidInputError("expected at least 1 accumulated batch, got 0; call update()")
        if self.debiased and n < 4:
            raise BatchTooSmallError(
                f"the debiased estimator needs at least 4 samples in total, got {n}; feed more "
                "data or use debiased=False"
            )
        if not self.debiased:
            assert self.dims_a is not None and self.dims_b is not None  # allocated: n > 0
            biased_dimension_warning(n, self.dims_a + self.dims_b, stacklevel=3)
        self_a = self._defined_self_terms("a", self.layer_names_a)
        names_b = self.layer_names_b
        self_b = self_a if self.self_similarity else self._defined_self_terms("b", names_b)
        return (self._pair_terms() / torch.sqrt(self_a[:, None] * self_b[None, :])).cpu()

    def _defined_self_terms(self, side: str, names: list[str]) -> torch.Tensor:
        """Per layer self HSIC numerator, NaN (one warning) for layers constant over the data.

        A layer is constant when ``||X_c^T X_c||_F^2 <= CONSTANT_RTOL ||X^T X||_F^2`` (shifted
        data), the test :class:`MinibatchCKA` applies to its Gram energies.
        """
        centred, raw, hsic = self._self_terms(side)
        checked = nan_constant_layers(centred, raw, names)
        return torch.where(checked.isnan(), checked, hsic)

    def _self_terms(self, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per layer: ``||X_c^T X_c||^2``, ``||X^T X||^2`` (constancy test) and the self HSIC."""
        n = self.states["n_samples"]
        member, _, slices = self._segments["a" if self.self_similarity else side]
        total, t = self._get(f"sum_{side}"), self._get(f"self_sq_{side}")
        sq, quartic = self._get(f"sq_{side}"), self._get(f"quartic_{side}")
        blocks = gram_blocks(self._get(f"gram_{side}"), slices)
        pairs = list(zip(blocks, [total[c] for c in slices], strict=True))
        centred = torch.stack([(g - torch.outer(v, v) / n).square().sum() for g, v in pairs])
        raw = torch.stack([g.square().sum() for g in blocks])
        if not self.debiased:
            return centred, raw, centred
        s_g_s = torch.stack([v @ g @ v for g, v in pairs])
        k1 = (total * total) @ member - sq
        kk1 = s_g_s - 2 * (total * t) @ member + quartic
        return centred, raw, _hsic_u(raw - quartic, k1, k1, kk1, n)

    def _pair_terms(self) -> torch.Tensor:
        """``(La, Lb)`` numerators: ``||X_c^T Y_c||^2`` or ``n (n-3) HSIC_u`` per layer pair.

        One loop over the A layers, each vectorised over all B layers (temporaries of
        ``d_a x sum(dims_b)``).
        """
        s, n = self.states, self.states["n_samples"]
        member_b = self._segments["a" if self.self_similarity else "b"][0]
        _, _, slices_a = self._segments["a"]
        sum_a, sum_b = s["sum_a"], self._get("sum_b")
        rows = []
        for cols in slices_a:
            block, total = s["cross"][cols], sum_a[cols]
            if not self.debiased:
                rows.append((block - torch.outer(total, sum_b) / n).square().sum(0) @ member_b)
                continue
            frob = block.square().sum(0) @ member_b
            rows.append(torch.stack([frob, (total @ block * sum_b) @ member_b]))
        if not self.debiased:
            return torch.stack(rows)
        frob, s_m_s = torch.stack(rows).unbind(1)
        member_a = self._segments["a"][0]
        sq_a, sq_b, sq_sq = s["sq_a"], self._get("sq_b"), s["sq_sq"]
        k1 = (sum_a * sum_a) @ member_a - sq_a
        l1 = (sum_b * sum_b) @ member_b - sq_b
        kl1 = (
            s_m_s
            - ((sum_a[:, None] * self._get("cross_sq_ab")).T @ member_a).T
            - (sum_b[:, None] * self._get("cross_sq_ba")).T @ member_b
            + sq_sq
        )
        return _hsic_u(frob - sq_sq, k1[:, None], l1[None, :], kl1, n)


def _hsic_u(
    tr_kl: torch.Tensor, k1: torch.Tensor, l1: torch.Tensor, kl1: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """``n (n - 3) HSIC_u = tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1``."""
    return tr_kl + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1


def new_accumulator(
    estimator: Estimator,
    num_layers_a: int,
    num_layers_b: int | None = None,
    *,
    kernel: Kernel = "linear",
    threshold: float = 1.0,
    max_bytes: int | None = None,
    dims_a: Sequence[int] | None = None,
    dims_b: Sequence[int] | None = None,
    measure: Measure = "cka",
    measure_params: Mapping[str, Any] | None = None,
    **names: Sequence[str] | None,
) -> MinibatchCKA | StreamingLinearCKA | FullDataMeasure:
    """The accumulator for ``measure`` and ``estimator``: for CKA, ``"minibatch"`` (Nguyen et
    al., any kernel), or the exact full-data ``"linear"`` (biased, Kornblith et al.) and
    ``"debiased"`` linear CKA; for another measure, the :class:`~hf_cka.fulldata.FullDataMeasure`
    that holds the pooled features (``measure_params`` are its parameters).

    ``max_bytes`` bounds the exact estimators' states and the held features; ``dims_a`` and
    ``dims_b`` concern the exact estimators only (the minibatch states do not grow with the
    width); ``kernel`` and ``threshold`` the minibatch one only; ``names`` (``layer_names_a``,
    ``layer_names_b``) go to any accumulator.
    """
    if measure != "cka":
        return FullDataMeasure(
            measure, measure_params or {}, num_layers_a, num_layers_b, max_bytes=max_bytes, **names
        )
    if estimator == "minibatch":
        return MinibatchCKA(num_layers_a, num_layers_b, kernel=kernel, threshold=threshold, **names)
    if estimator not in ESTIMATORS:
        raise InvalidInputError(f"expected estimator in {ESTIMATORS}, got {estimator!r}")
    if kernel != "linear":
        raise InvalidInputError(
            f"the exact streaming estimator {estimator!r} supports kernel='linear' only, got "
            f"{kernel!r}; use estimator='minibatch' for an RBF kernel"
        )
    return StreamingLinearCKA(
        num_layers_a,
        num_layers_b,
        debiased=estimator == "debiased",
        max_bytes=max_bytes,
        dims_a=dims_a,
        dims_b=dims_b,
        **names,
    )
