"""hf_cka.functional against the reference values of DESIGN.md and the NumPy oracle."""

from __future__ import annotations

import numpy as np
import oracle
import pytest
import torch

from hf_cka import functional
from hf_cka.errors import (
    BatchTooSmallError,
    InvalidInputError,
    NonFiniteActivationError,
    ShapeMismatchError,
)

SETTINGS = [
    {"kernel": "linear", "debiased": False},
    {"kernel": "linear", "debiased": True},
    {"kernel": "rbf", "debiased": False, "threshold": 1.0},
    {"kernel": "rbf", "debiased": True, "threshold": 0.5},
]


def pair(n: int, p: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated random features ``x (n, p)`` and ``y (n, q)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    y = x @ rng.standard_normal((p, q)) + rng.standard_normal((n, q))
    return x, y


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 0.55761),
        ({"debiased": True}, 0.51346),
        ({"kernel": "rbf", "threshold": 0.5}, 0.65483),
    ],
)
def test_reference_values(kwargs, expected):
    x, y = oracle.kornblith_data()
    assert round(float(functional.cka(x, y, **kwargs)), 5) == expected


def test_oracle_self_consistency():
    """The oracle's two unbiased-HSIC formulas agree (a check of the reference itself)."""
    x, y = pair(12, 4, 6)
    k, l = oracle.gram_linear(x), oracle.gram_rbf(y)  # noqa: E741
    assert oracle.hsic_unbiased(k, l) == pytest.approx(oracle.hsic_song(k, l), rel=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 2), (7, 1, 5), (30, 8, 8), (50, 64, 3), (33, 5, 40)])
@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(map(str, k.values())))
def test_cka_matches_oracle(shape, kwargs):
    x, y = pair(*shape, seed=sum(shape))
    got = functional.cka(torch.from_numpy(x), torch.from_numpy(y), **kwargs)
    assert got.dtype == torch.float64
    assert got.dim() == 0
    assert abs(float(got) - oracle.cka(x, y, **kwargs)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(map(str, k.values())))
def test_low_precision_inputs_are_computed_in_float64(dtype, kwargs):
    x, y = pair(40, 6, 9, seed=3)
    xt, yt = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
    got = functional.cka(xt, yt, **kwargs)
    assert got.dtype == torch.float64
    expected = oracle.cka(xt.double().numpy(), yt.double().numpy(), **kwargs)
    assert abs(float(got) - expected) < 1e-10


def test_gram_and_centering_match_oracle():
    x, _ = pair(9, 4, 1, seed=5)
    xt = torch.from_numpy(x)
    k = oracle.gram_linear(x)
    np.testing.assert_allclose(functional.gram_linear(xt).numpy(), k, rtol=0, atol=1e-12)
    for threshold in (0.3, 1.0, 2.0):  # odd n: the median is one entry of the 81
        np.testing.assert_allclose(
            functional.gram_rbf(xt, threshold).numpy(), oracle.gram_rbf(x, threshold), atol=1e-12
        )
    np.testing.assert_allclose(functional.center_gram(torch.from_numpy(k)), oracle.center(k))
    np.testing.assert_allclose(
        functional.u_center_gram(torch.from_numpy(k)), oracle.u_center(k), atol=1e-12
    )


def test_gram_rbf_even_n_median_averages_the_middle_entries():
    x, _ = pair(10, 3, 1, seed=6)  # 100 distances: np.median averages entries 49 and 50
    np.testing.assert_allclose(
        functional.gram_rbf(torch.from_numpy(x), 0.7).numpy(), oracle.gram_rbf(x, 0.7), atol=1e-12
    )


def test_hsic_estimators_match_oracle_with_a_batch_dimension():
    rng = np.random.default_rng(7)
    feats = [rng.standard_normal((11, 3)) for _ in range(3)]
    grams = np.stack([oracle.gram_linear(f) for f in feats])
    k, l = torch.from_numpy(grams), torch.from_numpy(grams[::-1].copy())  # noqa: E741
    biased = functional.hsic_biased(k, l)
    unbiased = functional.hsic_unbiased(k, l)
    assert biased.shape == unbiased.shape == (3,)
    for i in range(3):
        assert float(biased[i]) == pytest.approx(oracle.hsic_biased(grams[i], grams[2 - i]))
        assert float(unbiased[i]) == pytest.approx(oracle.hsic_song(grams[i], grams[2 - i]))


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(map(str, k.values())))
def test_invariant_to_orthogonal_maps_isotropic_scaling_and_translation(kwargs):
    x, y = pair(40, 6, 6, seed=8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    q, _ = torch.linalg.qr(torch.from_numpy(np.random.default_rng(9).standard_normal((6, 6))))
    base = float(functional.cka(xt, yt, **kwargs))
    for transformed in (xt @ q, 3.7 * xt, 1e-3 * xt @ q, xt + 100.0):
        assert abs(float(functional.cka(transformed, yt, **kwargs)) - base) < 1e-10


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_scale_invariance_survives_extreme_magnitudes(debiased):
    x, y = pair(30, 5, 5, seed=10)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    base = float(functional.cka(xt, yt, debiased=debiased))
    for scale in (1e200, 1e-200):
        got = float(functional.cka(xt * scale, yt, debiased=debiased))
        assert abs(got - base) < 1e-10


@pytest.mark.parametrize("debiased", [False, True])
def test_not_invariant_to_general_linear_maps(debiased):
    x, y = pair(60, 5, 5, seed=11)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    anisotropic = torch.diag(torch.tensor([10.0, 1.0, 0.1, 1.0, 3.0], dtype=torch.float64))
    mixing = anisotropic @ torch.from_numpy(np.random.default_rng(12).standard_normal((5, 5)))
    delta = float(functional.cka(xt @ mixing, yt, debiased=debiased)) - float(
        functional.cka(xt, yt, debiased=debiased)
    )
    assert abs(delta) > 1e-3


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(map(str, k.values())))
def test_symmetric_and_one_on_itself(kwargs):
    x, y = pair(25, 4, 7, seed=13)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    forward, backward = functional.cka(xt, yt, **kwargs), functional.cka(yt, xt, **kwargs)
    assert abs(float(forward) - float(backward)) < 1e-12
    assert abs(float(functional.cka(xt, xt, **kwargs)) - 1.0) < 1e-12


def test_debiased_value_is_not_clamped():
    draws = torch.from_numpy(np.random.default_rng(14).standard_normal((20, 2, 8, 3)))
    values = [float(functional.cka(x, y, debiased=True)) for x, y in draws]
    assert min(values) < 0.0


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(map(str, k.values())))
def test_constant_representation_gives_nan(kwargs):
    _, y = pair(10, 1, 4, seed=15)
    assert torch.isnan(functional.cka(torch.full((10, 3), 2.5), torch.from_numpy(y), **kwargs))


def test_features_are_flattened_per_sample():
    x, y = pair(12, 6, 4, seed=16)
    xt = torch.from_numpy(x)
    flat = functional.cka(xt, torch.from_numpy(y))
    assert float(functional.cka(xt.reshape(12, 2, 3), torch.from_numpy(y))) == float(flat)


def test_errors():
    x, y = torch.randn(10, 3), torch.randn(9, 3)
    with pytest.raises(ShapeMismatchError, match="10 and 9 rows"):
        functional.cka(x, y)
    with pytest.raises(ShapeMismatchError, match="scalar"):
        functional.cka(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(InvalidInputError, match="kernel"):
        functional.cka(x, x, kernel="cosine")
    with pytest.raises(InvalidInputError, match="threshold > 0"):
        functional.cka(x, x, kernel="rbf", threshold=0.0)
    with pytest.raises(BatchTooSmallError, match="at least 4 samples"):
        functional.cka(x[:3], x[:3], debiased=True)
    assert isinstance(BatchTooSmallError("m"), ValueError)


@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (lambda x: x.to(torch.complex128), "real floating-point.*complex128.*x.real"),
        (lambda x: x.round().to(torch.int64), r"torch.int64; convert them first with \.float\(\)"),
        (lambda x: x > 0, "torch.bool"),
    ],
    ids=["complex", "integer", "bool"],
)
def test_complex_integer_and_bool_features_are_refused(make_bad, match):
    """Complex input used to lose its imaginary part silently; integers must be converted."""
    x, y = (torch.from_numpy(a) for a in pair(12, 3, 4, seed=17))
    for args in ((make_bad(x), y), (x, make_bad(y))):
        with pytest.raises(InvalidInputError, match=match):
            functional.cka(*args)
    with pytest.raises(InvalidInputError, match="floating-point"):
        functional.cka([[1, 2], [3, 4], [5, 7], [1, 1]], x[:4])  # a list of ints is int64


def test_empty_features_are_refused():
    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(BatchTooSmallError, match=r"at least one sample .* \(0, 3\)"):
        functional.cka(x[:0], x[:0])
    with pytest.raises(ShapeMismatchError, match=r"at least one feature .* \(8, 0\)"):
        functional.cka(x[:, :0], x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: "-".join(map(str, k.values())))
def test_non_finite_features_raise_the_accumulators_error(bad, kwargs):
    """functional.cka used to return NaN where MinibatchCKA raises."""
    x, y = (torch.from_numpy(a) for a in pair(12, 3, 4, seed=18))
    y[5, 2] = bad
    with pytest.raises(NonFiniteActivationError, match="y holds NaN or Inf"):
        functional.cka(x, y, **kwargs)


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_rbf_threshold_is_named(threshold):
    """A NaN threshold used to give a NaN blamed on the activations."""
    x, y = (torch.from_numpy(a) for a in pair(12, 3, 4, seed=19))
    with pytest.raises(InvalidInputError, match=rf"RBF threshold > 0 .* threshold={threshold}"):
        functional.cka(x, y, kernel="rbf", threshold=threshold)
    with pytest.raises(InvalidInputError, match=rf"threshold={threshold}"):
        functional.gram_rbf(x, threshold)
    assert torch.isfinite(functional.cka(x, y, threshold=float("nan")))  # linear: unused


def test_identical_rows_are_exactly_zero_apart() -> None:
    """The |a|^2 + |b|^2 - 2ab expansion left ~1e-17 between duplicated rows, so the median RBF
    bandwidth of a layer with repeated samples was rounding noise and its CKA a number, not NaN
    (issue 13: hypothesis found n=17, d=4, two distinct rows tiled)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 4, generator=gen, dtype=torch.float64) * 3.7 + 11.3
    x = rows[torch.arange(17) % 2]
    distances = functional.squared_distances(x)
    same = (torch.arange(17)[:, None] % 2) == (torch.arange(17)[None, :] % 2)
    assert torch.all(distances[same] == 0)
    assert torch.all(distances[~same] > 0)
    constant = rows[torch.zeros(17, dtype=torch.long)]  # every row the same: median distance 0
    y = torch.randn(17, 1, generator=gen, dtype=torch.float64)
    assert torch.isnan(functional.cka(y, constant, kernel="rbf"))
