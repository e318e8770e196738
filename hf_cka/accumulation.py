"""Pieces every accumulator shares: input checks, per-layer scale exponents, constant layers.

* :func:`validated_features` turns one side's layers into float64 ``(n, d)`` tensors (the typed
  errors of :func:`hf_cka.functional.as_features` included) and :func:`check_finite_layers`
  names the layer and batch of a NaN or Inf;
* the scale: CKA is invariant to rescaling a layer, but the high powers of the features that the
  accumulators' states hold overflow or underflow float64 for features near ``1e78`` or
  ``1e-90``. Each layer is multiplied by ``2^-e`` (exact in binary floating point), with ``e``
  the multiple of :data:`SCALE_STEP` nearest to ``log2 max|x|`` of the first batch
  (:func:`scale_exponents`), kept for the whole run; :func:`exponent_header` and
  :func:`common_exponents` let processes agree on common exponents inside an all-reduce;
* :func:`u_centred_with_probes` gives a batch's U-centred Grams with the probes of both checks
  (a :class:`BatchSide` of the minibatch accumulator);
* :func:`nan_constant_layers` turns the cells of layers constant over the data into NaN;
* :class:`SidedAccumulator`, the base of the accumulators: their named layers and ``update``;
* :class:`Accumulator`, the contract every accumulator keeps (re-exported by :mod:`hf_cka.metric`),
  with :func:`check_sides` and :func:`compute_quietly`.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from typing_extensions import Self

from .errors import (
    ConstantLayerWarning,
    InvalidInputError,
    NonFiniteActivationError,
    ShapeMismatchError,
)
from .functional import as_features, scale_exponent, u_center_gram

# A layer whose centred Gram energy is below this fraction of its raw Gram energy is constant
# over the data up to float64 rounding: its CKA is undefined (NaN), never divided by an epsilon.
CONSTANT_RTOL = 1e-20

# Per-layer scale exponents are multiples of this step: features of ordinary magnitude keep
# exponent 0 (no rescaling at all), and processes of a distributed run nearly always agree.
SCALE_STEP = 64

Features = Sequence[torch.Tensor]  # one side of a batch: one ``(n, d)`` tensor per layer


def constant_layers(hsic_self: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Per layer: whether its self HSIC is at most :data:`CONSTANT_RTOL` of its raw Gram energy
    (the layer is constant over the data up to float64 rounding)."""
    return hsic_self <= CONSTANT_RTOL * raw.abs()


def nan_constant_layers(
    hsic_self: torch.Tensor, raw: torch.Tensor, names: Sequence[str]
) -> torch.Tensor:
    """``hsic_self`` with NaN for layers that are constant over the data (one warning)."""
    constant = constant_layers(hsic_self, raw)
    if constant.any():
        listed = ", ".join(f"'{names[i]}'" for i in constant.nonzero().flatten().tolist())
        warnings.warn(
            f"layer(s) {listed} are constant over the data (zero variance): their CKA is "
            "undefined and reported as NaN",
            ConstantLayerWarning,
            stacklevel=3,
        )
    return torch.where(constant, torch.full_like(hsic_self, float("nan")), hsic_self)


def scale_exponents(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per layer: the multiple of :data:`SCALE_STEP` nearest to ``log2 max|x|`` (float64 ``(L,)``).

    Computed from the largest absolute entry, never from a norm, so that it cannot overflow.
    Non-finite features give 0 here and are refused by the finiteness check that follows.
    """
    max_abs = torch.stack([x.detach().abs().amax().to(torch.float64) for x in features])
    exponents = scale_exponent(torch.where(torch.isfinite(max_abs), max_abs, 0.0))
    return (SCALE_STEP * torch.round(exponents / SCALE_STEP)).cpu()


def exponent_header(exponents: torch.Tensor, has_data: bool) -> torch.Tensor:
    """``[w e, w e^2, w]`` (``w`` = 1 when this process has data): summed over processes, it
    tells :func:`common_exponents` the mean exponents and whether all processes agree."""
    weight = 1.0 if has_data else 0.0
    exponents = exponents.to(torch.float64).cpu()
    return torch.cat([weight * exponents, weight * exponents**2, torch.tensor([weight])])


def common_exponents(summed_header: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """From the sum over processes of :func:`exponent_header`: the common exponents (their mean,
    rounded to a multiple of :data:`SCALE_STEP`; ``None`` when no process has data) and whether
    every process with data already has them (``count * sum e^2 == (sum e)^2``, exact for
    these integers)."""
    summed_header = summed_header.to(torch.float64).cpu()
    size = (summed_header.numel() - 1) // 2
    total, squares, count = summed_header[:size], summed_header[size:-1], summed_header[-1]
    if count == 0:
        return None, True
    agreed = bool((squares * count == total * total).all())
    return SCALE_STEP * torch.round(total / count / SCALE_STEP), agreed


def validated_features(
    features: Sequence[torch.Tensor], num_layers: int, side: str
) -> list[torch.Tensor]:
    """One side's features as float64 ``(n, d)`` tensors on the first layer's device (their
    finiteness is checked by the accumulators, after scaling, where it costs least).

    Raises:
        ShapeMismatchError: not one tensor per layer, or layers with different sample counts.
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
    return [as_features(feats).to(device) for feats in features]


def scaled_features(
    features: Sequence[torch.Tensor], exponents: torch.Tensor
) -> list[torch.Tensor]:
    """Each layer's features times ``2^-e`` for its exponent ``e`` (exact; 0 is a no-op).

    The factor is applied as two exact powers of two (``2^-e`` alone can leave the float64
    range) computed on the features' device, so no exponent is read back to the host.
    """
    e = exponents.to(torch.float64)
    half = torch.floor(e / 2)
    factors = torch.stack((torch.exp2(-half), torch.exp2(half - e))).to(features[0].device)
    return [x * factors[0, i] * factors[1, i] for i, x in enumerate(features)]


def check_finite_layers(
    per_layer: torch.Tensor,
    names: Sequence[str],
    batch_index: int,
    features: Sequence[torch.Tensor],
    exponents: torch.Tensor,
) -> None:
    """Raise for the first layer whose value in ``per_layer`` (a sum over its scaled
    activations, or their Gram diagonal) is NaN or Inf.

    A non-finite activation makes it so -- or finite ``features`` (unscaled) that are so much
    larger than the first batch's that, scaled by ``2^-exponents``, they leave the float64 range;
    the message says which.
    """
    finite = torch.isfinite(per_layer.reshape(len(names), -1)).all(dim=1)
    if bool(finite.all()):
        return
    index = int((~finite).nonzero()[0])
    name, values = names[index], features[index]
    if bool(torch.isfinite(values).all()):
        largest = float(values.abs().max())
        raise NonFiniteActivationError(
            f"layer '{name}' has activations up to {largest:.3g} in batch {batch_index}, far "
            f"beyond the scale fixed by the first batch (2^{int(exponents[index])}): their "
            "squares leave the float64 range; feed batches of comparable magnitude (or call "
            "reset() and start with such a batch)"
        )
    raise NonFiniteActivationError(
        f"layer '{name}' produced NaN or Inf activations in batch {batch_index}; "
        "check the inputs and the model's dtype (float16 overflows easily: load the "
        "model in float32 or bfloat16)"
    )


class BatchSide(NamedTuple):
    """One side of a minibatch: its layer names, the values the finiteness check names (features
    or squared distances), their scale exponents, and its U-centred Grams with their probes."""

    names: list[str]
    values: list[torch.Tensor]
    exponents: torch.Tensor
    centred: tuple[torch.Tensor, torch.Tensor]


def u_centred_with_probes(k: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``U(K)`` of ``(L, n, n)`` Gram matrices and their ``(2, L)`` probes: the raw off-diagonal
    energies ``sum_{i != j} K_ij^2`` (the scale a constant layer is judged against, see
    :func:`constant_layers`) and a finiteness probe.

    A NaN or Inf activation of sample ``i`` reaches the linear ``K_ii = ||x_i||^2``, so the
    probe is the Gram trace; an RBF kernel has ``K_ii = 1`` whatever the distances, so there
    the probe is the sum of the whole Gram matrix. Nothing is read back to the host here.
    """
    diagonal = k.diagonal(dim1=-2, dim2=-1)
    probe = diagonal.sum(-1) if kernel == "linear" else k.sum(dim=(-2, -1))
    energy = (k * k).sum(dim=(-2, -1)) - (diagonal**2).sum(-1)
    return u_center_gram(k), torch.stack((energy, probe))


def check_same_samples(n_a: int, n_b: int) -> None:
    """Both sides of a batch must hold the same samples."""
    if n_a != n_b:
        raise ShapeMismatchError(
            f"model A gave {n_a} samples in this batch and model B {n_b}; both sides must "
            "describe the same samples"
        )


class SidedAccumulator(abc.ABC):
    """The base of the accumulators: ``La`` named layers of side A and ``Lb`` of side B (side A
    again when ``num_layers_b`` is None: self-similarity), and the public :meth:`update`, which
    checks the sides and names the batch before the subclass adds it (``_add``).

    Layer names default to ``A[i]``/``B[j]``; side B's mirror side A's for self-similarity.
    """

    def __init__(
        self,
        num_layers_a: int,
        num_layers_b: int | None = None,
        layer_names_a: Sequence[str] | None = None,
        layer_names_b: Sequence[str] | None = None,
    ) -> None:
        if num_layers_a < 1 or (num_layers_b is not None and num_layers_b < 1):
            raise InvalidInputError(
                f"expected at least one layer on each side, got {num_layers_a} and {num_layers_b}"
            )
        self.self_similarity = num_layers_b is None
        self.num_layers_a = num_layers_a
        self.num_layers_b = num_layers_a if num_layers_b is None else num_layers_b
        self.layer_names_a = list(layer_names_a or [f"A[{i}]" for i in range(num_layers_a)])
        default_b = self.layer_names_a if num_layers_b is None else None
        self.layer_names_b = list(
            layer_names_b or default_b or [f"B[{j}]" for j in range(self.num_layers_b)]
        )

    @property
    @abc.abstractmethod
    def n_batches(self) -> int:
        """Number of batches accumulated so far (all processes after ``sync``)."""

    def update(
        self,
        features_a: Features,
        features_b: Features | None = None,
        *,
        batch_index: int | None = None,
    ) -> None:
        """Add one batch: one ``(n, d)`` tensor per layer, the same ``n`` samples on both sides
        (no ``features_b`` for self-similarity).

        ``batch_index`` names the batch in error messages (default: the count so far).

        Raises:
            InvalidInputError: ``features_b`` given for self-similarity, or missing otherwise.
            ShapeMismatchError: wrong number of layers (or widths), or differing sample counts.
            NonFiniteActivationError: a feature tensor holds NaN or Inf (the CKA accumulators).
            BatchTooSmallError: ``n < 4`` for :class:`~hf_cka.metric.MinibatchCKA`.
            MemoryBudgetError: the exact estimator's states would exceed ``max_bytes`` (and
                ``FullDataMemoryError`` the held features of a full-data measure).
        """
        check_sides(self, features_b)
        self._add(features_a, features_b, self.n_batches if batch_index is None else batch_index)

    @abc.abstractmethod
    def _add(self, features_a: Features, features_b: Features | None, batch_index: int) -> None:
        """Add one batch whose sides :meth:`update` checked (``batch_index`` for messages)."""

    def _require_batches(self, minimum: int) -> None:
        if self.n_batches < minimum:
            raise InvalidInputError(
                f"expected at least {minimum} accumulated batch(es), got {self.n_batches}; "
                "call update() with more data first"
            )

    def _check_mergeable(self, other: SidedAccumulator) -> None:
        """``other`` must have the same layer counts and sides."""
        if (other.num_layers_a, other.num_layers_b, other.self_similarity) != (
            self.num_layers_a, self.num_layers_b, self.self_similarity
        ):  # fmt: skip
            raise ShapeMismatchError(
                f"cannot merge a {other.num_layers_a}x{other.num_layers_b} accumulator into a "
                f"{self.num_layers_a}x{self.num_layers_b} one"
            )


@runtime_checkable
class Accumulator(Protocol):
    """The contract of every CKA accumulator (:class:`~hf_cka.metric.MinibatchCKA`,
    :class:`~hf_cka.streaming.StreamingLinearCKA`), as the runner, checkpoints and
    :mod:`~hf_cka.statistics` use them.

    ``update`` adds one batch (one ``(n, d)`` tensor per layer and side); ``compute`` returns the
    ``(La, Lb)`` float64 CKA matrix; the states are sums over batches, so ``merge`` (two
    accumulators) and ``sync`` (all processes, through a sum all-reduce) give what sequential
    updates over all the batches give; ``state_dict``/``load_state_dict`` round-trip them;
    ``reset`` forgets every batch.
    """

    self_similarity: bool
    num_layers_a: int
    num_layers_b: int
    layer_names_a: list[str]
    layer_names_b: list[str]

    @property
    def n_batches(self) -> int: ...

    @property
    def n_samples(self) -> int: ...

    def update(
        self,
        features_a: Sequence[torch.Tensor],
        features_b: Sequence[torch.Tensor] | None = None,
        *,
        batch_index: int | None = None,
    ) -> None: ...

    def compute(self) -> torch.Tensor: ...

    def reset(self) -> None: ...

    def merge(self, other: Self) -> Self: ...

    def sync(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None: ...


class StderrAccumulator(Accumulator, Protocol):
    """An :class:`Accumulator` that also gives per-cell standard errors (``compute_stderr``)."""

    def compute_stderr(self) -> torch.Tensor: ...


def compute_quietly(accumulator: Accumulator) -> torch.Tensor:
    """``accumulator.compute()`` without the constant-layer warning, for per-batch progress
    callbacks (the final result still warns once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantLayerWarning)
        return accumulator.compute()


def check_sides(accumulator: SidedAccumulator, features_b: object) -> None:
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
