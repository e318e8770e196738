"""The accumulator contract (``hf_cka.metric.Accumulator``), checked on every accumulator.

Like torchmetrics' class tester: each accumulator is fed the same batches and must give what the
math says (the NumPy oracle), whatever the batching where its estimator is batching-free, and
``merge``, ``sync``, ``state_dict``/``load_state_dict``, ``reset`` and ``n_batches`` must agree
with plain sequential updates -- also when the halves fixed different scale exponents.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import oracle
import pytest
import torch

from hf_cka import MinibatchCKA
from hf_cka.errors import (
    BatchTooSmallError,
    InvalidInputError,
    NonFiniteActivationError,
    ShapeMismatchError,
)
from hf_cka.metric import Accumulator
from hf_cka.streaming import StreamingLinearCKA

DIMS_A, DIMS_B = [3, 7], [4, 2, 5]
SIZES = [12, 9, 12, 15]  # 48 samples; every batch has >= 4 (the minibatch estimator needs it)


@dataclass(frozen=True)
class Case:
    """One accumulator configuration and what the oracle says it computes."""

    name: str
    make: Callable[[int, int | None], Accumulator]
    batching_free: bool  # the value does not depend on how the samples are batched
    oracle_kwargs: dict
    sync_calls: int  # all-reduce calls of a sync where every process has the same exponents

    def expected(self, batches_a, batches_b) -> np.ndarray:
        """The oracle's ``(La, Lb)`` matrix for these batches (``batches[b][layer]``)."""
        if not self.batching_free:
            return oracle.minibatch_cka(batches_a, batches_b, **self.oracle_kwargs)
        whole_a = [np.concatenate(layer) for layer in zip(*batches_a, strict=True)]
        whole_b = [np.concatenate(layer) for layer in zip(*batches_b, strict=True)]
        return np.array(
            [[oracle.cka(x, y, **self.oracle_kwargs) for y in whole_b] for x in whole_a]
        )


CASES = [
    Case("minibatch-linear", lambda la, lb: MinibatchCKA(la, lb), False, {}, 1),
    Case(
        "minibatch-rbf",
        lambda la, lb: MinibatchCKA(la, lb, kernel="rbf", threshold=0.8),
        False,
        {"kernel": "rbf", "threshold": 0.8},
        1,
    ),
    Case("streaming-linear", lambda la, lb: StreamingLinearCKA(la, lb), True, {}, 2),
    Case(
        "streaming-debiased",
        lambda la, lb: StreamingLinearCKA(la, lb, debiased=True),
        True,
        {"debiased": True},
        2,
    ),
]


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> Case:
    return request.param


# (scale, late_scale) of data(): 2^28 and 2^31 straddle the boundary between the scale exponents
# 0 and 64 (SCALE_STEP), so the halves fix different exponents with values of similar size
SAME_SCALE, SCALES_DIFFER = (1.0, 1.0), (2.0**28, 2.0**3)
SCALINGS = pytest.mark.parametrize(
    "scaling", [SAME_SCALE, SCALES_DIFFER], ids=["same-scale", "scales-differ"]
)


def data(
    sizes: list[int] = SIZES, seed: int = 0, scaling: tuple[float, float] = SAME_SCALE
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Batches ``out[b][layer]`` of float64 layers mapping one latent (pairs are related).

    Every value is multiplied by ``scaling[0]``, and those of the batches from the third on also
    by ``scaling[1]`` (powers of two keep the data exact), so that accumulators fed the two
    halves can fix different scale exponents.
    """
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    latent = rng.standard_normal((n, 5))
    scale, late_scale = scaling
    weights = scale * np.where(np.arange(n) >= sum(sizes[:2]), late_scale, 1.0)[:, None]
    make = lambda d: torch.from_numpy(  # noqa: E731
        weights * (latent @ rng.standard_normal((5, d)) + rng.standard_normal((n, d)))
    )
    side_a, side_b = [make(d) for d in DIMS_A], [make(d) for d in DIMS_B]
    cut = lambda side: [list(b) for b in zip(*(f.split(sizes) for f in side), strict=True)]  # noqa: E731
    return cut(side_a), cut(side_b)


def fed(metric: Accumulator, batches_a, batches_b=None) -> Accumulator:
    for b, feats in enumerate(batches_a):
        metric.update(feats, None if batches_b is None else batches_b[b])
    return metric


def as_numpy(batches):
    return [[f.numpy() for f in batch] for batch in batches]


def close(got: Accumulator, expected: Accumulator | np.ndarray, rtol: float = 1e-10) -> None:
    other = expected if isinstance(expected, np.ndarray) else expected.compute().numpy()
    np.testing.assert_allclose(got.compute().numpy(), other, rtol=rtol, atol=1e-12)


def test_every_accumulator_meets_the_protocol(case):
    metric = case.make(2, 3)
    assert isinstance(metric, Accumulator)
    assert (metric.num_layers_a, metric.num_layers_b, metric.self_similarity) == (2, 3, False)
    assert case.make(2, None).self_similarity


def test_batches_give_what_the_math_says(case):
    batches_a, batches_b = data()
    metric = fed(case.make(2, 3), batches_a, batches_b)
    assert (metric.n_batches, metric.n_samples) == (len(SIZES), sum(SIZES))
    close(metric, case.expected(as_numpy(batches_a), as_numpy(batches_b)))
    if case.batching_free:  # one update of everything == the same samples in batches
        whole_a, whole_b = data([sum(SIZES)])
        close(fed(case.make(2, 3), whole_a, whole_b), metric)


@SCALINGS
@pytest.mark.parametrize("self_similarity", [False, True], ids=["pair", "self"])
def test_merge_equals_sequential_updates(case, scaling, self_similarity):
    batches_a, batches_b = data(scaling=scaling)
    lb = None if self_similarity else 3
    side_b = None if self_similarity else batches_b
    sequential = fed(case.make(2, lb), batches_a, side_b)
    first = fed(case.make(2, lb), batches_a[:2], None if side_b is None else side_b[:2])
    second = fed(case.make(2, lb), batches_a[2:], None if side_b is None else side_b[2:])
    assert torch.equal(first.exponents_a, second.exponents_a) == (scaling == SAME_SCALE)
    before = second.compute().clone()
    merged = first.merge(second)
    assert merged is first
    assert merged.n_batches == sequential.n_batches == len(SIZES)
    close(merged, sequential)
    assert torch.equal(second.compute(), before)  # the merged-in accumulator is untouched
    close(case.make(2, lb).merge(second), second)  # into an empty one
    close(second.merge(case.make(2, lb)), before.numpy())  # an empty one in
    with pytest.raises(ShapeMismatchError, match="cannot merge"):
        first.merge(case.make(3, 3))


class FakeProcessGroup:
    """``world`` threads that sum their tensors like ``torch.distributed.all_reduce``."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def all_reduce_sum(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(flat: torch.Tensor) -> torch.Tensor:
            assert flat.dim() == 1 and flat.dtype == torch.float64
            self.calls[rank] += 1
            self.slots[rank] = flat.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())  # same order on every rank
            self.barrier.wait()  # nobody overwrites a slot before all have read it
            return total

        return reduce

    def run(self, ranks: list[Accumulator]) -> None:
        """``sync`` every rank in its own thread."""
        threads = [
            threading.Thread(target=rank.sync, args=(self.all_reduce_sum(r),))
            for r, rank in enumerate(ranks)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)


def test_sync_with_an_identity_all_reduce_changes_nothing(case):
    batches_a, batches_b = data()
    metric = fed(case.make(2, 3), batches_a, batches_b)
    before = metric.compute().clone()
    metric.sync(lambda flat: flat)
    assert metric.n_batches == len(SIZES)
    close(metric, before.numpy(), rtol=0)


@SCALINGS
def test_sync_over_fake_processes_equals_sequential_updates(case, scaling):
    """Rank 0 takes the first two batches, rank 1 the rest (other magnitudes when the scales
    differ: then the exponents are agreed on first), rank 2 none."""
    batches_a, batches_b = data(scaling=scaling)
    sequential = fed(case.make(2, 3), batches_a, batches_b)
    lazy = case.make(2, 3)
    if isinstance(lazy, StreamingLinearCKA):  # a rank without batches must know the widths
        lazy = StreamingLinearCKA(2, 3, debiased=lazy.debiased, dims_a=DIMS_A[:2], dims_b=DIMS_B)
    ranks = [
        fed(case.make(2, 3), batches_a[:2], batches_b[:2]),
        fed(case.make(2, 3), batches_a[2:], batches_b[2:]),
        lazy,
    ]
    differ = not torch.equal(ranks[0].exponents_a, ranks[1].exponents_a)
    assert differ == (scaling == SCALES_DIFFER)
    group = FakeProcessGroup(3)
    group.run(ranks)
    assert len(set(group.calls)) == 1  # every rank made the same collective calls
    # ranks that fixed different exponents need one more call after agreeing on common ones
    assert group.calls[0] == case.sync_calls + differ
    for rank in ranks:
        assert rank.n_batches == len(SIZES)
        close(rank, sequential)


def test_state_dict_round_trip_and_resume(case):
    batches_a, batches_b = data(scaling=SCALES_DIFFER)
    full = fed(case.make(2, 3), batches_a, batches_b)
    head = fed(case.make(2, 3), batches_a[:2], batches_b[:2])
    saved = head.state_dict()
    assert all(value.device.type == "cpu" for value in saved.values())
    resumed = case.make(2, 3)
    resumed.load_state_dict(saved)
    assert resumed.n_batches == 2
    assert torch.equal(resumed.compute(), head.compute())
    close(fed(resumed, batches_a[2:], batches_b[2:]), full)
    with pytest.raises(ShapeMismatchError):
        case.make(3, 3).load_state_dict(saved)


def test_reset_forgets_every_batch_and_the_scale(case):
    batches_a, batches_b = data()
    metric = fed(case.make(2, 3), [[2.0**200 * f for f in b] for b in batches_a], batches_b)
    metric.reset()
    assert metric.n_batches == metric.n_samples == 0
    with pytest.raises(InvalidInputError, match="at least 1 accumulated batch"):
        metric.compute()
    close(fed(metric, batches_a, batches_b), fed(case.make(2, 3), batches_a, batches_b), rtol=0)


@pytest.mark.parametrize(
    ("make_bad", "error", "match"),
    [
        (lambda x: x.to(torch.complex128), InvalidInputError, "real floating-point"),
        (lambda x: x.round().to(torch.int64), InvalidInputError, r"\.float\(\) or \.double\(\)"),
        (lambda x: x > 0, InvalidInputError, "floating-point"),
        (lambda x: x[:0], BatchTooSmallError, "at least one sample"),
        (lambda x: x[:, :0], ShapeMismatchError, "at least one feature"),
        (lambda x: x.index_fill(0, torch.tensor([2]), float("inf")), NonFiniteActivationError,
         r"'B\[1\]'"),
    ],
    ids=["complex", "integer", "bool", "no-sample", "no-feature", "inf"],
)  # fmt: skip
def test_bad_features_are_refused_with_a_typed_error(case, make_bad, error, match):
    batches_a, batches_b = data()
    metric = case.make(2, 3)
    bad_b = [batches_b[0][0], make_bad(batches_b[0][1]), batches_b[0][2]]
    if match == "at least one sample":
        batches_a[0] = [f[:0] for f in batches_a[0]]
        bad_b = [f[:0] for f in batches_b[0]]
    with pytest.raises(error, match=match):
        metric.update(batches_a[0], bad_b)
    assert metric.n_batches == 0
    close(fed(metric, batches_a[1:], batches_b[1:]), fed(case.make(2, 3), batches_a[1:],
          batches_b[1:]), rtol=0)  # fmt: skip


def test_a_batch_far_beyond_the_first_batchs_scale_is_named(case):
    """The scale is fixed by the first batch; a later batch 2^1000 times larger would overflow
    the float64 states: a typed error says so instead of blaming NaN activations (or, for the
    RBF kernel, whose Gram diagonal is always 1, instead of a silent NaN)."""
    batches_a, batches_b = data()
    metric = fed(case.make(2, 3), batches_a[:1], batches_b[:1])
    huge = [2.0**1000 * f for f in batches_b[1]]
    with pytest.raises(NonFiniteActivationError, match=r"'B\[0\]' has activations up to .*e\+30"):
        metric.update(batches_a[1], huge)
    assert metric.n_batches == 1
    close(fed(metric, batches_a[1:], batches_b[1:]), fed(case.make(2, 3), batches_a, batches_b))
