"""hf_cka.streaming (exact streamed linear CKA, its states, warnings) and hf_cka.statistics'
permutation null."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_accumulators import FakeProcessGroup

from hf_cka import MinibatchCKA, functional
from hf_cka.errors import (
    BatchTooSmallError,
    EstimatorWarning,
    InvalidInputError,
    MemoryBudgetError,
    NonFiniteActivationError,
    ShapeMismatchError,
)
from hf_cka.statistics import permutation_null
from hf_cka.streaming import (
    StreamingLinearCKA,
    biased_dimension_warning,
    estimate_bytes,
    new_accumulator,
)

DIMS_A, DIMS_B = [3, 8, 5], [4, 2, 9, 6]
UNEVEN = [10, 1, 30, 2, 54]  # 97 samples, batches of 1 and 2 included


def layers(n: int, dims: list[int], seed: int, offset: float = 0.0) -> list[torch.Tensor]:
    """Float64 layers that are noisy random maps of one shared latent (so pairs are related).

    ``offset`` adds a random per-feature mean of that magnitude.
    """
    rng = np.random.default_rng(seed)
    latent = np.random.default_rng(0).standard_normal((n, 6))
    return [
        torch.from_numpy(
            latent @ rng.standard_normal((6, d))
            + rng.standard_normal((n, d))
            + offset * rng.standard_normal(d)
        )
        for d in dims
    ]


def batches(feats: list[torch.Tensor], sizes: list[int]) -> list[list[torch.Tensor]]:
    """``feats`` cut into consecutive batches: ``out[b][layer]``."""
    return [list(batch) for batch in zip(*(f.split(sizes) for f in feats), strict=True)]


def fed(metric, feats_a, feats_b=None, sizes=UNEVEN):
    """``metric`` after one ``update`` per batch of ``sizes``."""
    parts_b = None if feats_b is None else batches(feats_b, sizes)
    for b, part in enumerate(batches(feats_a, sizes)):
        metric.update(part, None if parts_b is None else parts_b[b])
    return metric


def full_data(feats_a, feats_b, debiased: bool) -> torch.Tensor:
    """``functional.cka`` of every layer pair on all samples."""
    return torch.tensor(
        [[float(functional.cka(x, y, debiased=debiased)) for y in feats_b] for x in feats_a],
        dtype=torch.float64,
    )


@pytest.fixture(autouse=True)
def _quiet_biased_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        yield


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_uneven_batches_equal_full_data_cka(debiased):
    feats_a, feats_b = layers(97, DIMS_A, 1), layers(97, DIMS_B, 2)
    metric = fed(StreamingLinearCKA(3, 4, debiased=debiased), feats_a, feats_b)
    got = metric.compute()
    assert got.shape == (3, 4)
    assert got.dtype == torch.float64
    assert (metric.n_samples, metric.n_batches) == (97, 5)
    expected = full_data(feats_a, feats_b, debiased)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-10)
    assert expected.std() > 0.05  # the pairs really differ, so the test can tell them apart


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_self_similarity_equals_full_data_cka(debiased):
    feats = layers(61, DIMS_A, 3)
    metric = fed(StreamingLinearCKA(3, debiased=debiased), feats, sizes=[20, 20, 21])
    got = metric.compute()
    np.testing.assert_allclose(got.numpy(), full_data(feats, feats, debiased).numpy(), atol=1e-10)
    np.testing.assert_allclose(torch.diagonal(got).numpy(), 1.0, atol=1e-12)
    with pytest.raises(InvalidInputError, match="self-similarity"):
        metric.update(feats, feats)
    with pytest.raises(InvalidInputError, match="expected features_b"):
        StreamingLinearCKA(3, 3).update(feats)


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_large_offset_does_not_cancel(debiased):
    """Features of mean ~1e3 and unit variance: the first-batch shift keeps float64 exact."""
    plain_a, plain_b = layers(200, [16, 7], 4), layers(200, [12], 5)
    shifted_a, shifted_b = layers(200, [16, 7], 4, offset=1e3), layers(200, [12], 5, offset=1e3)
    assert min(float(f.mean(0).abs().min()) for f in shifted_a + shifted_b) > 10
    metric = fed(StreamingLinearCKA(2, 1, debiased=debiased), shifted_a, shifted_b, [32] * 6 + [8])
    expected = full_data(plain_a, plain_b, debiased)  # CKA is shift invariant
    np.testing.assert_allclose(metric.compute().numpy(), expected.numpy(), rtol=0, atol=1e-8)

    second = fed(StreamingLinearCKA(2, 1, debiased=debiased), shifted_a, shifted_b, [150, 50])
    first = fed(StreamingLinearCKA(2, 1, debiased=debiased), shifted_a, shifted_b, [50, 150])
    merged = first.merge(second).compute()  # 400 samples: each one counted twice
    doubled = full_data(
        [torch.cat([f, f]) for f in plain_a], [torch.cat([plain_b[0]] * 2)], debiased
    )
    np.testing.assert_allclose(merged.numpy(), doubled.numpy(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("self_similarity", [False, True])
def test_merge_of_accumulators_with_different_first_batches(self_similarity):
    feats_a, feats_b = layers(97, DIMS_A, 6), layers(97, DIMS_B, 7)
    feats_b = None if self_similarity else feats_b
    make = lambda: StreamingLinearCKA(3, None if self_similarity else 4, debiased=True)  # noqa: E731
    single = fed(make(), feats_a, feats_b)
    halves = [[f[:41] for f in feats] for feats in (feats_a, feats_b or feats_a)]
    rests = [[f[41:] + 0 for f in feats] for feats in (feats_a, feats_b or feats_a)]
    first = fed(make(), halves[0], None if self_similarity else halves[1], [41])
    second = fed(make(), rests[0], None if self_similarity else rests[1], [6, 50])
    assert not torch.allclose(first.shift_a, second.shift_a)
    assert first.merge(second) is first
    assert (first.n_samples, first.n_batches) == (97, 3)
    np.testing.assert_allclose(first.compute().numpy(), single.compute().numpy(), atol=1e-12)
    untouched = fed(make(), rests[0], None if self_similarity else rests[1], [56]).compute()
    np.testing.assert_allclose(second.compute().numpy(), untouched.numpy(), atol=1e-12)

    empty = make().merge(single)
    np.testing.assert_allclose(empty.compute().numpy(), single.compute().numpy(), atol=0)
    with pytest.raises(ShapeMismatchError, match="cannot merge"):
        single.merge(StreamingLinearCKA(4, 3))
    wider = fed(StreamingLinearCKA(3, None if self_similarity else 4), layers(20, [3, 8, 6], 8),
                None if self_similarity else layers(20, DIMS_B, 9), [20])  # fmt: skip
    with pytest.raises(ShapeMismatchError, match="layer widths"):
        single.merge(wider)


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_sync_over_three_fake_processes_equals_one_process(debiased):
    feats_a, feats_b = layers(90, DIMS_A, 10, offset=50.0), layers(90, DIMS_B, 11, offset=50.0)
    parts_a, parts_b = batches(feats_a, [15] * 6), batches(feats_b, [15] * 6)
    single = fed(StreamingLinearCKA(3, 4, debiased=debiased), feats_a, feats_b, [15] * 6)
    ranks = [
        StreamingLinearCKA(3, 4, debiased=debiased, dims_a=DIMS_A, dims_b=DIMS_B) for _ in range(3)
    ]
    for b in range(5):  # rank r takes batches r, r + 2, ... of the first five; rank 2 none
        ranks[b % 2].update(parts_a[b], parts_b[b])
    ranks[0].update(parts_a[5], parts_b[5])
    group = FakeProcessGroup(3)
    group.run(ranks)
    assert group.calls == [2, 2, 2]
    expected = full_data(feats_a, feats_b, debiased)
    for rank in ranks:
        assert (rank.n_samples, rank.n_batches) == (90, 6)
        np.testing.assert_allclose(rank.compute().numpy(), single.compute().numpy(), atol=1e-12)
        np.testing.assert_allclose(rank.compute().numpy(), expected.numpy(), atol=1e-10)
    with pytest.raises(InvalidInputError, match="dims_a"):
        StreamingLinearCKA(3, 4).sync(lambda flat: flat)


def test_state_dict_round_trip_then_continue():
    feats_a, feats_b = layers(97, DIMS_A, 12), layers(97, DIMS_B, 13)
    single = fed(StreamingLinearCKA(3, 4, debiased=True), feats_a, feats_b)
    first = fed(StreamingLinearCKA(3, 4, debiased=True), [f[:41] for f in feats_a],
                [f[:41] for f in feats_b], [10, 1, 30])  # fmt: skip
    saved = first.state_dict()
    assert all(v.device.type == "cpu" for v in saved.values())
    restored = StreamingLinearCKA(3, 4, debiased=True)
    restored.load_state_dict(saved)
    restored.update([f[41:43] for f in feats_a], [f[41:43] for f in feats_b])
    restored.update([f[43:] for f in feats_a], [f[43:] for f in feats_b])
    np.testing.assert_allclose(restored.compute().numpy(), single.compute().numpy(), atol=1e-12)
    assert restored.n_batches == 5

    other = fed(StreamingLinearCKA(3, 4), layers(8, [3, 8, 6], 1), layers(8, DIMS_B, 1), [8])
    with pytest.raises(ShapeMismatchError, match="widths"):
        other.load_state_dict(saved)
    with pytest.raises(ShapeMismatchError, match="lacks"):
        StreamingLinearCKA(3, 4).load_state_dict({k: v for k, v in saved.items() if k != "cross"})
    restored.reset()
    assert restored.n_samples == 0
    with pytest.raises(InvalidInputError, match="at least 1 accumulated batch"):
        restored.compute()


def test_memory_budget_is_checked_before_allocating():
    dims_a, dims_b = [768] * 13, [1024] * 25
    needed = estimate_bytes(dims_a, dims_b)
    assert needed > 8 * sum(dims_a) * sum(dims_b)  # the cross-moment alone
    expected = rf"needs {needed / 2**30:.2f} GiB .* allows 512\.00 MiB.*fewer layers.*'minibatch'"
    with pytest.raises(MemoryBudgetError, match=expected):
        StreamingLinearCKA(13, 25, dims_a=dims_a, dims_b=dims_b, max_bytes=2**29)
    assert issubclass(MemoryBudgetError, MemoryError)

    lazy = StreamingLinearCKA(3, 4, max_bytes=estimate_bytes(DIMS_A, DIMS_B) - 1)
    with pytest.raises(MemoryBudgetError, match=r"needs \d+\.\d\d KiB .* allows \d+\.\d\d KiB"):
        lazy.update(layers(8, DIMS_A, 1), layers(8, DIMS_B, 1))
    assert lazy.n_samples == 0

    for dims_b, metric in ((DIMS_B, StreamingLinearCKA(3, 4)), (None, StreamingLinearCKA(3))):
        fed(metric, layers(8, DIMS_A, 1), None if dims_b is None else layers(8, dims_b, 1), [8])
        allocated = 8 * (metric._buffer.numel() + metric.shift_a.numel() + metric.shift_b.numel())
        if dims_b is None:
            allocated -= 8 * metric.shift_b.numel()  # the same tensor
        assert allocated <= estimate_bytes(DIMS_A, dims_b) <= 3 * allocated


def test_debiased_needs_four_samples_in_total_not_per_batch():
    feats_a, feats_b = layers(4, [3], 16), layers(4, [2], 17)
    metric = fed(StreamingLinearCKA(1, 1, debiased=True), feats_a, feats_b, [1, 2, 1])
    expected = functional.cka(feats_a[0], feats_b[0], debiased=True)
    assert float(metric.compute()) == pytest.approx(float(expected), abs=1e-10)
    short = fed(StreamingLinearCKA(1, 1, debiased=True), [feats_a[0][:3]], [feats_b[0][:3]], [1, 2])
    with pytest.raises(BatchTooSmallError, match="at least 4 samples in total, got 3"):
        short.compute()


def test_debiased_values_are_not_clamped():
    rng = np.random.default_rng(18)
    feats_a = [torch.from_numpy(rng.standard_normal((12, 3))) for _ in range(3)]
    feats_b = [torch.from_numpy(rng.standard_normal((12, 4))) for _ in range(3)]
    got = fed(StreamingLinearCKA(3, 3, debiased=True), feats_a, feats_b, [5, 7]).compute()
    assert (got < 0).any()
    np.testing.assert_allclose(got.numpy(), full_data(feats_a, feats_b, True).numpy(), atol=1e-10)


def test_input_errors_name_the_problem():
    feats_a, feats_b = layers(8, DIMS_A, 19), layers(8, DIMS_B, 20)
    metric = StreamingLinearCKA(3, 4, layer_names_b=["emb", "h.0", "h.1", "h.2"])
    poisoned = feats_b[2].clone()
    poisoned[3, 1] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="'h.1'"):
        metric.update(feats_a, feats_b[:2] + [poisoned, feats_b[3]])
    with pytest.raises(ShapeMismatchError, match="expected 4 feature tensors"):
        metric.update(feats_a, feats_b[:3])
    with pytest.raises(ShapeMismatchError, match="same samples"):
        metric.update(feats_a, [f[:5] for f in feats_b])
    metric.update(feats_a, feats_b)
    with pytest.raises(ShapeMismatchError, match="widths changed"):
        metric.update(layers(8, [3, 8, 6], 1), feats_b)
    with pytest.raises(BatchTooSmallError, match="at least one sample"):
        metric.update([f[:0] for f in feats_a], [f[:0] for f in feats_b])
    with pytest.raises(ShapeMismatchError, match="expected 4 widths"):
        StreamingLinearCKA(3, 4, dims_a=DIMS_A, dims_b=[1, 2])


def test_biased_estimator_warns_when_n_is_below_the_width():
    feats_a, feats_b = layers(20, [30], 21), layers(20, [4], 22)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimatorWarning)
        fed(StreamingLinearCKA(1, 1, debiased=True), feats_a, feats_b, [20]).compute()
        biased_dimension_warning(30, [30, 4])
    metric = fed(StreamingLinearCKA(1, 1), feats_a, feats_b, [20])
    with pytest.warns(EstimatorWarning, match=r"n=20 samples .* d=30") as record:
        metric.compute()
    with pytest.warns(EstimatorWarning, match="permutation_null") as direct:
        biased_dimension_warning(100, [64, 1000])
    assert record[0].filename == direct[0].filename == __file__  # points at the caller


def test_new_accumulator_picks_the_estimator():
    assert isinstance(new_accumulator("minibatch", 2, kernel="rbf"), MinibatchCKA)
    linear = new_accumulator("linear", 2, 3)
    debiased = new_accumulator("debiased", 2, 3, dims_a=[4, 4], dims_b=[1, 2, 3])
    assert isinstance(linear, StreamingLinearCKA) and not linear.debiased
    assert debiased.debiased and debiased.dims_b == [1, 2, 3]
    with pytest.raises(InvalidInputError, match="kernel='linear' only"):
        new_accumulator("debiased", 2, kernel="rbf")
    with pytest.raises(InvalidInputError, match="expected estimator in"):
        new_accumulator("exact", 2)  # type: ignore[arg-type]


def test_permutation_null_of_biased_cka_with_n_below_d_is_high():
    """Independent Gaussians, n=100, d=1000: biased linear CKA ~0.91, debiased ~0."""
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(100, 1000, generator=gen, dtype=torch.float64)
    y = torch.randn(100, 1000, generator=gen, dtype=torch.float64)
    assert 0.85 < float(functional.cka(x, y)) < 0.95
    with pytest.warns(EstimatorWarning):
        null = permutation_null([x], [y], estimator="linear", permutations=2, generator=gen)
    assert null.shape == (2, 1, 1)
    assert ((null > 0.85) & (null < 0.95)).all()
    debiased = permutation_null([x], [y], estimator="debiased", permutations=2, generator=gen)
    assert debiased.abs().max() < 0.05


def test_permutation_null_is_near_zero_even_for_related_layers():
    feats_a, feats_b = layers(400, [6, 10], 24), layers(400, [8], 25)
    real = full_data(feats_a, feats_b, True)
    assert (real > 0.3).all()
    named_a = {"enc.0": feats_a[0], "enc.1": feats_a[1]}
    gen = torch.Generator().manual_seed(26)
    null = permutation_null(named_a, feats_b, batch_size=64, permutations=4, generator=gen)
    assert null.shape == (4, 2, 1)
    assert null.mean(0).abs().max() < 0.02
    assert (null.std(0) > 0).all()
    again = permutation_null(named_a, feats_b, batch_size=64, permutations=4,
                             generator=torch.Generator().manual_seed(26))  # fmt: skip
    assert torch.equal(null, again)

    minibatch = permutation_null(feats_a, estimator="minibatch", batch_size=50, permutations=3,
                                 generator=gen)  # fmt: skip
    assert minibatch.shape == (3, 2, 2)  # self-similarity with the pairing broken
    assert minibatch.abs().max() < 0.05
    rbf = permutation_null(feats_a, feats_b, estimator="minibatch", kernel="rbf", threshold=0.5,
                           batch_size=100, permutations=2, generator=gen)  # fmt: skip
    assert rbf.abs().max() < 0.05
    with pytest.raises(ShapeMismatchError, match="same 400 samples"):
        permutation_null(feats_a, [feats_b[0][:399]])
    with pytest.raises(InvalidInputError, match="permutations >= 1"):
        permutation_null(feats_a, permutations=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_states_live_on_the_features_device():
    feats_a, feats_b = layers(97, DIMS_A, 27, offset=1e3), layers(97, DIMS_B, 28, offset=1e3)
    on_gpu = fed(StreamingLinearCKA(3, 4, debiased=True), [f.cuda() for f in feats_a],
                 [f.cuda() for f in feats_b])  # fmt: skip
    assert on_gpu.states["cross"].is_cuda
    got = on_gpu.compute()
    assert got.device.type == "cpu"
    expected = full_data(layers(97, DIMS_A, 27), layers(97, DIMS_B, 28), True)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-8)
    cpu = StreamingLinearCKA(3, 4, debiased=True)
    cpu.load_state_dict(on_gpu.state_dict())
    np.testing.assert_allclose(cpu.compute().numpy(), got.numpy(), atol=1e-12)
