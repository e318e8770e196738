"""Statistical validity: coverage of the minibatch standard errors, the stopping rule, RBF CKA.

The synthetic model has a closed-form population CKA. Every layer is a linear map of one latent
``x ~ N(0, I_p)`` plus independent noise, ``f_l = x W_l + s_l e_l``, so the population
cross-covariances are ``S_lm = W_l^T W_m`` (``l != m``) and ``S_ll = W_l^T W_l + s_l^2 I``. For
the linear kernel the population HSIC is ``||S_lm||_F^2``, which each batch's unbiased HSIC
estimates without bias, so minibatch CKA (a ratio of mean batch HSICs) targets

    CKA_lm = ||S_lm||_F^2 / (||S_ll||_F ||S_mm||_F).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_cka import MinibatchCKA, functional
from hf_cka.errors import InvalidInputError
from hf_cka.statistics import stderr_target_reached

LATENT = 4
LAYERS_A, LAYERS_B = ("x", "z"), ("y1", "y2")
NOISE = {"x": 0.0, "z": 1.0, "y1": 0.5, "y2": 1.5}


@pytest.fixture(scope="module")
def maps() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    widths = {"z": 6, "y1": 3, "y2": 5}
    out = {"x": torch.eye(LATENT, dtype=torch.float64)}
    for name, width in widths.items():
        out[name] = torch.randn(LATENT, width, generator=gen, dtype=torch.float64)
    return out


def population_cka(maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(2, 2)`` closed-form CKA of the A layers against the B layers."""

    def cov(a: str, b: str) -> torch.Tensor:
        c = maps[a].T @ maps[b]
        return c + NOISE[a] ** 2 * torch.eye(c.shape[0], dtype=torch.float64) if a == b else c

    def cka(a: str, b: str) -> float:
        return float(cov(a, b).square().sum() / (cov(a, a).norm() * cov(b, b).norm()))

    return torch.tensor([[cka(a, b) for b in LAYERS_B] for a in LAYERS_A], dtype=torch.float64)


def draw(maps, n: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One batch of ``n`` samples: the A and B layer features."""
    x = torch.randn(n, LATENT, generator=gen, dtype=torch.float64)
    feats = {
        name: x @ w + NOISE[name] * torch.randn(n, w.shape[1], generator=gen, dtype=torch.float64)
        for name, w in maps.items()
    }
    return [feats[a] for a in LAYERS_A], [feats[b] for b in LAYERS_B]


def covered(metric: MinibatchCKA, truth: torch.Tensor) -> torch.Tensor:
    """Whether each cell's nominal 95% interval ``cka +- 1.96 stderr`` holds the truth."""
    return ((metric.compute() - truth).abs() <= 1.96 * metric.compute_stderr()).double()


def test_population_values_are_distinct_and_inside_the_unit_interval(maps):
    truth = population_cka(maps)
    assert ((truth > 0.2) & (truth < 0.7)).all()
    assert truth.flatten().unique().numel() == 4


@pytest.mark.parametrize(
    "sizes", [[64] * 20, [32, 96, 48, 80] * 5], ids=["equal-batches", "unequal-batches"]
)
def test_delta_method_interval_covers_the_population_value(maps, sizes):
    """200 seeded repeats of 20 batches: each cell's 95% interval covers in 85-100% of them.

    Measured with 2000 repeats of 20 batches of 64: 93-94% per cell (the normal quantile with
    20 batches is slightly liberal; Student's t with 19 d.o.f. would give 2.09).
    """
    truth = population_cka(maps)
    repeats, hits, estimates = 200, torch.zeros(2, 2, dtype=torch.float64), []
    for seed in range(repeats):
        gen = torch.Generator().manual_seed(1000 + seed)
        metric = MinibatchCKA(2, 2)
        for n in sizes:
            metric.update(*draw(maps, n, gen))
        hits += covered(metric, truth)
        estimates.append(metric.compute())
    coverage = hits / repeats
    assert ((coverage >= 0.85) & (coverage <= 1.0)).all(), coverage
    # the estimator is centred on the closed form (bias well below its spread)
    spread = torch.stack(estimates).std(0)
    assert ((torch.stack(estimates).mean(0) - truth).abs() < 0.25 * spread).all()


def test_stopping_at_a_target_stderr_keeps_coverage(maps):
    truth = population_cka(maps)
    repeats, target, cap = 150, 0.02, 200
    hits, used = torch.zeros(2, 2, dtype=torch.float64), []
    for seed in range(repeats):
        gen = torch.Generator().manual_seed(5000 + seed)
        metric = MinibatchCKA(2, 2)
        while metric.n_batches < cap:
            metric.update(*draw(maps, 64, gen))
            if stderr_target_reached(metric, target):
                break
        assert (metric.compute_stderr() <= target).all()
        hits += covered(metric, truth)
        used.append(metric.n_batches)
    assert min(used) >= 10  # the default min_batches
    assert max(used) < cap
    assert (hits / repeats >= 0.85).all(), hits / repeats


def test_stopping_rule_waits_for_min_batches_and_ignores_constant_layers():
    gen = torch.Generator().manual_seed(7)
    batch = [torch.randn(16, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    metric = MinibatchCKA(2)
    for _ in range(3):
        metric.update(batch)  # identical batches: the stderr is ~0 already
    assert float(metric.compute_stderr().max()) < 1e-6
    assert not stderr_target_reached(metric, 0.01)
    assert stderr_target_reached(metric, 0.01, min_batches=3)

    with_constant = MinibatchCKA(2, 2)
    for _ in range(4):
        feats = [torch.randn(16, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
        with_constant.update(feats[:2], [feats[2], torch.ones(16, 2, dtype=torch.float64)])
    stderr = with_constant.compute_stderr()
    assert not torch.isfinite(stderr[:, 1]).any()
    finite = float(stderr[:, 0].max())
    assert stderr_target_reached(with_constant, finite * 1.01, min_batches=4)
    assert not stderr_target_reached(with_constant, finite * 0.99, min_batches=4)
    with pytest.raises(InvalidInputError, match="target_stderr > 0"):
        stderr_target_reached(with_constant, 0.0)


@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
def test_rbf_minibatch_on_one_batch_equals_debiased_full_data_rbf_cka(threshold):
    rng = np.random.default_rng(8)
    latent = rng.standard_normal((40, 3))
    feats_a, feats_b = (
        [torch.from_numpy(latent @ rng.standard_normal((3, d)) + rng.standard_normal((40, d)))
         for d in dims]
        for dims in ((2, 7, 4), (5, 3))
    )  # fmt: skip
    cross = MinibatchCKA(3, 2, kernel="rbf", threshold=threshold)
    cross.update(feats_a, feats_b)
    own = MinibatchCKA(3, kernel="rbf", threshold=threshold)
    own.update(feats_a)
    for metric, others in ((cross, feats_b), (own, feats_a)):
        expected = [
            [float(functional.cka(x, y, kernel="rbf", debiased=True, threshold=threshold))
             for y in others]
            for x in feats_a
        ]  # fmt: skip
        np.testing.assert_allclose(metric.compute().numpy(), expected, rtol=0, atol=1e-10)
    linear = MinibatchCKA(3, 2)
    linear.update(feats_a, feats_b)
    assert (cross.compute() - linear.compute()).abs().max() > 1e-3  # the kernel mattered
