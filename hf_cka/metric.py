"""Minibatch CKA accumulator with summable float64 states (Nguyen et al. 2020).

For every batch ``b`` of ``n_b`` samples and every layer pair ``(i, j)`` the accumulator computes
the unbiased HSIC (Song et al. 2012) of the batch Gram matrices,

    c_bij = HSIC_u(K_bi, L_bj),   a_bi = HSIC_u(K_bi, K_bi),   e_bj = HSIC_u(L_bj, L_bj),

with all pairs at once: the U-centred Gram matrices of the ``La`` layers are flattened into an
``(La, n_b^2)`` matrix ``U_A`` (likewise ``U_B``) and ``c_b = U_A U_B^T / (n_b (n_b - 3))``.

Minibatch CKA is the ratio of weighted batch means,

    CKA_ij = C_ij / sqrt(A_i E_j),   C_ij = sum_b w_b c_bij / W,   W = sum_b w_b,

with the weight ``w_b = n_b``: batches of equal size weigh the same (Nguyen et al.), and a short
last batch counts in proportion to its size (each batch's HSIC_u is unbiased; its variance
shrinks roughly like ``1 / n_b``). Every state is a sum over batches, so two accumulators
``merge`` by addition and a distributed run ``sync``s with ONE all-reduce of one flat vector.

Standard errors use the delta method on the weighted means, treating batches as independent
draws: with ``z_b = g_c c_b + g_a a_b + g_e e_b`` (``g`` the gradient of ``C / sqrt(A E)``),

    Var(CKA) ~ k / (k - 1) * sum_b w_b^2 (z_b - z_bar)^2 / W^2,
    z_bar = sum_b w_b^2 z_b / sum_b w_b^2,

expanded into the summable second moments ``sum_b w_b^2 c_b^2``, ``sum_b w_b^2 c_b a_b``, ...
(``k`` is the number of batches; at least 2 are needed).

Scale: the states hold fourth and eighth powers of the features, so each layer is first
multiplied by a power of two fixed by the FIRST batch (see :mod:`hf_cka.accumulation`): exact,
the same for every batch (the estimator and its weights are unchanged), and a no-op for features
of ordinary magnitude. ``merge`` and ``sync`` re-express states of differing exponents at a common
one (exact powers of two again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .accumulation import (
    Accumulator,
    BatchSide,
    Features,
    SidedAccumulator,
    StderrAccumulator,
    check_finite_layers,
    check_same_samples,
    check_sides,
    common_exponents,
    compute_quietly,
    constant_layers,
    exponent_header,
    nan_constant_layers,
    scale_exponents,
    scaled_features,
    u_centred_with_probes,
    validated_features,
)
from .errors import (
    InvalidInputError,
    ShapeMismatchError,
)
from .functional import KERNELS, Kernel, check_threshold, gram, gram_from_distances

__all__ = [
    "Accumulator",
    "MinibatchCKA",
    "StderrAccumulator",
    "check_sides",
    "compute_quietly",
]  # the accumulator contract lives in accumulation.py, beside the other shared pieces

_PAIR_STATES = ("c", "ww_c", "ww_cc", "ww_ca", "ww_ce", "ww_ae")
_A_STATES = ("a", "ww_a", "ww_aa", "raw_a")
_B_STATES = ("e", "ww_e", "ww_ee", "raw_e")
_SCALAR_STATES = ("weight", "weight_sq", "n_batches", "n_samples")
# degree of each state in the Gram matrices of side A and side B (a Gram matrix scales like the
# square of its features for the linear kernel, and not at all for the RBF kernel)
_DEGREES = {
    "c": (1, 1), "ww_c": (1, 1), "ww_cc": (2, 2), "ww_ca": (3, 1), "ww_ce": (1, 3),
    "ww_ae": (2, 2), "a": (2, 0), "ww_a": (2, 0), "ww_aa": (4, 0), "raw_a": (2, 0),
    "e": (0, 2), "ww_e": (0, 2), "ww_ee": (0, 4), "raw_e": (0, 2),
}  # fmt: skip


class MinibatchCKA(SidedAccumulator):
    """Accumulates minibatch CKA between ``La`` layers of model A and ``Lb`` layers of model B.

    Args:
        num_layers_a: number of layers on side A.
        num_layers_b: number of layers on side B; ``None`` means self-similarity of side A
            (``update`` then takes no ``features_b``).
        kernel: ``"linear"`` (default) or ``"rbf"``; the RBF bandwidth is set per batch as
            ``sigma^2 = threshold^2 * median`` of that batch's squared pairwise distances.
        threshold: RBF bandwidth factor.
        layer_names_a: optional names used in error messages.
        layer_names_b: optional names used in error messages.

    Example:
        >>> import torch
        >>> from hf_cka import MinibatchCKA
        >>> gen = torch.Generator().manual_seed(0)
        >>> metric = MinibatchCKA(2, 1)  # 2 layers of model A against 1 layer of model B
        >>> for _ in range(10):
        ...     x = torch.randn(64, 8, generator=gen)
        ...     noise = torch.randn(64, 8, generator=gen)
        ...     metric.update([x, noise], [2.0 * x])
        >>> matrix = metric.compute()  # (2, 1): the shared layer, then the unrelated one
        >>> print(f"{matrix[0, 0]:.4f}", abs(float(matrix[1, 0])) < 0.05)
        1.0000 True
        >>> metric.n_batches, tuple(metric.compute_stderr().shape)
        (10, (2, 1))
    """

    def __init__(
        self,
        num_layers_a: int,
        num_layers_b: int | None = None,
        *,
        kernel: Kernel = "linear",
        threshold: float = 1.0,
        layer_names_a: Sequence[str] | None = None,
        layer_names_b: Sequence[str] | None = None,
    ) -> None:
        if kernel not in KERNELS:
            raise InvalidInputError(f"expected kernel in {KERNELS}, got {kernel!r}")
        super().__init__(num_layers_a, num_layers_b, layer_names_a, layer_names_b)
        self.kernel = kernel
        self.threshold = check_threshold(threshold) if kernel == "rbf" else threshold
        self.reset()

    # ----------------------------------------------------------------------------- states
    def reset(self) -> None:
        """Zero every state (the scale exponents are fixed again by the next batch)."""
        la, lb = self.num_layers_a, self.num_layers_b
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.states: dict[str, torch.Tensor] = {
            **{k: zeros(la, lb) for k in _PAIR_STATES},
            **{k: zeros(la) for k in _A_STATES},
            **{k: zeros(lb) for k in _B_STATES},
            **{k: zeros(()) for k in _SCALAR_STATES},
        }
        # per-layer scale exponents (features are multiplied by 2^-e); meaningful once a batch
        # was accumulated. Side B is side A for self-similarity.
        self.exponents_a = zeros(la)
        self.exponents_b = self.exponents_a if self.self_similarity else zeros(lb)
        self._scale_fixed = False  # a Python flag: update reads no tensor to decide

    @property
    def n_batches(self) -> int:
        """Number of batches accumulated so far (all processes after ``sync``)."""
        return int(self.states["n_batches"])

    @property
    def n_samples(self) -> int:
        """Number of samples accumulated so far (all processes after ``sync``)."""
        return int(self.states["n_samples"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the summable states and of the scale exponents (float64 CPU tensors)."""
        out = {k: v.clone() for k, v in self.states.items()}
        out["exponent_a"], out["exponent_b"] = self.exponents_a.clone(), self.exponents_b.clone()
        return out

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the states by ``states`` (as returned by :meth:`state_dict`).

        The scale exponents default to 0 (unscaled) for state dicts saved without them.
        """
        missing = set(self.states) - set(states)
        if missing:
            raise ShapeMismatchError(f"state dict lacks {sorted(missing)}; was it saved by hf_cka?")
        exponents = {"exponent_a": self.exponents_a, "exponent_b": self.exponents_b}
        loaded = {}
        for key, current in [*self.states.items(), *exponents.items()]:
            value = states.get(key, torch.zeros_like(current)).to(torch.float64).cpu()
            if value.shape != current.shape:
                raise ShapeMismatchError(
                    f"state '{key}' has shape {tuple(value.shape)}, expected {tuple(current.shape)}"
                    " (a checkpoint of another layer selection?)"
                )
            loaded[key] = value.clone()
        self.exponents_a = loaded.pop("exponent_a")
        self.exponents_b = self.exponents_a if self.self_similarity else loaded.pop("exponent_b")
        self.states = {key: loaded[key] for key in self.states}
        self._scale_fixed = self.n_batches > 0

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add the states of ``other`` (same layer counts) into this accumulator; returns self.

        States of differing scale exponents are first re-expressed at the larger exponent of
        each layer (``other`` is left untouched).
        """
        self._check_mergeable(other)
        if other.n_batches == 0:
            return self
        if self.n_batches == 0:
            self.load_state_dict(other.state_dict())
            return self
        common_a = torch.maximum(self.exponents_a, other.exponents_a)
        common_b = torch.maximum(self.exponents_b, other.exponents_b)
        theirs = other._rescaled(common_a, common_b)
        self.states = self._rescaled(common_a, common_b)
        self._set_exponents(common_a, common_b)
        for key in self.states:
            self.states[key] += theirs[key]
        return self

    def sync(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the states across processes with ONE call of ``all_reduce_sum`` on a flat vector.

        ``all_reduce_sum`` receives a 1-D float64 tensor and returns the element-wise sum over
        processes (see :func:`hf_cka.distributed.all_reduce_sum`). The vector starts with the
        processes' scale exponents; in the rare case where they differ, every process
        re-expresses its states at their (rounded) mean and a second call sums those.
        """
        header = exponent_header(self._exponents(), self.n_batches > 0)
        summed = all_reduce_sum(torch.cat([header, self._flat()])).to(torch.float64).cpu()
        common, agreed = common_exponents(summed[: header.numel()])
        flat = summed[header.numel() :]
        if common is not None:
            la = self.num_layers_a
            common_a, common_b = common[:la], common[la:] if common.numel() > la else common[:la]
            if not agreed:
                self.states = self._rescaled(common_a, common_b)
                flat = all_reduce_sum(self._flat()).to(torch.float64).cpu()
            self._set_exponents(common_a, common_b)
        parts = flat.split([value.numel() for value in self.states.values()])
        for (key, value), part in zip(self.states.items(), parts, strict=True):
            self.states[key] = part.reshape(value.shape)
        self._scale_fixed = self.n_batches > 0

    def _flat(self) -> torch.Tensor:
        return torch.cat([value.reshape(-1) for value in self.states.values()])

    def _exponents(self) -> torch.Tensor:
        """The scale exponents of side A, then of side B unless it is side A."""
        if self.self_similarity:
            return self.exponents_a
        return torch.cat([self.exponents_a, self.exponents_b])

    def _set_exponents(self, exponents_a: torch.Tensor, exponents_b: torch.Tensor) -> None:
        self.exponents_a = exponents_a.clone()
        self.exponents_b = self.exponents_a if self.self_similarity else exponents_b.clone()
        self._scale_fixed = True

    def _rescaled(
        self, exponents_a: torch.Tensor, exponents_b: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The states re-expressed for features scaled by ``2^-exponents`` instead of the
        current exponents: each state times ``2^(g (deg_a d_a + deg_b d_b))`` (exact), with ``d``
        the exponent change, ``deg`` its degree in each side's Gram matrix (:data:`_DEGREES`)
        and ``g`` = 2 for the linear kernel, 0 for the scale-free RBF kernel."""
        power = 2.0 if self.kernel == "linear" else 0.0
        d_a = power * (self.exponents_a - exponents_a)
        d_b = power * (self.exponents_b - exponents_b)
        out = {}
        for key, value in self.states.items():
            deg_a, deg_b = _DEGREES.get(key, (0, 0))
            if key in _PAIR_STATES:
                exponent = deg_a * d_a[:, None] + deg_b * d_b[None, :]
            else:
                exponent = deg_a * d_a if key in _A_STATES else deg_b * d_b
            out[key] = value * torch.pow(2.0, exponent) if deg_a or deg_b else value.clone()
        return out

    # ----------------------------------------------------------------------------- update
    def _add(self, features_a: Features, features_b: Features | None, batch_index: int) -> None:
        first = not self._scale_fixed  # the first batch fixes the scale exponents of the run
        given = [(features_a, self.num_layers_a, self.layer_names_a, self.exponents_a, "A")]
        if features_b is not None:
            given.append((features_b, self.num_layers_b, self.layer_names_b, self.exponents_b, "B"))
        sides = []
        for features, num_layers, names, fixed, label in given:
            feats = validated_features(features, num_layers, label)
            exps = scale_exponents(feats) if first else fixed
            sides.append(BatchSide(names, feats, exps, self._u_centered(feats, exps)))
        self._add_batch(sides, batch_index, first)

    def update_from_distances(
        self,
        distances_a: torch.Tensor,
        distances_b: torch.Tensor | None = None,
        *,
        batch_index: int | None = None,
    ) -> None:
        """Add one batch from stored ``(L, n, n)`` squared distances ``D_ij = ||x_i - x_j||^2``
        of each layer's pooled features instead of the features themselves.

        The linear Gram of the column-centred features is ``-H D H / 2`` (classical scaling,
        ``H = I - 11^T / n``) and the RBF Gram is ``exp(-D / (2 threshold^2 median(D)))``, so
        the batch adds what :meth:`update` adds for the features (to float64 rounding). The
        scale exponents come from ``max sqrt(D)`` (distances scale as the features).
        """
        check_sides(self, distances_b)
        where = self.n_batches if batch_index is None else batch_index
        first = not self._scale_fixed
        given = [(distances_a, self.num_layers_a, self.layer_names_a, self.exponents_a)]
        if distances_b is not None:
            given.append((distances_b, self.num_layers_b, self.layer_names_b, self.exponents_b))
        sides = []
        for distances, num_layers, names, fixed in given:
            if distances.dim() != 3 or distances.shape[0] != num_layers:
                raise ShapeMismatchError(
                    f"expected ({num_layers}, n, n) squared distances, got {tuple(distances.shape)}"
                )
            layers = list(distances.to(torch.float64))
            exps = scale_exponents([d.sqrt() for d in layers]) if first else fixed
            scaled = torch.stack(scaled_features(layers, 2 * exps))  # D scales as x^2
            grams = gram_from_distances(scaled, self.kernel, self.threshold)
            sides.append(BatchSide(names, layers, exps, u_centred_with_probes(grams, self.kernel)))
        self._add_batch(sides, where, first)

    def _add_batch(self, sides: list[BatchSide], where: int, first: bool) -> None:
        """Accumulate one batch (``where`` its index) given by one side (self-similarity) or
        two; the first batch of the run fixes the scale exponents."""
        n = sides[0].centred[0].shape[-1]
        check_same_samples(n, sides[-1].centred[0].shape[-1])

        def check_finite(*probes: torch.Tensor) -> None:
            for probe, side in zip(probes, sides, strict=True):
                check_finite_layers(probe, side.names, where, side.values, side.exponents)

        self._accumulate(sides[0].centred, sides[-1].centred, n, check_finite)
        if first:
            self._set_exponents(sides[0].exponents, sides[-1].exponents)

    def _u_centered(
        self, feats: list[torch.Tensor], exponents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """U-centred Gram matrices ``(L, n, n)`` of the features scaled by ``2^-exponents`` and
        their ``(2, L)`` probes (:func:`~hf_cka.accumulation.u_centred_with_probes`)."""
        return u_centred_with_probes(self._grams(scaled_features(feats, exponents)), self.kernel)

    def _grams(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """``(L, n, n)`` Gram matrices of column-centred features (one batched product when the
        layers share a width and the kernel is linear).

        U-centering ignores a per-batch shift of the rows, so centring the columns first changes
        no HSIC term but keeps large-offset features from cancelling in float64.
        """
        if self.kernel == "linear" and len({x.shape[1] for x in feats}) == 1:
            x = torch.stack(feats)
            x = x - x.mean(dim=1, keepdim=True)
            return torch.bmm(x, x.transpose(1, 2))
        return torch.stack([gram(x - x.mean(dim=0), self.kernel, self.threshold) for x in feats])

    def _accumulate(
        self,
        u_a: tuple[torch.Tensor, torch.Tensor],
        u_b: tuple[torch.Tensor, torch.Tensor],
        n: int,
        check_finite: Callable[..., None],
    ) -> None:
        """Check the batch and add its weighted HSIC terms and second moments to the states.

        The products run where the features are (a GPU stays busy); the HSIC terms and the
        per-layer probes come home in ONE transfer, and ``check_finite`` checks the probes of
        each side on that CPU copy before any state changes.
        """
        (ua, probes_a), (ub, probes_b) = u_a, u_b
        scale = 1.0 / (n * (n - 3))
        la, lb = ua.shape[0], ub.shape[0]
        same = ub is ua
        flat_a = ua.reshape(la, -1)
        flat_b = flat_a if same else ub.reshape(lb, -1).to(flat_a.device)
        parts = [flat_a @ flat_b.T * scale, (flat_a * flat_a).sum(-1) * scale, probes_a]
        if not same:
            parts += [(flat_b * flat_b).sum(-1) * scale, probes_b.to(flat_a.device)]
        sums = torch.cat([part.reshape(-1) for part in parts]).cpu()
        sizes = [la * lb, la, 2 * la] + ([] if same else [lb, 2 * lb])
        c, a, probes_a, *rest = sums.split(sizes)
        (raw_a, probe_a), c = probes_a.view(2, la), c.view(la, lb)
        if same:
            check_finite(probe_a)
            e, raw_e = a, raw_a
        else:
            e, (raw_e, probe_e) = rest[0], rest[1].view(2, lb)
            check_finite(probe_a, probe_e)
        w = float(n)
        ww = w * w
        s = self.states
        s["c"] += w * c
        s["ww_c"] += ww * c
        s["ww_cc"] += ww * c * c
        s["ww_ca"] += ww * c * a[:, None]
        s["ww_ce"] += ww * c * e[None, :]
        s["ww_ae"] += ww * a[:, None] * e[None, :]
        for key, v in (("a", a), ("e", e)):
            s[key] += w * v
            s[f"ww_{key}"] += ww * v
            s[f"ww_{key}{key}"] += ww * v * v
        s["raw_a"] += w * raw_a * scale
        s["raw_e"] += w * raw_e * scale
        s["weight"] += w
        s["weight_sq"] += ww
        s["n_batches"] += 1
        s["n_samples"] += n

    # ----------------------------------------------------------------------------- compute
    def compute(self) -> torch.Tensor:
        """The ``(La, Lb)`` float64 minibatch CKA matrix ``C_ij / sqrt(A_i E_j)``.

        Cells of a constant layer are NaN (with one :class:`ConstantLayerWarning`); values are
        never clamped into ``[0, 1]``.
        """
        self._require_batches(1)
        s = self.states
        a = nan_constant_layers(s["a"], s["raw_a"], self.layer_names_a)
        e = (
            a
            if self.self_similarity
            else nan_constant_layers(s["e"], s["raw_e"], self.layer_names_b)
        )
        return s["c"] / torch.sqrt(a[:, None] * e[None, :])

    def compute_stderr(self) -> torch.Tensor:
        """Delta-method standard error ``(La, Lb)`` of each cell (see the module docstring).

        Needs at least two batches; NaN where the CKA itself is undefined.
        """
        self._require_batches(2)
        s = self.states
        weight, k = s["weight"], s["n_batches"]
        c, a, e = s["c"] / weight, s["a"][:, None] / weight, s["e"][None, :] / weight
        root = torch.sqrt(a * e)
        g_c, g_a, g_e = 1.0 / root, -c / (2.0 * a * root), -c / (2.0 * e * root)
        a_vec, e_vec = s["ww_a"][:, None], s["ww_e"][None, :]
        sum_z = g_c * s["ww_c"] + g_a * a_vec + g_e * e_vec
        sum_zz = (
            g_c**2 * s["ww_cc"]
            + g_a**2 * s["ww_aa"][:, None]
            + g_e**2 * s["ww_ee"][None, :]
            + 2 * g_c * g_a * s["ww_ca"]
            + 2 * g_c * g_e * s["ww_ce"]
            + 2 * g_a * g_e * s["ww_ae"]
        )
        # sum_b w_b^2 (z_b - z_bar)^2 with z_bar the w^2-weighted mean; rounding can make it a
        # hair negative, and a variance (unlike a CKA value) is clamped at zero.
        spread = (sum_zz - sum_z**2 / s["weight_sq"]).clamp_min(0.0)
        stderr = torch.sqrt(k / (k - 1) * spread) / weight
        # a constant layer's cells are undefined like its CKA (the RBF kernel of a constant layer
        # U-centres to rounding residues, which the formula above would turn into a number)
        undefined = constant_layers(s["a"], s["raw_a"])[:, None]
        undefined = undefined | constant_layers(s["e"], s["raw_e"])[None, :]
        return stderr.masked_fill(undefined, float("nan"))
