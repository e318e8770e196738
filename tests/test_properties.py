"""Property tests (hypothesis) of ``hf_cka.functional.cka`` and the accumulators.

Hypothesis draws the *shape* of the data (n from 4 to 300 samples, 1 to 2,000 features), its
structure (Gaussian, rank one, duplicated rows), its magnitude (10^-20 to 10^20) and a seed; the
values themselves come from a seeded ``torch.Generator``, so a failing example is reproduced
exactly from what hypothesis prints. The ``hf_cka-ci`` profile is derandomized (no example
database), so CI runs the same examples every time.

Tolerances:

* algebraic identities (symmetry, CKA(x, x) = 1, invariance to orthogonal maps, isotropic
  scaling and translation) hold in exact arithmetic; the float64 pipeline keeps them to ~1e-13,
  so 1e-9 leaves room for ill-conditioned draws without hiding a real error (a lost factor or a
  float32 step shows up at 1e-7 or above);
* low-precision inputs (float16, bfloat16, float32) are first checked to give exactly the result
  of their float64 upcast (all arithmetic is float64). Against the CKA of the original float64
  data the difference comes only from rounding the inputs: CKA is the cosine of the two centred
  Gram matrices, ``<a, b>`` for their unit-norm versions ``a`` and ``b``, so

      |CKA(x~, y~) - CKA(x, y)| = |<a~ - a, b~> + <a, b~ - b>| <= |a~ - a| + |b~ - b|

  exactly, where ``a~`` is the unit-norm centred Gram of ``x`` rounded to the dtype. ``|a~ - a|``
  is of the order of the dtype's unit roundoff (2^-8 ~ 4e-3 for bfloat16,
  2^-11 ~ 5e-4 for float16, 2^-24 ~ 6e-8 for float32) times the conditioning of the data. The
  test asserts the bound, so it adapts to ill-conditioned draws (n = 4, debiased) instead of
  using one fixed number that would be either too loose or flaky. For minibatch CKA the same
  bound holds with ``a`` the concatenation of the per-batch U-centred Grams, batch b weighted by
  ``n_b / (n_b (n_b - 3))`` as in the accumulator.

Float16 data is generated with magnitudes 10^-3 to 10^2 (beyond ~6e4 it is inf, below ~6e-5
subnormal); bfloat16, float32 and float64 data span 10^-20 to 10^20.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hf_cka import MinibatchCKA
from hf_cka.errors import ConstantLayerWarning, EstimatorWarning
from hf_cka.functional import center_gram, cka, gram, u_center_gram
from hf_cka.metric import Accumulator
from hf_cka.streaming import StreamingLinearCKA

settings.register_profile(
    "hf_cka-ci",
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CI = settings.get_profile("hf_cka-ci")

F64 = torch.float64
MAX_N, MAX_DIM, MAX_LAYER_DIM = 300, 2000, 500
STRUCTURES = ("gaussian", "rank1", "duplicated")
ESTIMATORS = [
    {"kernel": "linear", "debiased": False},
    {"kernel": "linear", "debiased": True},
    {"kernel": "rbf", "debiased": False},
    {"kernel": "rbf", "debiased": True, "threshold": 0.5},
]
LOW_PRECISION = {torch.float16: (-3, 2), torch.bfloat16: (-20, 20), torch.float32: (-20, 20)}
IDENTITY_ATOL = 1e-9
ACCUMULATORS = {
    "minibatch-linear": lambda la, lb: MinibatchCKA(la, lb),
    "minibatch-rbf": lambda la, lb: MinibatchCKA(la, lb, kernel="rbf"),
    "streaming-linear": lambda la, lb: StreamingLinearCKA(la, lb),
    "streaming-debiased": lambda la, lb: StreamingLinearCKA(la, lb, debiased=True),
}


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Spec:
    """How to build ``(n, d)`` float64 features: hypothesis prints this, not the tensor.

    ``rank1`` is ``u v^T``; ``duplicated`` tiles k >= 2 distinct rows (row i is row i mod k), so
    any 2 consecutive samples differ; values are scaled by ``10**exponent``.
    """

    n: int
    d: int
    structure: str
    exponent: int
    seed: int

    def build(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        n, d = self.n, self.d
        if self.structure == "gaussian":
            x = torch.randn(n, d, generator=gen, dtype=F64)
        elif self.structure == "rank1":
            u = torch.randn(n, 1, generator=gen, dtype=F64)
            x = u @ torch.randn(1, d, generator=gen, dtype=F64)
        else:
            k = 2 + self.seed % min(n - 1, 7)
            x = torch.randn(k, d, generator=gen, dtype=F64)[torch.arange(n) % k]
        return x * 10.0**self.exponent


def related(x: torch.Tensor, q: int, seed: int) -> torch.Tensor:
    """``(n, q)`` features partly explained by ``x``: ``x W / sqrt(d) + noise`` at x's scale."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1], q, generator=gen, dtype=F64) / math.sqrt(x.shape[1])
    return x @ w + 0.5 * x.abs().max() * torch.randn(x.shape[0], q, generator=gen, dtype=F64)


def orthogonal_map(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x Q`` for a random orthogonal ``Q`` (column permutation, sign flips and two Householder
    reflections), in O(n d) instead of the O(d^3) of a QR decomposition."""
    gen = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    signs = torch.randint(0, 2, (d,), generator=gen).to(F64) * 2 - 1
    x = x[:, torch.randperm(d, generator=gen)] * signs
    for _ in range(2):
        v = torch.randn(d, 1, generator=gen, dtype=F64)
        x = x - (2.0 / float(v.T @ v)) * (x @ v) @ v.T
    return x


def specs(
    n: st.SearchStrategy[int],
    *,
    exponents: tuple[int, int] = (-20, 20),
    max_dim: int = MAX_DIM,
) -> st.SearchStrategy[Spec]:
    """Feature specs with a drawn width, structure, magnitude and seed."""
    return st.builds(
        Spec, n, st.integers(1, max_dim), st.sampled_from(STRUCTURES),
        st.integers(*exponents), st.integers(0, 2**31 - 1),
    )  # fmt: skip


@dataclass(frozen=True)
class PairSpec:
    """``x`` and ``y`` for the same samples: y is related to x (``q`` > 0 columns) or is
    built from its own spec."""

    x: Spec
    y: Spec
    q: int

    def build(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x.build()
        return x, related(x, self.q, self.y.seed) if self.q else self.y.build()


@st.composite
def pairs(draw: st.DrawFn, exponents: tuple[int, int] = (-20, 20)) -> PairSpec:
    n = draw(st.integers(4, MAX_N))
    x, y = (draw(specs(st.just(n), exponents=exponents)) for _ in range(2))
    return PairSpec(x, y, draw(st.sampled_from([0, 1, 8, 64])))


@dataclass(frozen=True)
class LayerSpec:
    """One to three layers of features for the same samples, and their batch sizes."""

    layers: tuple[Spec, ...]
    sizes: tuple[int, ...]

    def build(self) -> list[torch.Tensor]:
        return [layer.build() for layer in self.layers]


@st.composite
def layered(draw: st.DrawFn, exponents: tuple[int, int] = (-20, 20)) -> LayerSpec:
    n = draw(st.integers(4, MAX_N))
    layers = draw(
        st.lists(
            specs(st.just(n), exponents=exponents, max_dim=MAX_LAYER_DIM), min_size=1, max_size=3
        )
    )
    size = draw(st.integers(4, n))
    sizes = [size] * (n // size)
    rest = n - sum(sizes)
    sizes = [*sizes, rest] if rest >= 4 else [*sizes[:-1], sizes[-1] + rest]  # batches of >= 4
    return LayerSpec(tuple(layers), tuple(sizes))


def median_distance_is_zero(x: torch.Tensor) -> bool:
    """Whether the RBF bandwidth (median of the n^2 squared pairwise distances) is exactly zero:
    more than half of the ordered pairs are identical rows."""
    _, counts = torch.unique(x, dim=0, return_counts=True)
    return int((counts**2).sum()) > x.shape[0] ** 2 // 2


def accumulate(
    layers: list[torch.Tensor], sizes, other=None, metric: Accumulator | None = None
) -> Accumulator:
    """``metric`` (default: a self-similarity, ``other=None``, or two-sided MinibatchCKA) fed
    batch by batch."""
    if metric is None:
        metric = MinibatchCKA(len(layers), None if other is None else len(other))
    cuts = [torch.split(f, list(sizes)) for f in layers]
    other_cuts = None if other is None else [torch.split(f, list(sizes)) for f in other]
    for b in range(len(sizes)):
        metric.update(
            [cut[b] for cut in cuts], None if other_cuts is None else [c[b] for c in other_cuts]
        )
    return metric


def assert_close(got: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=atol, equal_nan=True)


# ----------------------------------------------------------------------------- functional.cka


def undefined_bandwidth(estimator: dict, *features: torch.Tensor) -> bool:
    return estimator["kernel"] == "rbf" and any(median_distance_is_zero(f) for f in features)


@settings(CI, max_examples=50)
@given(spec=pairs(), estimator=st.sampled_from(ESTIMATORS))
def test_cka_is_finite_bounded_and_symmetric(spec: PairSpec, estimator: dict) -> None:
    x, y = spec.build()
    forward, backward = cka(x, y, **estimator), cka(y, x, **estimator)
    if undefined_bandwidth(estimator, x, y):  # a zero RBF bandwidth: the kernel is constant
        assert forward.isnan() and backward.isnan(), float(forward)
        return
    assert forward.dtype == F64 and bool(torch.isfinite(forward)), float(forward)
    low = -1.0 if estimator["debiased"] else 0.0  # a cosine; biased centred Grams are PSD
    assert low - 1e-12 <= float(forward) <= 1.0 + 1e-12
    assert abs(float(forward) - float(backward)) <= 1e-12


@settings(CI, max_examples=40)
@given(spec=specs(st.integers(4, MAX_N)), estimator=st.sampled_from(ESTIMATORS))
def test_cka_of_a_representation_with_itself_is_one(spec: Spec, estimator: dict) -> None:
    x = spec.build()
    if undefined_bandwidth(estimator, x):
        return  # covered by test_cka_is_finite_bounded_and_symmetric
    assert abs(float(cka(x, x, **estimator)) - 1.0) <= IDENTITY_ATOL


@settings(CI, max_examples=40)
@given(
    spec=pairs(),
    estimator=st.sampled_from(ESTIMATORS),
    scale_exponent=st.integers(-10, 10),
    shift=st.floats(-10, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_cka_is_invariant_to_orthogonal_maps_scaling_and_translation(
    spec: PairSpec, estimator: dict, scale_exponent: int, shift: float, seed: int
) -> None:
    x, y = spec.build()
    if undefined_bandwidth(estimator, x, y):
        return  # covered by test_cka_is_finite_bounded_and_symmetric
    gen = torch.Generator().manual_seed(seed)
    moved = orthogonal_map(x, seed) * 10.0**scale_exponent
    moved = moved + shift * moved.abs().max() * torch.randn(x.shape[1], dtype=F64, generator=gen)
    assert abs(float(cka(moved, y, **estimator)) - float(cka(x, y, **estimator))) <= 1e-9


EXTREME_SCALES = (2.0**-300, 1e-90, 1e76, 1e78, 1e160)
SCALE_RTOL = 1e-12


def assert_same_value(scaled: torch.Tensor, base: torch.Tensor) -> None:
    """Equal to ``SCALE_RTOL`` relative (both NaN where the value is undefined); the absolute
    floor of 1e-15 covers values within rounding of 0, where a relative error means nothing."""
    assert torch.equal(scaled.isnan(), base.isnan()), (scaled, base)
    defined = ~base.isnan()
    error = (scaled[defined] - base[defined]).abs()
    assert bool((error <= SCALE_RTOL * base[defined].abs() + 1e-15).all()), (scaled, base)


@settings(CI, max_examples=40)
@given(spec=pairs(), estimator=st.sampled_from(ESTIMATORS), scale=st.sampled_from(EXTREME_SCALES))
def test_cka_of_features_scaled_to_the_edges_of_float64_is_unchanged(
    spec: PairSpec, estimator: dict, scale: float
) -> None:
    """Any finite float64 input gives the value of the unscaled input (issue 13: 1e78 gave -0.0,
    1e76 and 1e-90 a NaN called constant, 1e160 a NaN/Inf error)."""
    x, y = spec.build()
    assert_same_value(cka(scale * x, y, **estimator), cka(x, y, **estimator))


@settings(CI, max_examples=30)
@given(
    spec=layered(),
    kind=st.sampled_from(sorted(ACCUMULATORS)),
    scale=st.sampled_from(EXTREME_SCALES),
)
def test_accumulators_of_features_scaled_to_the_edges_of_float64_are_unchanged(
    spec: LayerSpec, kind: str, scale: float
) -> None:
    """The per-layer power-of-two scale fixed by the first batch keeps every accumulator's
    value: side A scaled by ``scale``, side B as is."""
    layers = spec.build()
    make = lambda: ACCUMULATORS[kind](len(layers), len(layers))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantLayerWarning)
        warnings.simplefilter("ignore", EstimatorWarning)
        base = accumulate(layers, spec.sizes, layers, make()).compute()
        scaled = accumulate([scale * x for x in layers], spec.sizes, layers, make()).compute()
    assert_same_value(scaled, base)


@settings(CI, max_examples=30)
@given(
    dtype=st.sampled_from(list(LOW_PRECISION)),
    estimator=st.sampled_from(ESTIMATORS),
    data=st.data(),
)
def test_low_precision_inputs_match_their_float64_upcast_exactly(
    dtype: torch.dtype, estimator: dict, data: st.DataObject
) -> None:
    x, y = (f.to(dtype) for f in data.draw(pairs(LOW_PRECISION[dtype])).build())
    got, upcast = cka(x, y, **estimator), cka(x.to(F64), y.to(F64), **estimator)
    assert got.dtype == F64
    assert torch.equal(got, upcast) or (got.isnan() and upcast.isnan())


def centred_gram(x: torch.Tensor, debiased: bool) -> torch.Tensor:
    """The centred linear Gram whose cosine ``functional.cka`` computes (up to a scale)."""
    k = gram(x - x.mean(dim=0), "linear")
    return u_center_gram(k) if debiased else center_gram(k)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


@settings(CI, max_examples=40)
@given(dtype=st.sampled_from(list(LOW_PRECISION)), debiased=st.booleans(), data=st.data())
def test_cka_across_dtypes_within_the_rounding_bound(
    dtype: torch.dtype, debiased: bool, data: st.DataObject
) -> None:
    x, y = data.draw(pairs(LOW_PRECISION[dtype])).build()
    exact = float(cka(x, y, debiased=debiased))
    rounded = float(cka(x.to(dtype), y.to(dtype), debiased=debiased))
    bound = sum(
        float(
            (
                unit(centred_gram(f.to(dtype).to(F64), debiased)) - unit(centred_gram(f, debiased))
            ).norm()
        )
        for f in (x, y)
    )
    assert abs(rounded - exact) <= bound + 1e-12, (rounded, exact, bound)


@settings(CI, max_examples=40)
@given(
    n=st.integers(4, MAX_N),
    d=st.integers(1, MAX_DIM),
    value=st.floats(1e-20, 1e20) | st.floats(-1e20, -1e-20) | st.just(0.0),
    estimator=st.sampled_from(ESTIMATORS),
    seed=st.integers(0, 2**31 - 1),
)
def test_constant_representation_gives_nan_not_an_error(
    n: int, d: int, value: float, estimator: dict, seed: int
) -> None:
    constant = torch.full((n, d), value, dtype=F64)
    other = Spec(n, 3, "gaussian", 0, seed).build()
    assert torch.isnan(cka(constant, other, **estimator))
    assert torch.isnan(cka(other, constant, **estimator))


# ----------------------------------------------------------------------------- MinibatchCKA


@settings(CI, max_examples=40)
@given(spec=layered())
def test_minibatch_self_similarity_has_a_unit_diagonal_and_is_symmetric(spec: LayerSpec) -> None:
    matrix = accumulate(spec.build(), spec.sizes).compute()
    assert matrix.dtype == F64 and bool(torch.isfinite(matrix).all())
    assert_close(matrix.diagonal(), torch.ones(len(spec.layers), dtype=F64), IDENTITY_ATOL)
    assert_close(matrix, matrix.T, 1e-12)
    assert float(matrix.abs().max()) <= 1.0 + 1e-12  # a cosine of concatenated U-centred Grams


@settings(CI, max_examples=30)
@given(spec=layered(), data=st.data())
def test_minibatch_two_sided_is_symmetric_and_one_on_identical_sides(
    spec: LayerSpec, data: st.DataObject
) -> None:
    n = spec.layers[0].n
    others = data.draw(st.lists(specs(st.just(n), max_dim=MAX_LAYER_DIM), min_size=1, max_size=3))
    layers, other = spec.build(), [o.build() for o in others]
    forward = accumulate(layers, spec.sizes, other).compute()
    assert bool(torch.isfinite(forward).all())
    assert_close(forward, accumulate(other, spec.sizes, layers).compute().T, 1e-12)
    same = accumulate(layers, spec.sizes, layers).compute()
    assert_close(same.diagonal(), torch.ones(len(layers), dtype=F64), IDENTITY_ATOL)


@settings(CI, max_examples=30)
@given(
    spec=layered(),
    scale_exponent=st.integers(-10, 10),
    shift=st.floats(-10, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_minibatch_is_invariant_to_orthogonal_maps_scaling_and_per_batch_shifts(
    spec: LayerSpec, scale_exponent: int, shift: float, seed: int
) -> None:
    """One orthogonal map and scale per layer (for all batches); a different translation per
    batch and layer (minibatch HSIC centres every batch on its own)."""
    layers, sizes = spec.build(), list(spec.sizes)
    gen = torch.Generator().manual_seed(seed)
    moved = []
    for index, x in enumerate(layers):
        y = orthogonal_map(x, seed + index) * 10.0**scale_exponent
        parts = [
            part + shift * float(y.abs().max()) * torch.randn(x.shape[1], dtype=F64, generator=gen)
            for part in y.split(sizes)
        ]
        moved.append(torch.cat(parts))
    assert_close(accumulate(moved, sizes).compute(), accumulate(layers, sizes).compute(), 1e-9)


def batch_perturbation(x: torch.Tensor, sizes, dtype: torch.dtype) -> float:
    """``|a~ - a|`` for ``a`` the unit-norm concatenation of the per-batch U-centred Grams of
    ``x`` (batch b weighted by n_b / (n_b (n_b - 3)) as in the accumulator), ``a~`` the same
    for ``x`` rounded to ``dtype``."""

    def concatenated(features: torch.Tensor) -> torch.Tensor:
        return unit(torch.cat([
            centred_gram(part, True).reshape(-1) / math.sqrt(part.shape[0] - 3)
            for part in features.split(list(sizes))
        ]))  # fmt: skip

    return float((concatenated(x.to(dtype).to(F64)) - concatenated(x)).norm())


@settings(CI, max_examples=30)
@given(dtype=st.sampled_from(list(LOW_PRECISION)), data=st.data())
def test_minibatch_low_precision_is_float64_math_within_the_rounding_bound(
    dtype: torch.dtype, data: st.DataObject
) -> None:
    spec = data.draw(layered(LOW_PRECISION[dtype]))
    layers = spec.build()
    low = [x.to(dtype) for x in layers]
    got = accumulate(low, spec.sizes).compute()
    assert got.dtype == F64
    assert torch.equal(got, accumulate([x.to(F64) for x in low], spec.sizes).compute())
    exact = accumulate(layers, spec.sizes).compute()
    deltas = torch.tensor([batch_perturbation(x, spec.sizes, dtype) for x in layers], dtype=F64)
    bound = deltas[:, None] + deltas[None, :] + 1e-12
    assert bool(((got - exact).abs() <= bound).all()), (got - exact, bound)


@settings(CI, max_examples=30)
@given(
    spec=layered(),
    value=st.floats(1e-20, 1e20) | st.floats(-1e20, -1e-20) | st.just(0.0),
    position=st.integers(0, 3),
    self_similarity=st.booleans(),
    kind=st.sampled_from(sorted(ACCUMULATORS)),
)
@example(  # an RBF kernel of a constant layer U-centres to rounding residues, not to 0
    spec=LayerSpec((Spec(69, 1, "gaussian", 0, 0),), (4,) * 16 + (5,)),
    value=0.0,
    position=0,
    self_similarity=False,
    kind="minibatch-rbf",
)
def test_constant_layer_gives_nan_cells_and_one_warning(
    spec: LayerSpec, value: float, position: int, self_similarity: bool, kind: str
) -> None:
    """Every accumulator: a constant layer's cells are NaN, with ONE warning naming it; the
    other cells stay finite (and so do their standard errors, where there are any)."""
    layers = spec.build()
    batches = [part for x in layers for part in torch.split(x, list(spec.sizes))]
    if kind.endswith("rbf") and any(median_distance_is_zero(part) for part in batches):
        return  # another layer's RBF kernel is constant too (a zero bandwidth in some batch)
    position = min(position, len(layers))
    constant = torch.full((layers[0].shape[0], 3), value, dtype=F64)
    with_constant = [*layers[:position], constant, *layers[position:]]
    make = ACCUMULATORS[kind]
    metric = make(len(with_constant), None if self_similarity else len(layers))
    accumulate(with_constant, spec.sizes, None if self_similarity else layers, metric)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", EstimatorWarning)  # biased CKA with n < d: not tested here
        matrix = metric.compute()
    assert [w.category for w in caught] == [ConstantLayerWarning]
    assert f"A[{position}]" in str(caught[0].message)
    assert torch.isnan(matrix[position]).all()
    keep = [i for i in range(len(with_constant)) if i != position]
    rest = matrix[keep][:, keep] if self_similarity else matrix[keep]
    assert bool(torch.isfinite(rest).all())
    if isinstance(metric, MinibatchCKA) and len(spec.sizes) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantLayerWarning)
            stderr = metric.compute_stderr()
        assert not bool(torch.isfinite(stderr[position]).any())
