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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import (
    ConstantLayerWarning,
    InvalidInputError,
    NonFiniteActivationError,
    ShapeMismatchError,
)
from .functional import (
    KERNELS,
    Kernel,
    _median,
    as_features,
    center_gram,
    gram,
    u_center_gram,
)

# A layer whose U-centred Gram energy is below this fraction of its raw Gram energy is constant
# over the data up to float64 rounding: its CKA is undefined (NaN), never divided by an epsilon.
CONSTANT_RTOL = 1e-20

_PAIR_STATES = ("c", "ww_c", "ww_cc", "ww_ca", "ww_ce", "ww_ae")
_A_STATES = ("a", "ww_a", "ww_aa", "raw_a")
_B_STATES = ("e", "ww_e", "ww_ee", "raw_e")
_SCALAR_STATES = ("weight", "weight_sq", "n_batches", "n_samples")


class MinibatchCKA:
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
        self.self_similarity = num_layers_b is None
        self.num_layers_a = num_layers_a
        self.num_layers_b = num_layers_a if num_layers_b is None else num_layers_b
        self.kernel = kernel
        self.threshold = threshold
        self.layer_names_a, self.layer_names_b = layer_names(
            num_layers_a, num_layers_b, layer_names_a, layer_names_b
        )
        self.reset()

    # ----------------------------------------------------------------------------- states
    def reset(self) -> None:
        """Zero every state."""
        la, lb = self.num_layers_a, self.num_layers_b
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.states: dict[str, torch.Tensor] = {
            **{k: zeros(la, lb) for k in _PAIR_STATES},
            **{k: zeros(la) for k in _A_STATES},
            **{k: zeros(lb) for k in _B_STATES},
            **{k: zeros(()) for k in _SCALAR_STATES},
        }

    @property
    def n_batches(self) -> int:
        """Number of batches accumulated so far (all processes after ``sync``)."""
        return int(self.states["n_batches"])

    @property
    def n_samples(self) -> int:
        """Number of samples accumulated so far (all processes after ``sync``)."""
        return int(self.states["n_samples"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the summable states (float64 CPU tensors), e.g. for a checkpoint."""
        return {k: v.clone() for k, v in self.states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the states by ``states`` (as returned by :meth:`state_dict`)."""
        missing = set(self.states) - set(states)
        if missing:
            raise ShapeMismatchError(f"state dict lacks {sorted(missing)}; was it saved by hf_cka?")
        for key, current in self.states.items():
            value = states[key].to(torch.float64).cpu()
            if value.shape != current.shape:
                raise ShapeMismatchError(
                    f"state '{key}' has shape {tuple(value.shape)}, expected {tuple(current.shape)}"
                    " (a checkpoint of another layer selection?)"
                )
            self.states[key] = value.clone()

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add the states of ``other`` (same layer counts) into this accumulator; returns self."""
        if (other.num_layers_a, other.num_layers_b) != (self.num_layers_a, self.num_layers_b):
            raise ShapeMismatchError(
                f"cannot merge a {other.num_layers_a}x{other.num_layers_b} accumulator into a "
                f"{self.num_layers_a}x{self.num_layers_b} one"
            )
        for key in self.states:
            self.states[key] += other.states[key]
        return self

    def sync(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the states across processes with ONE call of ``all_reduce_sum`` on a flat vector.

        ``all_reduce_sum`` receives a 1-D float64 tensor and returns the element-wise sum over
        processes (see :func:`hf_cka.distributed.all_reduce_sum`).
        """
        keys = list(self.states)
        flat = torch.cat([self.states[k].reshape(-1) for k in keys])
        summed = all_reduce_sum(flat).to(torch.float64).cpu()
        offset = 0
        for key in keys:
            size = self.states[key].numel()
            self.states[key] = summed[offset : offset + size].reshape(self.states[key].shape)
            offset += size

    # ----------------------------------------------------------------------------- update
    def update(
        self,
        features_a: Sequence[torch.Tensor],
        features_b: Sequence[torch.Tensor] | None = None,
        *,
        batch_index: int | None = None,
    ) -> None:
        """Add one batch: one ``(n, d)`` tensor per layer, the same ``n`` samples on both sides.

        ``batch_index`` names the batch in error messages (default: the count so far).

        Raises:
            BatchTooSmallError: ``n < 4`` (the unbiased HSIC is undefined).
            NonFiniteActivationError: a feature tensor holds NaN or Inf.
            ShapeMismatchError: wrong number of layers or differing sample counts.
        """
        check_sides(self, features_b)
        where = self.n_batches if batch_index is None else batch_index
        u_a = self._u_centered(features_a, self.num_layers_a, self.layer_names_a, "A", where)
        n = u_a[0].shape[-1]
        if features_b is None:
            u_b = u_a
        else:
            u_b = self._u_centered(features_b, self.num_layers_b, self.layer_names_b, "B", where)
            if u_b[0].shape[-1] != n:
                raise ShapeMismatchError(
                    f"model A gave {n} samples in this batch and model B {u_b[0].shape[-1]}; both "
                    "sides must describe the same samples"
                )
        self._accumulate(u_a, u_b, n, where)

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
        the batch adds what :meth:`update` adds for the features (to float64 rounding).
        """
        check_sides(self, distances_b)
        where = self.n_batches if batch_index is None else batch_index
        sides = [(distances_a, self.num_layers_a)]
        if distances_b is not None:
            sides.append((distances_b, self.num_layers_b))
        centred = []
        for distances, num_layers in sides:
            if distances.dim() != 3 or distances.shape[0] != num_layers:
                raise ShapeMismatchError(
                    f"expected ({num_layers}, n, n) squared distances, got {tuple(distances.shape)}"
                )
            k = gram_from_distances(distances, self.kernel, self.threshold)
            centred.append(self._centred(k))
        n = distances_a.shape[-1]
        if distances_b is not None and distances_b.shape[-1] != n:
            raise ShapeMismatchError(
                f"side A has {n} samples in this batch and side B {distances_b.shape[-1]}; both "
                "sides must describe the same samples"
            )
        self._accumulate(centred[0], centred[-1], n, where)

    def _u_centered(
        self,
        features: Sequence[torch.Tensor],
        num_layers: int,
        names: list[str],
        side: str,
        batch_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """U-centred Gram matrices ``(L, n, n)`` and per-layer ``(2, L)`` probes: the raw
        off-diagonal Gram energies and the Gram traces ``sum_i K_ii`` (a NaN or Inf activation
        of sample ``i`` reaches ``K_ii = ||x_i||^2``). Nothing is read back to the host here."""
        feats = validated_features(
            features, num_layers, names, side, batch_index, check_finite=False
        )
        return self._centred(self._grams(feats))

    @staticmethod
    def _centred(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U(K)`` of ``(L, n, n)`` Gram matrices and their ``(2, L)`` probes (raw off-diagonal
        energies and traces; see :meth:`_u_centered`)."""
        trace = k.diagonal(dim1=-2, dim2=-1).sum(-1)
        return u_center_gram(k), torch.stack((_off_diagonal_energy(k), trace))

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
        batch_index: int,
    ) -> None:
        """Check the batch and add its weighted HSIC terms and second moments to the states.

        The products run where the features are (a GPU stays busy); the HSIC terms and the
        per-layer probes come home in ONE transfer, and finiteness is checked on that CPU copy.
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
        (raw_a, trace_a), c = probes_a.view(2, la), c.view(la, lb)
        check_finite_layers(trace_a, self.layer_names_a, batch_index)
        e, (raw_e, trace_e) = (a, (raw_a, trace_a)) if same else (rest[0], rest[1].view(2, lb))
        if not same:
            check_finite_layers(trace_e, self.layer_names_b, batch_index)
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
        return torch.sqrt(k / (k - 1) * spread) / weight

    def _require_batches(self, minimum: int) -> None:
        if self.n_batches < minimum:
            raise InvalidInputError(
                f"expected at least {minimum} accumulated batch(es), got {self.n_batches}; "
                "call update() with more data first"
            )


def nan_constant_layers(
    hsic_self: torch.Tensor, raw: torch.Tensor, names: Sequence[str]
) -> torch.Tensor:
    """``hsic_self`` with NaN for layers that are constant over the data (one warning)."""
    constant = hsic_self <= CONSTANT_RTOL * raw.abs()
    if constant.any():
        listed = ", ".join(f"'{names[i]}'" for i in constant.nonzero().flatten().tolist())
        warnings.warn(
            f"layer(s) {listed} are constant over the data (zero variance): their CKA is "
            "undefined and reported as NaN",
            ConstantLayerWarning,
            stacklevel=3,
        )
    return torch.where(constant, torch.full_like(hsic_self, float("nan")), hsic_self)


def compute_quietly(accumulator: MinibatchCKA | Any) -> torch.Tensor:
    """``accumulator.compute()`` without the constant-layer warning, for per-batch progress
    callbacks (the final result still warns once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantLayerWarning)
        return accumulator.compute()


def check_sides(accumulator: MinibatchCKA | Any, features_b: object) -> None:
    """``features_b`` must be absent for a self-similarity accumulator and present otherwise."""
    name = type(accumulator).__name__
    if accumulator.self_similarity and features_b is not None:
        raise InvalidInputError(
            "this accumulator measures self-similarity (num_layers_b=None): call update() "
            f"without features_b, or create {name}(num_layers_a, num_layers_b)"
        )
    if not accumulator.self_similarity and features_b is None:
        raise InvalidInputError(
            f"expected features_b for {accumulator.num_layers_b} layers of model B, got None"
        )


def validated_features(
    features: Sequence[torch.Tensor],
    num_layers: int,
    names: Sequence[str],
    side: str,
    batch_index: int,
    *,
    check_finite: bool = True,
) -> list[torch.Tensor]:
    """One side's features as float64 ``(n, d)`` tensors on the first layer's device.

    Raises:
        ShapeMismatchError: not one tensor per layer, or layers with different sample counts.
        NonFiniteActivationError: NaN or Inf (with ``check_finite``), naming layer and batch.
    """
    if len(features) != num_layers:
        raise ShapeMismatchError(
            f"expected {num_layers} feature tensors for side {side}, got {len(features)}"
        )
    sizes = {int(f.shape[0]) for f in features}
    if len(sizes) != 1:
        raise ShapeMismatchError(
            f"every layer of side {side} must hold the same samples, got batch sizes "
            f"{sorted(sizes)}"
        )
    device = features[0].device  # layers of a model split over devices meet on the first
    out = [as_features(feats).to(device) for feats in features]
    if check_finite:
        check_finite_layers(torch.stack([x.sum() for x in out]), names, batch_index)
    return out


def check_finite_layers(per_layer: torch.Tensor, names: Sequence[str], batch_index: int) -> None:
    """Raise for the first layer whose value in ``per_layer`` (a sum over its activations, or
    its Gram diagonal) is NaN or Inf -- a non-finite activation makes it so."""
    finite = torch.isfinite(per_layer.reshape(len(names), -1)).all(dim=1)
    if not bool(finite.all()):
        name = names[int((~finite).nonzero()[0])]
        raise NonFiniteActivationError(
            f"layer '{name}' produced NaN or Inf activations in batch {batch_index}; "
            "check the inputs and the model's dtype (float16 overflows easily: load the "
            "model in float32 or bfloat16)"
        )


def layer_names(
    num_layers_a: int,
    num_layers_b: int | None,
    names_a: Sequence[str] | None = None,
    names_b: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Validated display names of both sides (``A[i]``/``B[j]`` by default; side B mirrors A
    when ``num_layers_b`` is None)."""
    if num_layers_a < 1 or (num_layers_b is not None and num_layers_b < 1):
        raise InvalidInputError(
            f"expected at least one layer on each side, got {num_layers_a} and {num_layers_b}"
        )
    names_a = list(names_a or [f"A[{i}]" for i in range(num_layers_a)])
    if num_layers_b is None:
        return names_a, list(names_b or names_a)
    return names_a, list(names_b or [f"B[{j}]" for j in range(num_layers_b)])


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
    if threshold <= 0:
        raise InvalidInputError(f"expected an RBF threshold > 0, got {threshold}")
    grams = []
    for layer in d.reshape(-1, *d.shape[-2:]):
        sigma2 = threshold**2 * _median(layer)
        grams.append(torch.ones_like(layer) if sigma2 == 0 else torch.exp(-layer / (2.0 * sigma2)))
    return torch.stack(grams).reshape(d.shape)


def _off_diagonal_energy(k: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} K_ij^2`` per Gram matrix: the scale a constant layer is judged against."""
    return (k * k).sum(dim=(-2, -1)) - (k.diagonal(dim1=-2, dim2=-1) ** 2).sum(-1)
