"""Statistics on top of the accumulators: the permutation null and the standard-error stopping rule.

* :func:`permutation_null` shuffles the pairing of the samples and reruns an estimator: the values
  it gives for unrelated representations of this ``n`` and these widths (about 0 for the debiased
  and minibatch estimators, far above 0 for biased CKA when ``n`` is not much larger than ``d``).
* :func:`stderr_target_reached` is the rule by which ``compare(..., target_stderr=...)`` stops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .errors import InvalidInputError, ShapeMismatchError
from .functional import Kernel
from .metric import StderrAccumulator
from .streaming import Estimator, new_accumulator

Features = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def null_order(seed: int, batch_index: int, draw: int, n: int) -> torch.Tensor:
    """The sample order of permutation-null draw ``draw`` for global CKA batch ``batch_index``.

    Drawn by ``torch.randperm(n)`` from a generator seeded with
    ``seed * 1_000_003 + batch_index * 7919 + draw``, so a streamed run, a distributed one and
    a combination of stored fingerprints shuffle every batch the same way.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_index * 7919 + draw)
    return torch.randperm(n, generator=generator)


def permutation_null(
    features_a: Features,
    features_b: Features | None = None,
    *,
    estimator: Estimator = "debiased",
    batch_size: int | None = None,
    permutations: int = 5,
    generator: torch.Generator | None = None,
    kernel: Kernel = "linear",
    threshold: float = 1.0,
) -> torch.Tensor:
    """CKA of ``features_a`` against ``features_b`` with the sample pairing shuffled.

    Each permutation draws one random order of the samples and applies it to every B layer
    (the rows of A stay in place), then runs ``estimator`` exactly as a real comparison would:
    the exact estimators over all samples (``batch_size`` only bounds the memory of a step),
    ``"minibatch"`` over consecutive batches of ``batch_size`` (default: one batch of all
    samples). Shuffling destroys any dependence between the two sides, so the values show the
    floor an estimator reports for unrelated representations of this ``n`` and these widths:
    about 0 (within ``+-`` a few ``1/n``) for the debiased and minibatch estimators, and far above
    0 for biased CKA when ``n`` is not much larger than ``d``. ``values.mean(0)`` and
    ``values.std(0)`` summarise it per cell.

    Args:
        features_a: one ``(n, d)`` tensor per A layer (a list, or a dict such as
            ``AutoCKA.extract_features`` returns; its keys name the layers).
        features_b: the B layers for the same samples; ``None`` uses ``features_a``.
        estimator: ``"debiased"``, ``"linear"`` (biased) or ``"minibatch"``.
        batch_size: samples per ``update``.
        permutations: number of random pairings.
        generator: source of the permutations (seed it for reproducible values).
        kernel: kernel of the minibatch estimator.
        threshold: RBF bandwidth factor of the minibatch estimator.

    Returns:
        A float64 tensor ``(permutations, La, Lb)`` of null CKA values.
    """
    if permutations < 1:
        raise InvalidInputError(f"expected permutations >= 1, got {permutations}")
    names_a, feats_a = _named(features_a)
    names_b, feats_b = (names_a, feats_a) if features_b is None else _named(features_b)
    n = feats_a[0].shape[0]
    if any(f.shape[0] != n for f in feats_a + feats_b):
        raise ShapeMismatchError(
            f"every layer must hold the same {n} samples, got "
            f"{sorted({f.shape[0] for f in feats_a + feats_b})} rows"
        )
    step = n if batch_size is None else batch_size
    values = []
    for _ in range(permutations):
        order = torch.randperm(n, generator=generator)
        metric = new_accumulator(
            estimator, len(feats_a), len(feats_b), kernel=kernel, threshold=threshold,
            layer_names_a=names_a, layer_names_b=names_b,
        )  # fmt: skip
        for start in range(0, n, step):
            rows = order[start : start + step]
            metric.update([f[start : start + step] for f in feats_a], [f[rows] for f in feats_b])
        values.append(metric.compute())
    return torch.stack(values)


def _named(features: Features) -> tuple[list[str] | None, list[torch.Tensor]]:
    """Layer names (None for a list) and feature tensors of a list or a name -> tensor dict."""
    if isinstance(features, Mapping):
        return [str(k) for k in features], list(features.values())
    return None, list(features)


def stderr_target_reached(
    metric: StderrAccumulator, target_stderr: float, *, min_batches: int = 10
) -> bool:
    """Whether a ``compare(..., target_stderr=...)`` run may stop after the batches seen so far.

    True once ``metric`` holds at least ``min_batches`` batches and every defined cell's
    delta-method standard error (:meth:`MinibatchCKA.compute_stderr`) is at most
    ``target_stderr``. Cells of constant layers (non-finite standard error) are ignored. The
    minimum matters: with few batches the variance estimate is itself noisy, and stopping the
    first time it happens to be small would make the intervals too narrow.
    """
    if target_stderr <= 0:
        raise InvalidInputError(f"expected target_stderr > 0, got {target_stderr}")
    if metric.n_batches < max(min_batches, 2):
        return False
    stderr = metric.compute_stderr()
    defined = stderr[torch.isfinite(stderr)]
    return bool((defined <= target_stderr).all())
