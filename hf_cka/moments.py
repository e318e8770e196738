"""The float64 moment sums behind :class:`~hf_cka.streaming.StreamingLinearCKA`: their layout
in one flat buffer, saving and loading them, and combining accumulators (``merge``, ``sync``).

Numerics: uncentred moments of features with a large mean cancel catastrophically (the fourth
order terms worst). Both HSIC estimators are invariant to shifting every ``x_i`` by a constant
vector (the biased one through ``H``; the U-centering annihilates the ``x_i.c + x_j.c + c.c``
that a shift adds to ``K_ij``), so every sample is shifted by a reference vector per feature: the
mean of the first batch this accumulator saw. The shift is not summed: :meth:`merge` and
:meth:`sync` first re-express the sums at a common shift (exact polynomial identities, written in
:meth:`ShiftedMoments._rebase`), so accumulators with different first batches still combine.
Before the shift, each layer is multiplied by the power of two that
:class:`~hf_cka.metric.MinibatchCKA` uses (fixed by the first batch, exact, a no-op for features of
ordinary magnitude), so that the fourth-order moments of features near ``1e78`` or ``1e-90`` stay
inside the float64 range.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from typing_extensions import Self

from .accumulation import SidedAccumulator, common_exponents, exponent_header
from .errors import InvalidInputError, MemoryBudgetError, ShapeMismatchError, byte_size


def estimate_bytes(dims_a: Sequence[int], dims_b: Sequence[int] | None = None) -> int:
    """Peak bytes of a :class:`~hf_cka.streaming.StreamingLinearCKA` for widths ``dims_a`` x
    ``dims_b``.

    ``dims_b=None`` means self-similarity. Counts the float64 states (dominated by the
    ``sum(dims_a) x sum(dims_b)`` cross-moment), the shifts and the largest temporary of
    ``compute``; not counted: one batch of features in float64
    (``n * (sum(dims_a) + sum(dims_b)) * 8`` bytes).
    """
    dims_a = list(dims_a)
    sides = [dims_a] if dims_b is None else [dims_a, list(dims_b)]
    states = sum(math.prod(shape) for shape in state_shapes(*sides).values())
    shifts = sum(sum(dims) for dims in sides)
    temporary = 2 * max(max(dims) * sum(sides[-1]) for dims in sides)
    return 8 * (states + shifts + temporary)


def state_shapes(dims_a: list[int], dims_b: list[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of the summed states; side B's own states exist only when ``dims_b`` is given."""
    p, la = sum(dims_a), len(dims_a)
    q, lb = (p, la) if dims_b is None else (sum(dims_b), len(dims_b))
    shapes: dict[str, tuple[int, ...]] = {
        "cross": (p, q),
        "cross_sq_ab": (p, lb),
        "sq_sq": (la, lb),
        "n_samples": (),
        "n_batches": (),
    }
    if dims_b is not None:
        shapes["cross_sq_ba"] = (q, la)
    for side, dims in (("a", dims_a), ("b", dims_b)):
        if dims is not None:
            shapes[f"sum_{side}"] = shapes[f"self_sq_{side}"] = (sum(dims),)
            shapes[f"sq_{side}"] = shapes[f"quartic_{side}"] = (len(dims),)
            shapes[f"gram_{side}"] = (sum(d * d for d in dims),)
    return shapes


class ShiftedMoments(SidedAccumulator):
    """Shifted, scaled float64 moment sums of two sides' layers, and their exact algebra.

    The base of :class:`~hf_cka.streaming.StreamingLinearCKA`, which adds ``update`` and
    ``compute``; see there for the arguments (this class takes them all, ``debiased`` included,
    so that the estimator needs no constructor of its own). Holds ``states`` (views of one flat
    buffer), the per-feature ``shift_a``/``shift_b`` and the per-layer scale ``exponents_a`` and
    ``exponents_b``.
    """

    def __init__(
        self,
        num_layers_a: int,
        num_layers_b: int | None = None,
        *,
        debiased: bool = False,
        layer_names_a: Sequence[str] | None = None,
        layer_names_b: Sequence[str] | None = None,
        max_bytes: int | None = None,
        dims_a: Sequence[int] | None = None,
        dims_b: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_layers_a, num_layers_b, layer_names_a, layer_names_b)
        self.debiased = debiased  # read by the estimator (``compute``) only
        self.max_bytes = max_bytes
        self.dims_a: list[int] | None = None
        self.dims_b: list[int] | None = None
        self.states: dict[str, torch.Tensor] = {}
        if dims_a is not None:
            self._allocate(list(dims_a), None if dims_b is None else list(dims_b), "cpu")

    # ----------------------------------------------------------------------------- layout
    def _allocate(
        self, dims_a: list[int], dims_b: list[int] | None, device: torch.device | str
    ) -> None:
        """Check the budget, then create the zeroed states as views of one flat buffer."""
        if self.self_similarity:
            dims_b = None
        elif dims_b is None:
            raise InvalidInputError(f"expected dims_b for {self.num_layers_b} layers, got None")
        sides = ((dims_a, self.num_layers_a, "A"), (dims_b, self.num_layers_b, "B"))
        for dims, count, side in sides:
            if dims is not None and len(dims) != count:
                raise ShapeMismatchError(f"expected {count} widths for side {side}, got {dims}")
        needed = estimate_bytes(dims_a, dims_b)
        if self.max_bytes is not None and needed > self.max_bytes:
            raise MemoryBudgetError(
                f"the exact streaming CKA estimator needs {byte_size(needed)} for "
                f"{self.num_layers_a}x{self.num_layers_b} layers (widths {sum(dims_a)} x "
                f"{sum(dims_a if dims_b is None else dims_b)} in total: one float64 cross-moment "
                f"per layer pair), but max_bytes allows {byte_size(self.max_bytes)}; select "
                "fewer layers, or use estimator='minibatch' whose memory does not grow with width"
            )
        self.dims_a, self.dims_b = dims_a, dims_a if dims_b is None else dims_b
        shapes = state_shapes(dims_a, dims_b)
        self._buffer = torch.zeros(
            sum(math.prod(s) for s in shapes.values()), dtype=torch.float64, device=device
        )
        self.states, offset = {}, 0
        for key, shape in shapes.items():
            size = math.prod(shape)
            self.states[key] = self._buffer[offset : offset + size].view(shape)
            offset += size
        self.exponents_a = torch.zeros(len(dims_a), dtype=torch.float64)
        self.exponents_b = (
            self.exponents_a if dims_b is None else self.exponents_a.new_zeros(len(dims_b))
        )
        self.shift_a = torch.zeros(sum(self.dims_a), dtype=torch.float64, device=device)
        self.shift_b = self.shift_a if dims_b is None else self.shift_a.new_zeros(sum(dims_b))
        self._segments = {side: layer_segments(dims, device) for side, dims in self._sides()}

    def _sides(self) -> list[tuple[str, list[int]]]:
        assert self.dims_a is not None and self.dims_b is not None
        return [("a", self.dims_a)] + ([] if self.self_similarity else [("b", self.dims_b)])

    def _get(self, key: str) -> torch.Tensor:
        """State ``key``, where side B and ``cross_sq_ba`` alias side A for self-similarity."""
        if self.self_similarity and key == "cross_sq_ba":
            key = "cross_sq_ab"
        elif self.self_similarity and key.endswith("_b"):
            key = key[:-2] + "_a"
        return self.states[key]

    @property
    def n_batches(self) -> int:
        """Number of batches accumulated so far (all processes after ``sync``)."""
        return int(self.states["n_batches"]) if self.states else 0

    @property
    def n_samples(self) -> int:
        """Number of samples accumulated so far (all processes after ``sync``)."""
        return int(self.states["n_samples"]) if self.states else 0

    def reset(self) -> None:
        """Zero every state (the layer widths and device are kept; the next batch fixes the
        scale exponents again)."""
        if self.states:
            self._buffer.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the states, the shifts, the scale exponents and the layer widths."""
        if not self.states:
            return {}
        out = {k: v.detach().cpu().clone() for k, v in self.states.items()}
        out["shift_a"], out["shift_b"] = self.shift_a.cpu().clone(), self.shift_b.cpu().clone()
        out["exponent_a"], out["exponent_b"] = self.exponents_a.clone(), self.exponents_b.clone()
        out["dims_a"], out["dims_b"] = torch.tensor(self.dims_a), torch.tensor(self.dims_b)
        return out

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the states by ``states`` (as returned by :meth:`state_dict`)."""
        if not states:
            self.states = {}
            return
        if "dims_a" not in states:
            raise ShapeMismatchError("state dict lacks 'dims_a'; was it saved by hf_cka?")
        dims_a, dims_b = states["dims_a"].tolist(), states["dims_b"].tolist()
        if self.states and (dims_a, dims_b) != (self.dims_a, self.dims_b):
            raise ShapeMismatchError(
                f"state dict holds layer widths {dims_a} x {dims_b}, this accumulator "
                f"{self.dims_a} x {self.dims_b} (a checkpoint of another layer selection?)"
            )
        device = self._buffer.device if self.states else torch.device("cpu")
        self._allocate(dims_a, None if self.self_similarity else dims_b, device)
        missing = set(self.states) - set(states)
        if missing:
            raise ShapeMismatchError(f"state dict lacks {sorted(missing)}; was it saved by hf_cka?")
        for key, value in self.states.items():
            value.copy_(states[key])
        self.shift_a.copy_(states["shift_a"])
        self.shift_b.copy_(states["shift_b"])
        # saved without exponents (before they existed): the sums are unscaled, exponent 0
        self.exponents_a.copy_(states.get("exponent_a", self.exponents_a))
        self.exponents_b.copy_(states.get("exponent_b", self.exponents_b))

    # ----------------------------------------------------------------------------- combine
    def merge(self, other: Self) -> Self:
        """Add the states of ``other`` (same layers and widths) into this accumulator; returns self.

        This accumulator's sums are first re-expressed at ``other``'s shift (``other`` is left
        untouched).
        """
        self._check_mergeable(other)
        if not other.states or other.n_samples == 0:
            return self
        if not self.states:
            self.load_state_dict(other.state_dict())
            return self
        if (other.dims_a, other.dims_b) != (self.dims_a, self.dims_b):
            raise ShapeMismatchError(
                f"cannot merge layer widths {other.dims_a} x {other.dims_b} into "
                f"{self.dims_a} x {self.dims_b}"
            )
        if not (
            torch.equal(other.exponents_a, self.exponents_a)
            and torch.equal(other.exponents_b, self.exponents_b)
        ):  # re-express both at the larger exponent of each layer (other is left untouched)
            common_a = torch.maximum(self.exponents_a, other.exponents_a)
            common_b = torch.maximum(self.exponents_b, other.exponents_b)
            other = other._copy()
            other._rescale(common_a, common_b)
            self._rescale(common_a, common_b)
        device = self._buffer.device
        self._rebase(other.shift_a.to(device), other.shift_b.to(device))
        self._buffer += other._buffer.to(device)
        return self

    def _copy(self) -> Self:
        """An independent accumulator holding the same states."""
        clone = copy.copy(self)  # the same settings; fresh states below
        clone.states = {}
        clone.load_state_dict(self.state_dict())
        return clone

    def _rescale(self, exponents_a: torch.Tensor, exponents_b: torch.Tensor) -> None:
        """Re-express every sum for features scaled by ``2^-exponents`` instead of the current
        exponents: with ``f = 2^(old - new)`` per layer (``f_c`` for that layer's columns), a
        state of degree ``k`` in a side's features is multiplied by ``f^k`` (exact): ``s`` and
        the shift by ``f_c``, ``sum a u`` by ``f_c^3``, ``sum a`` and the Gram blocks by ``f^2``,
        ``sum a^2`` by ``f^4``, and the cross terms by the product of both sides' factors."""
        new = {"a": exponents_a.to(torch.float64).cpu(), "b": exponents_b.to(torch.float64).cpu()}
        old = {"a": self.exponents_a, "b": self.exponents_b}
        if all(torch.equal(old[side], new[side]) for side in ("a", "b")):
            return
        device = self._buffer.device
        per_layer, per_column = {}, {}
        for side in ("a", "b"):
            layer_of = self._segments["a" if self.self_similarity else side][1]
            per_layer[side] = torch.pow(2.0, old[side] - new[side]).to(device)
            per_column[side] = per_layer[side][layer_of]
        (f_a, f_b), (c_a, c_b) = per_layer.values(), per_column.values()
        s = self.states
        s["cross"].mul_(torch.outer(c_a, c_b))
        s["cross_sq_ab"].mul_(torch.outer(c_a, f_b**2))
        s["sq_sq"].mul_(torch.outer(f_a**2, f_b**2))
        if not self.self_similarity:
            s["cross_sq_ba"].mul_(torch.outer(c_b, f_a**2))
        for side, dims in self._sides():
            f, c = per_layer[side], per_column[side]
            s[f"sum_{side}"].mul_(c)
            s[f"self_sq_{side}"].mul_(c**3)
            s[f"sq_{side}"].mul_(f**2)
            s[f"quartic_{side}"].mul_(f**4)
            sizes = torch.tensor([d * d for d in dims], device=device)
            s[f"gram_{side}"].mul_(torch.repeat_interleave(f**2, sizes))
        self.shift_a.mul_(c_a)
        self.exponents_a.copy_(new["a"])
        if not self.self_similarity:
            self.shift_b.mul_(c_b)
            self.exponents_b.copy_(new["b"])

    def sync(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the states across processes with TWO calls of ``all_reduce_sum``.

        The first sums the scale exponents (see :func:`~hf_cka.accumulation.exponent_header`) and
        ``[n * shift_a, n * shift_b, n]`` to agree on a common shift (the sample-weighted mean of
        the processes' shifts); every process re-expresses its sums at that shift, and the
        second call sums the flat state buffer. In the rare case where the processes' scale
        exponents differ, each re-expresses its sums at their rounded mean and the shifts are
        summed once more (three calls). ``all_reduce_sum`` receives
        a 1-D float64 tensor and returns the element-wise sum over processes.

        Raises:
            InvalidInputError: the layer widths are unknown (no batch and no ``dims_a``).
        """
        if not self.states:
            raise InvalidInputError(
                "this process has no states to sync (no batch seen and no layer widths given): "
                "pass dims_a/dims_b to StreamingLinearCKA so that every process can take part"
            )
        n = self.states["n_samples"]
        shifts = [self.shift_a] + ([] if self.self_similarity else [self.shift_b])
        weighted_shifts = lambda: torch.cat([n * v for v in shifts] + [n.reshape(1)])  # noqa: E731
        exponents = [self.exponents_a] + ([] if self.self_similarity else [self.exponents_b])
        header = exponent_header(torch.cat(exponents), self.n_samples > 0).to(self._buffer.device)
        head = all_reduce_sum(torch.cat([header, weighted_shifts()]))
        head = head.to(device=self._buffer.device, dtype=torch.float64)
        common, agreed = common_exponents(head[: header.numel()])
        head = head[header.numel() :]
        if common is None:
            return
        la = self.num_layers_a
        self._rescale(common[:la], common[:la] if self.self_similarity else common[la:])
        if not agreed:  # rare: the shifts were summed in different scales, sum them again
            head = all_reduce_sum(weighted_shifts())
            head = head.to(device=self._buffer.device, dtype=torch.float64)
        common = head[:-1] / head[-1]
        p = self.shift_a.numel()
        self._rebase(common[:p], common[:p] if self.self_similarity else common[p:])
        self._buffer.copy_(all_reduce_sum(self._buffer))

    def _rebase(self, new_shift_a: torch.Tensor, new_shift_b: torch.Tensor) -> None:
        """Re-express the sums for samples shifted by ``new_shift`` instead of the current shift.

        With ``u' = u + d`` (``d = old shift - new shift``), per layer ``c = ||d||^2``,
        ``sd = s.d``, ``a' = a + 2 u.d + c``, and the identities (side sums over samples)

            s' = s + n d,   G' = G + s d^T + d s^T + n d d^T,   sum a' = sum a + 2 sd + n c,
            sum a' u' = t + 2 G d + c s + (sum a + 2 sd + n c) d,
            sum a'^2 = sum a^2 + 4 t.d + 4 d^T G d + 2 c sum a + 4 c sd + n c^2,
            X'^T Y' = M + s_x e^T + d s_y^T + n d e^T,
            sum x' b'^T = T_xb + 2 M E_b + s_x c_b^T + d (sum b + 2 sd_b + n c_b)^T,
            sum a' b'^T = S_ab + 2 E_a^T T_xb + 2 T_ya^T E_b + 4 E_a^T M E_b + (sum a) c_b^T
                          + c_a (sum b)^T + 2 sd_a c_b^T + 2 c_a sd_b^T + n c_a c_b^T,

        where ``t = sum a u``, ``M = X^T Y``, ``T_xb = sum x b^T``, ``T_ya = sum y a^T`` and
        ``E_a`` is the ``(P, La)`` matrix holding ``d`` in each layer's block (``e``, ``E_b``
        likewise for side B). All right-hand sides use the old sums.
        """
        s, n = self.states, self.states["n_samples"]
        delta = {"a": self.shift_a - new_shift_a, "b": self.shift_b - new_shift_b}
        spread = {}  # per side: E (P, L), c (L,), sd (L,)
        for side in ("a", "b"):
            member, d = self._segments["a" if self.self_similarity else side][0], delta[side]
            total = self._get(f"sum_{side}")
            spread[side] = (member * d[:, None], (d * d) @ member, (total * d) @ member)
        (e_a, c_a, sd_a), (e_b, c_b, sd_b) = spread["a"], spread["b"]
        m, t_xb, t_ya = s["cross"], self._get("cross_sq_ab"), self._get("cross_sq_ba")
        sq_a, sq_b = self._get("sq_a"), self._get("sq_b")
        m_eb = m @ e_b
        new_sq_sq = (
            s["sq_sq"] + 2 * e_a.T @ t_xb + 2 * t_ya.T @ e_b + 4 * e_a.T @ m_eb
            + torch.outer(sq_a + 2 * sd_a, c_b) + torch.outer(c_a, sq_b + 2 * sd_b)
            + n * torch.outer(c_a, c_b)
        )  # fmt: skip
        new_t_xb = t_xb + 2 * m_eb + torch.outer(self._get("sum_a"), c_b)
        new_t_xb += torch.outer(delta["a"], sq_b + 2 * sd_b + n * c_b)
        if not self.self_similarity:
            t_ya += 2 * m.T @ e_a + torch.outer(s["sum_b"], c_a)
            t_ya += torch.outer(delta["b"], sq_a + 2 * sd_a + n * c_a)
        s["cross_sq_ab"].copy_(new_t_xb)
        s["sq_sq"].copy_(new_sq_sq)
        m.addr_(self._get("sum_a"), delta["b"]).addr_(delta["a"], self._get("sum_b"))
        m.addr_(delta["a"], delta["b"], alpha=float(n))
        for side, _ in self._sides():
            self._rebase_side(side, delta[side], *spread[side][1:])
        self.shift_a.copy_(new_shift_a)
        if not self.self_similarity:
            self.shift_b.copy_(new_shift_b)

    def _rebase_side(self, side: str, d: torch.Tensor, c: torch.Tensor, sd: torch.Tensor) -> None:
        """The per-side identities of :meth:`_rebase` (s, G, sum a, t, sum a^2)."""
        s, n = self.states, self.states["n_samples"]
        member, layer_of, slices = self._segments[side]
        total, t, sq = s[f"sum_{side}"], s[f"self_sq_{side}"], s[f"sq_{side}"]
        blocks = gram_blocks(s[f"gram_{side}"], slices)
        g_d = torch.cat([block @ d[cols] for block, cols in zip(blocks, slices, strict=True)])
        s[f"quartic_{side}"] += (
            4 * (t * d) @ member + 4 * (d * g_d) @ member + 2 * c * sq + 4 * c * sd + n * c * c
        )
        t += 2 * g_d + c[layer_of] * total + d * (sq + 2 * sd + n * c)[layer_of]
        for block, cols in zip(blocks, slices, strict=True):
            block.addr_(total[cols], d[cols]).addr_(d[cols], total[cols])
            block.addr_(d[cols], d[cols], alpha=float(n))
        sq += 2 * sd + n * c
        total += n * d


def layer_segments(
    dims: list[int], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """Layer layout of a side: 0/1 membership ``(P, L)``, layer index per column, column slices."""
    layer_of = torch.repeat_interleave(torch.arange(len(dims), device=device),
                                       torch.tensor(dims, device=device))  # fmt: skip
    member = (layer_of[:, None] == torch.arange(len(dims), device=device)).to(torch.float64)
    ends = torch.tensor(dims).cumsum(0).tolist()
    return member, layer_of, [slice(e - d, e) for d, e in zip(dims, ends, strict=True)]


def gram_blocks(flat: torch.Tensor, slices: list[slice]) -> list[torch.Tensor]:
    """Views ``(d_l, d_l)`` of the per-layer Gram blocks stored back to back in ``flat``."""
    blocks, offset = [], 0
    for cols in slices:
        d = cols.stop - cols.start
        blocks.append(flat[offset : offset + d * d].view(d, d))
        offset += d * d
    return blocks
