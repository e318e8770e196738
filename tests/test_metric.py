"""hf_cka.MinibatchCKA against the NumPy oracle, plus its state, merge and error behaviour."""

from __future__ import annotations

import numpy as np
import oracle
import pytest
import torch

from hf_cka import MinibatchCKA, functional
from hf_cka.errors import (
    BatchTooSmallError,
    ConstantLayerWarning,
    InvalidInputError,
    NonFiniteActivationError,
    ShapeMismatchError,
)


def layered_data(
    n: int, dims_a: list[int], dims_b: list[int], seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float64 features of ``n`` samples for layers of widths ``dims_a`` and ``dims_b``.

    The layers are noisy random maps of one latent, so every pair is partially similar.
    """
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 6))
    make = lambda d: torch.from_numpy(  # noqa: E731
        latent @ rng.standard_normal((6, d)) + rng.standard_normal((n, d))
    )
    return [make(d) for d in dims_a], [make(d) for d in dims_b]


def split(feats: list[torch.Tensor], sizes: list[int]) -> list[list[torch.Tensor]]:
    """``feats`` cut into consecutive batches of ``sizes`` samples: ``out[b][layer]``."""
    cuts = [torch.split(f, sizes) for f in feats]
    return [[cut[b] for cut in cuts] for b in range(len(sizes))]


def as_numpy(batches: list[list[torch.Tensor]]) -> list[list[np.ndarray]]:
    return [[f.numpy() for f in batch] for batch in batches]


def fed(metric: MinibatchCKA, batches_a, batches_b=None) -> MinibatchCKA:
    """``metric`` after one ``update`` per batch."""
    for b, feats_a in enumerate(batches_a):
        metric.update(feats_a, None if batches_b is None else batches_b[b])
    return metric


def test_reference_values():
    x, y = oracle.kornblith_data()
    quarters = fed(MinibatchCKA(1, 1), split([x], [25] * 4), split([y], [25] * 4)).compute()
    assert quarters.shape == (1, 1)
    assert quarters.dtype == torch.float64
    assert round(float(quarters), 5) == 0.51327
    whole = fed(MinibatchCKA(1, 1), [[x]], [[y]]).compute()
    assert round(float(whole), 5) == 0.51346
    assert abs(float(whole) - float(functional.cka(x, y, debiased=True))) < 1e-12


@pytest.mark.parametrize(
    "sizes",
    [[20, 20, 20], [16, 16, 16, 16, 6], [7, 40, 4, 19]],
    ids=["equal", "short-last", "mixed"],
)
def test_layer_matrix_matches_oracle(sizes):
    feats_a, feats_b = layered_data(sum(sizes), [3, 8, 5], [4, 2, 9, 6], seed=len(sizes))
    batches_a, batches_b = split(feats_a, sizes), split(feats_b, sizes)
    got = fed(MinibatchCKA(3, 4), batches_a, batches_b).compute()
    assert got.shape == (3, 4)
    assert got.dtype == torch.float64
    expected = oracle.minibatch_cka(as_numpy(batches_a), as_numpy(batches_b))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


def test_short_last_batch_is_weighted_by_its_size():
    """An equal-weight average of the batches would give a clearly different value."""
    feats_a, feats_b = layered_data(40, [5], [5], seed=21)
    sizes = [18, 18, 4]
    batches_a, batches_b = split(feats_a, sizes), split(feats_b, sizes)
    c, a, e, _ = oracle.batch_hsics(as_numpy(batches_a), as_numpy(batches_b))
    unweighted = c.mean(0) / np.sqrt(a.mean(0)[:, None] * e.mean(0)[None, :])
    got = fed(MinibatchCKA(1, 1), batches_a, batches_b).compute()
    expected = oracle.minibatch_cka(as_numpy(batches_a), as_numpy(batches_b))
    assert abs(float(got) - expected.item()) < 1e-10
    assert abs(float(got) - unweighted.item()) > 1e-4


def test_low_precision_features_accumulate_in_float64():
    feats_a, feats_b = layered_data(32, [4, 4], [6], seed=22)
    batches_a = split([f.to(torch.bfloat16) for f in feats_a], [16, 16])
    batches_b = split([f.to(torch.float16) for f in feats_b], [16, 16])
    got = fed(MinibatchCKA(2, 1), batches_a, batches_b).compute()
    assert got.dtype == torch.float64
    up = lambda bs: [[f.double().numpy() for f in batch] for batch in bs]  # noqa: E731
    expected = oracle.minibatch_cka(up(batches_a), up(batches_b))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_rbf_single_batch_equals_debiased_functional_cka(threshold):
    feats_a, feats_b = layered_data(30, [5], [7], seed=23)
    got = fed(MinibatchCKA(1, 1, kernel="rbf", threshold=threshold), [feats_a], [feats_b])
    expected = functional.cka(
        feats_a[0], feats_b[0], kernel="rbf", debiased=True, threshold=threshold
    )
    assert abs(float(got.compute()) - float(expected)) < 1e-12


def test_rbf_bandwidth_is_set_per_batch():
    feats_a, feats_b = layered_data(36, [5, 3], [7], seed=24)
    sizes = [12, 12, 12]
    batches_a, batches_b = split(feats_a, sizes), split(feats_b, sizes)
    got = fed(MinibatchCKA(2, 1, kernel="rbf", threshold=0.8), batches_a, batches_b).compute()
    expected = oracle.minibatch_cka(
        as_numpy(batches_a), as_numpy(batches_b), kernel="rbf", threshold=0.8
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


def test_self_similarity_has_unit_diagonal_and_is_symmetric():
    feats, _ = layered_data(48, [3, 7, 2, 5], [], seed=25)
    batches = split(feats, [16, 16, 16])
    got = fed(MinibatchCKA(4), batches).compute()
    assert got.shape == (4, 4)
    np.testing.assert_allclose(torch.diagonal(got).numpy(), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.numpy(), got.T.numpy(), rtol=0, atol=1e-12)
    expected = oracle.minibatch_cka(as_numpy(batches), as_numpy(batches))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)
    with pytest.raises(InvalidInputError, match="self-similarity"):
        MinibatchCKA(4).update(batches[0], batches[0])
    with pytest.raises(InvalidInputError, match="expected features_b"):
        MinibatchCKA(4, 4).update(batches[0])


def test_merge_of_halves_equals_one_pass_over_a_shuffled_split():
    feats_a, feats_b = layered_data(80, [4, 6], [3, 5, 2], seed=26)
    order = torch.from_numpy(np.random.default_rng(27).permutation(80))
    sizes = [10, 14, 8, 16, 12, 10, 10]
    batches_a = split([f[order] for f in feats_a], sizes)
    batches_b = split([f[order] for f in feats_b], sizes)
    single = fed(MinibatchCKA(2, 3), batches_a, batches_b)
    first = fed(MinibatchCKA(2, 3), batches_a[:3], batches_b[:3])
    second = fed(MinibatchCKA(2, 3), batches_a[3:], batches_b[3:])
    assert first.merge(second) is first
    assert first.n_batches == 7
    assert first.n_samples == 80
    np.testing.assert_allclose(first.compute().numpy(), single.compute().numpy(), atol=1e-12)
    np.testing.assert_allclose(
        first.compute_stderr().numpy(), single.compute_stderr().numpy(), atol=1e-12
    )
    with pytest.raises(ShapeMismatchError, match="cannot merge"):
        first.merge(MinibatchCKA(3, 2))


def test_sync_with_a_fake_all_reduce_simulates_two_processes():
    feats_a, feats_b = layered_data(60, [4, 6], [3, 5], seed=28)
    batches_a, batches_b = split(feats_a, [15] * 4), split(feats_b, [15] * 4)
    rank0 = fed(MinibatchCKA(2, 2), batches_a[:2], batches_b[:2])
    rank1 = fed(MinibatchCKA(2, 2), batches_a[2:], batches_b[2:])
    merged = fed(MinibatchCKA(2, 2), batches_a[:2], batches_b[:2]).merge(rank1)

    sent: list[torch.Tensor] = []

    def identity(flat: torch.Tensor) -> torch.Tensor:
        sent.append(flat.clone())
        return flat

    rank1.sync(identity)  # what rank 1 contributes (a one-process all-reduce is the identity)
    calls: list[torch.Tensor] = []

    def all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
        calls.append(flat)
        assert flat.dim() == 1
        assert flat.dtype == torch.float64
        return flat + sent[0]

    rank0.sync(all_reduce_sum)
    assert len(calls) == 1
    assert rank0.n_batches == 4
    assert rank0.n_samples == 60
    np.testing.assert_allclose(rank0.compute().numpy(), merged.compute().numpy(), atol=1e-12)
    np.testing.assert_allclose(
        rank0.compute_stderr().numpy(), merged.compute_stderr().numpy(), atol=1e-12
    )
    expected = oracle.minibatch_cka(as_numpy(batches_a), as_numpy(batches_b))
    np.testing.assert_allclose(rank0.compute().numpy(), expected, atol=1e-10)


def test_state_dict_round_trip():
    feats_a, feats_b = layered_data(48, [4, 6], [3], seed=29)
    batches_a, batches_b = split(feats_a, [12] * 4), split(feats_b, [12] * 4)
    full = fed(MinibatchCKA(2, 1), batches_a, batches_b)
    head = fed(MinibatchCKA(2, 1), batches_a[:2], batches_b[:2])
    saved = head.state_dict()
    assert all(v.dtype == torch.float64 for v in saved.values())
    for value in saved.values():  # a copy: mutating it leaves the accumulator alone
        value.add_(1.0)
    saved = head.state_dict()
    resumed = MinibatchCKA(2, 1)
    resumed.load_state_dict(saved)
    assert resumed.n_batches == 2
    np.testing.assert_array_equal(resumed.compute().numpy(), head.compute().numpy())
    fed(resumed, batches_a[2:], batches_b[2:])
    np.testing.assert_allclose(resumed.compute().numpy(), full.compute().numpy(), atol=1e-12)

    with pytest.raises(ShapeMismatchError, match="expected"):
        MinibatchCKA(3, 1).load_state_dict(saved)
    incomplete = dict(saved)
    del incomplete["c"]
    with pytest.raises(ShapeMismatchError, match="lacks"):
        MinibatchCKA(2, 1).load_state_dict(incomplete)


def test_reset():
    feats_a, feats_b = layered_data(24, [4], [3], seed=30)
    batches_a, batches_b = split(feats_a, [12, 12]), split(feats_b, [12, 12])
    metric = fed(MinibatchCKA(1, 1), batches_a, [[2.0 * f for f in b] for b in batches_b])
    metric.reset()
    assert metric.n_batches == metric.n_samples == 0
    with pytest.raises(InvalidInputError, match="at least 1 accumulated batch"):
        metric.compute()
    fed(metric, batches_a[:1], batches_b[:1])
    fresh = fed(MinibatchCKA(1, 1), batches_a[:1], batches_b[:1])
    assert float(metric.compute()) == float(fresh.compute())


def test_batches_of_fewer_than_four_samples_are_refused():
    feats_a, feats_b = layered_data(4, [2], [2], seed=31)
    metric = MinibatchCKA(1, 1)
    with pytest.raises(BatchTooSmallError, match="at least 4 samples.*got 3"):
        metric.update([feats_a[0][:3]], [feats_b[0][:3]])
    assert metric.n_batches == 0
    metric.update(feats_a, feats_b)
    assert metric.n_batches == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_name_the_layer(bad):
    feats_a, feats_b = layered_data(10, [3, 3], [4, 4], seed=32)
    metric = MinibatchCKA(2, 2, layer_names_a=["embed", "block.0"], layer_names_b=["x", "y"])
    metric.update(feats_a, feats_b)
    before = metric.state_dict()
    poisoned = feats_b[1].clone()
    poisoned[3, 2] = bad
    with pytest.raises(NonFiniteActivationError, match="layer 'y'"):
        metric.update(feats_a, [feats_b[0], poisoned])
    poisoned = feats_a[1].clone()
    poisoned[0, 0] = bad
    with pytest.raises(FloatingPointError, match="layer 'block.0'"):
        metric.update([feats_a[0], poisoned], feats_b)
    for key, value in metric.state_dict().items():  # a refused batch leaves no trace
        assert torch.equal(value, before[key]), key


def test_default_layer_names_in_errors():
    feats_a, feats_b = layered_data(10, [3], [4, 4], seed=33)
    poisoned = feats_b[1].clone()
    poisoned[1, 1] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"B\[1\]"):
        MinibatchCKA(1, 2).update(feats_a, [feats_b[0], poisoned])


def test_layer_constant_within_every_batch_but_not_overall_is_constant():
    """Minibatch HSIC sees only within-batch variation: a per-batch constant is undefined."""
    values = torch.repeat_interleave(torch.arange(3, dtype=torch.float64), 8)
    feats = [values[:, None].expand(24, 4).clone(), torch.randn(24, 3, dtype=torch.float64)]
    with pytest.warns(ConstantLayerWarning):
        got = fed(MinibatchCKA(2), split(feats, [8, 8, 8])).compute()
    assert torch.isnan(got[0]).all()
    assert float(got[1, 1]) == pytest.approx(1.0, abs=1e-12)


def test_shape_errors():
    feats_a, feats_b = layered_data(12, [3, 3], [4, 4], seed=35)
    with pytest.raises(ShapeMismatchError, match="expected 2 feature tensors for side A, got 1"):
        MinibatchCKA(2, 2).update(feats_a[:1], feats_b)
    with pytest.raises(ShapeMismatchError, match="expected 2 feature tensors for side B, got 3"):
        MinibatchCKA(2, 2).update(feats_a, [*feats_b, feats_b[0]])
    with pytest.raises(ShapeMismatchError, match="model A gave 12 samples.*model B 10"):
        MinibatchCKA(2, 2).update(feats_a, [f[:10] for f in feats_b])
    with pytest.raises(ShapeMismatchError, match=r"batch sizes \[10, 12\]"):
        MinibatchCKA(2, 2).update([feats_a[0], feats_a[1][:10]], feats_b)
    with pytest.raises(InvalidInputError, match="at least one layer"):
        MinibatchCKA(0, 2)


@pytest.mark.parametrize("threshold", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_rbf_threshold_fails_at_construction_naming_it(threshold):
    """It used to surface at the first batch as NaN blamed on the activations."""
    with pytest.raises(InvalidInputError, match=rf"RBF threshold > 0 .* threshold={threshold}"):
        MinibatchCKA(2, kernel="rbf", threshold=threshold)
    with pytest.raises(InvalidInputError, match="expected kernel in"):
        MinibatchCKA(2, kernel="cosine")  # type: ignore[arg-type]
    assert MinibatchCKA(2, threshold=threshold).n_batches == 0  # unused by the linear kernel


def test_independent_small_data_gives_negative_values_unclamped():
    rng = np.random.default_rng(36)
    feats_a = [torch.from_numpy(rng.standard_normal((8, 3))) for _ in range(6)]
    feats_b = [torch.from_numpy(rng.standard_normal((8, 3))) for _ in range(6)]
    got = fed(MinibatchCKA(6, 6), [feats_a], [feats_b]).compute()
    assert (got < 0).any()
    expected = oracle.minibatch_cka([[f.numpy() for f in feats_a]], [[f.numpy() for f in feats_b]])
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


def test_stderr_matches_the_documented_delta_method():
    feats_a, feats_b = layered_data(70, [4, 6], [3, 5, 2], seed=37)
    sizes = [16, 16, 16, 16, 6]
    batches_a, batches_b = split(feats_a, sizes), split(feats_b, sizes)
    metric = fed(MinibatchCKA(2, 3), batches_a, batches_b)
    stderr = metric.compute_stderr()
    assert stderr.shape == (2, 3)
    assert stderr.dtype == torch.float64
    assert (stderr > 0).all()
    expected = oracle.minibatch_stderr(as_numpy(batches_a), as_numpy(batches_b))
    np.testing.assert_allclose(stderr.numpy(), expected, rtol=1e-7, atol=1e-12)


def test_stderr_is_zero_only_when_the_batches_agree():
    feats, _ = layered_data(48, [4, 3], [], seed=38)
    metric = fed(MinibatchCKA(2), split(feats, [16, 16, 16]))
    stderr = metric.compute_stderr()
    assert (stderr >= 0).all()
    assert torch.diagonal(stderr).abs().max() < 1e-6  # CKA(x, x) = 1 in every batch
    assert float(stderr[0, 1]) > 1e-4
    np.testing.assert_allclose(stderr.numpy(), stderr.T.numpy(), atol=1e-12)

    repeated = fed(MinibatchCKA(2), [split(feats, [16, 32])[0]] * 3)
    assert repeated.compute_stderr().abs().max() < 1e-6

    single = fed(MinibatchCKA(2), split(feats, [48]))
    with pytest.raises(InvalidInputError, match="at least 2 accumulated batch"):
        single.compute_stderr()
