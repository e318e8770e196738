"""hf_cka.measures against the float64 NumPy oracle, invariances, known values and errors."""

from __future__ import annotations

import numpy as np
import oracle
import oracle_measures
import pytest
import torch

from hf_cka import measures
from hf_cka.errors import (
    FullDataMemoryError,
    InvalidInputError,
    MemoryBudgetError,
    NonFiniteActivationError,
    ShapeMismatchError,
)
from hf_cka.functional import cka

# (n, p, q): n > p, q; n between; n < p, q (rank-deficient covariances)
SHAPES = [(60, 6, 9), (40, 55, 12), (25, 60, 70)]
CASES = [
    ("mutual_knn", {"k": 1}),
    ("mutual_knn", {"k": 7}),
    ("procrustes", {}),
    ("svcca", {}),
    ("svcca", {"keep": 0.6}),
    ("svcca", {"keep": 1.0}),
    ("pwcca", {}),
    ("rsa", {"distance": "correlation"}),
    ("rsa", {"distance": "euclidean"}),
    ("rsa", {"distance": "cosine"}),
]
TOL = 1e-10


def related(n: int, p: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two representations sharing a 3-dimensional latent, with a mean and unequal scales."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 3))
    x = latent @ rng.standard_normal((3, p)) + 0.7 * rng.standard_normal((n, p)) + 2.0
    y = latent @ rng.standard_normal((3, q)) + rng.standard_normal((n, q)) - 1.0
    return x * rng.uniform(0.5, 3.0, p), y


def value(measure: str, x, y, **params) -> float:
    result = measures.similarity(torch.as_tensor(x), torch.as_tensor(y), measure, **params)
    assert result.dtype == torch.float64 and result.dim() == 0
    return float(result)


def random_orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("measure,params", CASES, ids=lambda c: str(c))
def test_matches_oracle(measure, params, shape):
    for seed in range(2):
        x, y = related(*shape, seed=seed)
        expected = getattr(oracle_measures, measure)(x, y, **params)
        assert value(measure, x, y, **params) == pytest.approx(expected, abs=TOL)
        # and from float32 input: computed in float64 from the float32 values
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        expected32 = getattr(oracle_measures, measure)(x32, y32, **params)
        assert value(measure, x32, y32, **params) == pytest.approx(expected32, abs=TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cka_dispatch_matches_oracle(shape):
    x, y = related(*shape)
    for debiased in (False, True):
        expected = oracle.cka(x, y, debiased=debiased)
        assert value("cka", x, y, debiased=debiased) == pytest.approx(expected, abs=TOL)


def test_measures_are_not_trivial_on_related_data():
    """The oracle comparison would be vacuous if every value were 0 or 1."""
    x, y = related(60, 6, 9)
    for measure, params in CASES:
        assert 0.05 < value(measure, x, y, **params) < 0.999, (measure, params)


# --------------------------------------------------------------------------------- invariances
def orthogonal_map(x: np.ndarray, seed: int = 1) -> np.ndarray:
    return x @ random_orthogonal(x.shape[1], seed)


def isotropic_scaling(x: np.ndarray, seed: int = 1) -> np.ndarray:
    return 3.7 * x


def feature_permutation(x: np.ndarray, seed: int = 1) -> np.ndarray:
    return x[:, np.random.default_rng(seed).permutation(x.shape[1])]


def translation(x: np.ndarray, seed: int = 1) -> np.ndarray:
    return x + np.random.default_rng(seed).standard_normal(x.shape[1]) * 5


def sample_scaling(x: np.ndarray, seed: int = 1) -> np.ndarray:
    return x * np.random.default_rng(seed).uniform(0.2, 5.0, (x.shape[0], 1))


def sample_shift(x: np.ndarray, seed: int = 1) -> np.ndarray:
    return x + np.random.default_rng(seed).standard_normal((x.shape[0], 1)) * 5


def invertible_linear(x: np.ndarray, seed: int = 1) -> np.ndarray:
    d = x.shape[1]
    return x @ (np.eye(d) + 0.5 * np.random.default_rng(seed).standard_normal((d, d)))


# what each measure claims in its docstring (applied to both sides unless marked "x" / "y")
INVARIANCES = {
    ("mutual_knn", (("k", 5),)): [
        orthogonal_map,
        isotropic_scaling,
        feature_permutation,
        sample_scaling,
    ],
    ("procrustes", ()): [orthogonal_map, isotropic_scaling, feature_permutation, translation],
    ("svcca", ()): [orthogonal_map, isotropic_scaling, feature_permutation, translation],
    ("svcca", (("keep", 1.0),)): [invertible_linear, translation],
    ("pwcca", ()): [isotropic_scaling, feature_permutation, translation],
    ("rsa", (("distance", "correlation"),)): [
        isotropic_scaling,
        feature_permutation,
        sample_scaling,
        sample_shift,
    ],
    ("rsa", (("distance", "euclidean"),)): [
        orthogonal_map,
        isotropic_scaling,
        feature_permutation,
        translation,
    ],
    ("rsa", (("distance", "cosine"),)): [
        orthogonal_map,
        isotropic_scaling,
        feature_permutation,
        sample_scaling,
    ],
    ("cka", ()): [orthogonal_map, isotropic_scaling, feature_permutation, translation],
}


@pytest.mark.parametrize("case", list(INVARIANCES), ids=str)
def test_invariances(case):
    measure, params = case[0], dict(case[1])
    x, y = related(50, 8, 11)
    reference = value(measure, x, y, **params)
    for transform in INVARIANCES[case]:
        moved = value(measure, transform(x, 1), transform(y, 2), **params)
        assert moved == pytest.approx(reference, abs=1e-10), transform.__name__


def test_pwcca_is_invariant_to_linear_maps_of_y_only():
    x, y = related(50, 8, 11)
    reference = value("pwcca", x, y)
    assert value("pwcca", x, invertible_linear(y)) == pytest.approx(reference, abs=1e-10)
    assert value("pwcca", x, orthogonal_map(y)) == pytest.approx(reference, abs=1e-10)
    # the weights come from x's neurons: rotating x changes them (the docstring says so)
    assert abs(value("pwcca", orthogonal_map(x), y) - reference) > 1e-4
    assert abs(value("pwcca", y, x) - reference) > 1e-4


def test_non_invariances_are_real():
    """The transforms above are not no-ops: measures that do not claim them do change."""
    x, y = related(50, 8, 11)
    assert abs(value("mutual_knn", translation(x), y, k=5) - value("mutual_knn", x, y, k=5)) > 0
    for measure in ("procrustes", "svcca", "cka"):
        moved = value(measure, invertible_linear(x), y)
        assert abs(moved - value(measure, x, y)) > 1e-4, measure
    correlation = value("rsa", orthogonal_map(x), y, distance="correlation")
    assert abs(correlation - value("rsa", x, y, distance="correlation")) > 1e-4


@pytest.mark.parametrize("measure", ["mutual_knn", "procrustes", "svcca", "rsa", "cka"])
def test_symmetric(measure):
    x, y = related(40, 7, 5)
    assert value(measure, x, y) == pytest.approx(value(measure, y, x), abs=1e-12)


# -------------------------------------------------------------------------------- known values
def test_known_values():
    x, _ = related(60, 6, 9)
    assert value("mutual_knn", x, x, k=10) == 1.0
    assert value("procrustes", x, orthogonal_map(x)) == pytest.approx(1.0, abs=1e-12)
    assert value("svcca", x, invertible_linear(x), keep=1.0) == pytest.approx(1.0, abs=1e-12)
    assert value("pwcca", x, invertible_linear(x)) == pytest.approx(1.0, abs=1e-12)
    assert value("cka", x, x) == pytest.approx(1.0, abs=1e-12)
    assert value("rsa", x, 2 * x) == pytest.approx(1.0, abs=1e-12)


def test_svcca_keeps_the_directions_explaining_the_variance():
    """Two strong shared directions and a weak unshared one: keep=0.9 drops the weak one."""
    rng = np.random.default_rng(3)
    # orthonormal, centred columns (orthogonal to the ones vector): 2 shared, 2 unshared
    basis = np.linalg.qr(np.hstack([np.ones((200, 1)), rng.standard_normal((200, 4))]))[0]
    shared, noise = basis[:, 1:3], basis[:, 3:]
    x = np.hstack([10 * shared, 0.1 * noise[:, :1]])
    y = np.hstack([shared @ rng.standard_normal((2, 2)), 0.1 * noise[:, 1:]])
    assert value("svcca", x, y, keep=0.9) == pytest.approx(1.0, abs=1e-12)  # k_x = k_y = 2
    assert value("svcca", x, y, keep=1.0) < 0.9  # the unshared pair adds a ~0 correlation


def test_procrustes_of_unrelated_wide_features_is_below_one():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    assert 0 < value("procrustes", x, y) < 0.7


def test_mutual_knn_ties_go_to_the_lower_index():
    # every row of x is the same unit vector: all kernel values tie exactly, so each sample's
    # neighbours are the lowest-indexed other samples ({1, 2} for sample 0, {0, 2} for 1, ...)
    x = np.tile([1.0, 0.0, 0.0], (6, 1))
    y = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    # y's neighbours: 0:{1,2} 1:{0,2} 2:{1,0} 3:{4,5} 4:{3,5} 5:{4,3}; shared: 2,2,2,0,0,0
    assert value("mutual_knn", x, y, k=2) == pytest.approx(0.5, abs=1e-15)
    assert oracle_measures.mutual_knn(x, y, 2) == pytest.approx(0.5, abs=1e-15)


def test_rsa_ties_get_average_ranks():
    # integer coordinates with duplicated rows: several pairwise distances tie exactly
    x = np.array([[0, 0], [0, 0], [1, 0], [0, 1], [1, 1], [2, 0]], dtype=float)
    y = np.array([[0, 0], [3, 0], [1, 1], [0, 2], [2, 2], [5, 1]], dtype=float)
    expected = oracle_measures.rsa(x, y, "euclidean")
    assert value("rsa", x, y, distance="euclidean") == pytest.approx(expected, abs=1e-12)
    ranks = measures._average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0]))
    assert ranks.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_constant_representation_is_nan():
    x, _ = related(20, 4, 4)
    constant = np.ones((20, 3))
    for measure in ("procrustes", "svcca", "pwcca", "cka"):
        assert np.isnan(value(measure, x, constant)), measure
    assert np.isnan(value("rsa", x, constant, distance="euclidean"))


# -------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_typed_errors():
    x, y = related(20, 4, 5)
    with pytest.raises(ShapeMismatchError, match="20 and 19 rows"):
        measures.procrustes(torch.as_tensor(x), torch.as_tensor(y[:19]))
    with pytest.raises(ShapeMismatchError, match="at least 3 samples"):
        measures.rsa(torch.as_tensor(x[:2]), torch.as_tensor(y[:2]))
    for k in (0, 20, 2.5, True):
        with pytest.raises(InvalidInputError, match="1 <= k < n_samples = 20"):
            measures.mutual_knn(torch.as_tensor(x), torch.as_tensor(y), k=k)
    for keep in (0, 1.5, -0.1):
        with pytest.raises(InvalidInputError, match=r"keep in \(0, 1\]"):
            measures.svcca(torch.as_tensor(x), torch.as_tensor(y), keep=keep)
    with pytest.raises(InvalidInputError, match="(?i)did you mean 'euclidean'"):
        measures.rsa(torch.as_tensor(x), torch.as_tensor(y), distance="euclidian")
    with pytest.raises(InvalidInputError, match="(?i)did you mean 'procrustes'"):
        measures.similarity(torch.as_tensor(x), torch.as_tensor(y), "procrustes_distance")
    with pytest.raises(InvalidInputError, match=r"takes the parameters \['k'\], got unknown"):
        measures.similarity(torch.as_tensor(x), torch.as_tensor(y), "mutual_knn", keep=0.9)
    bad = x.copy()
    bad[7, 2] = np.nan
    for measure in measures.MEASURES:
        if measure == "cka":  # functional.cka has its own (layer-level) handling
            continue
        with pytest.raises(NonFiniteActivationError, match="x has NaN or Inf.*sample 7"):
            measures.similarity(torch.as_tensor(bad), torch.as_tensor(y), measure)
    with pytest.raises(FloatingPointError):
        measures.procrustes(torch.as_tensor(x), torch.as_tensor(np.where(y > 1, np.inf, y)))


def test_rsa_rejects_undefined_distances():
    x, y = related(10, 4, 4)
    x[3] = 2.5  # a constant sample: its correlation with any other sample is undefined
    with pytest.raises(InvalidInputError, match="sample 3.*constant.*euclidean"):
        measures.rsa(torch.as_tensor(x), torch.as_tensor(y))
    x[3] = 0.0
    with pytest.raises(InvalidInputError, match="sample 3.*zero"):
        measures.rsa(torch.as_tensor(x), torch.as_tensor(y), distance="cosine")


def test_registry_lists_every_measure():
    assert set(measures.MEASURES) == set(measures.Measure.__args__)
    assert measures.MEASURES["cka"] is cka


# -------------------------------------------------------------------------------------- memory
def test_estimate_bytes_counts_the_pooled_features():
    n, dims = 1000, [768] * 13
    features = 8 * n * 2 * sum(dims)
    for measure in measures.MEASURES:
        needed = measures.estimate_bytes(n, dims, dims, measure=measure)
        assert features < needed < 1.5 * features, measure
    assert measures.estimate_bytes(n, dims) < measures.estimate_bytes(n, dims, dims)
    # (n, n) temporaries dominate for the kernel and distance measures when n >> d
    big_n = measures.estimate_bytes(100_000, [8], measure="rsa")
    assert big_n > 8 * 5 * 100_000**2


def test_estimate_bytes_refuses_over_budget_up_front():
    with pytest.raises(FullDataMemoryError, match=r"needs about \d+\.\d\d GiB.*allows 10\.24 MiB"):
        measures.estimate_bytes(
            10_000, [768] * 13, [1024] * 25, measure="svcca", max_bytes=2**30 // 100
        )
    assert issubclass(FullDataMemoryError, MemoryBudgetError)
    assert issubclass(FullDataMemoryError, MemoryError)
    needed = measures.estimate_bytes(100, [4, 4], measure="procrustes")
    assert measures.estimate_bytes(100, [4, 4], measure="procrustes", max_bytes=needed) == needed
    with pytest.raises(InvalidInputError, match="expected measure"):
        measures.estimate_bytes(100, [4], measure="cca")
    with pytest.raises(InvalidInputError, match="positive width"):
        measures.estimate_bytes(100, [], [4])
