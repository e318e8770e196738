"""From accumulated metrics to results: a ``CKAResult`` with its provenance, a ``DriftResult``.

Both ways to a result end here -- the single stream of :mod:`hf_cka.runner` (:func:`compare_all`)
and the combine phase of :mod:`hf_cka.combine` (:func:`to_result`) -- so a result has the same
matrix, standard errors, null and metadata (:class:`~hf_cka.provenance.Provenance`) whichever
way it was computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .errors import EstimatorWarning
from .logging import warn
from .metric import MinibatchCKA
from .options import RunOptions
from .provenance import ESTIMATOR_LABELS, DataProvenance, Provenance, library_versions
from .runner import Accumulated, Comparison, run_comparisons
from .tokens import HubToken

if TYPE_CHECKING:
    from .drift import DriftResult
    from .result import CKAResult


def compare_all(
    comparisons: list[Comparison],
    data: Any,
    options: RunOptions,
    token: HubToken,
) -> list[CKAResult]:
    """Run the comparisons over ``data`` in one stream and wrap each in a ``CKAResult``."""
    outcome = run_comparisons(comparisons, data, options, token=token)
    versions = library_versions()
    results = []
    for comparison, accumulated in zip(comparisons, outcome.accumulated, strict=True):
        metric = accumulated.metric
        provenance = Provenance(
            model_a=comparison.model_a.provenance(),
            model_b=comparison.model_b.provenance(),
            dtype=dtype_label(comparison.model_a.dtype, comparison.model_b.dtype),
            pooling=options.pooling,
            data=DataProvenance.from_dict(outcome.data_info),
            n_samples=metric.n_samples,
            n_batches=metric.n_batches,
            num_processes=distributed.num_processes(),
            batch_size=options.batch_size,
            max_length=options.max_length,
            sort_by_length=options.sort_by_length,
            target_stderr=options.target_stderr,
            stopped_early=outcome.stopped_early,
            wall_time_s=outcome.wall_time_s,
            versions=versions,
            **measure_fields(options),
        )
        results.append(to_result(accumulated, comparison.layers_a, comparison.layers_b, provenance))
    return results


def measure_fields(options: RunOptions) -> dict[str, Any]:
    """The :class:`~hf_cka.provenance.Provenance` fields that ``options`` fix for what is
    computed from the features: the measure, CKA's estimator and kernel, and the nulls."""
    cka = options.measure == "cka"
    return {
        "estimator": ESTIMATOR_LABELS[options.estimator] if cka else None,
        "measure": options.measure,
        "measure_params": dict(options.measure_params),
        "kernel": options.kernel,
        "threshold": options.threshold if options.kernel == "rbf" else None,
        "null_permutations": options.null_permutations,
    }


def to_result(
    accumulated: Accumulated, layers_a: list[str], layers_b: list[str], provenance: Provenance
) -> CKAResult:
    """The ``CKAResult`` of a finished accumulation: its matrix, standard errors (see
    :func:`stderr_of`), permutation null and ``provenance`` (which names the models)."""
    from .result import CKAResult

    return CKAResult(
        matrix=accumulated.metric.compute(),
        layers_a=list(layers_a),
        layers_b=list(layers_b),
        model_a=str(provenance.model_a.name),
        model_b=str(provenance.model_b.name),
        metadata=provenance.to_dict(),
        stderr=stderr_of(accumulated),
        null=accumulated.null_matrix(),
    )


def drift_result(base: str, checkpoints: list[str], results: list[CKAResult]) -> DriftResult:
    """The ``DriftResult`` of base-vs-checkpoint runs; its metadata is what they share."""
    from .drift import DriftResult

    return DriftResult(
        base=base,
        checkpoints=checkpoints,
        results=results,
        metadata=Provenance.from_dict(results[0].metadata).drift_dict(),
    )


def stderr_of(accumulated: Accumulated) -> torch.Tensor | None:
    """Standard errors of a minibatch estimate, or ``None``: the exact estimators and the
    full-data measures have none, and fewer than two batches cannot give one (a warning says
    so)."""
    if not isinstance(accumulated.metric, MinibatchCKA):
        return None
    if accumulated.metric.n_batches >= 2:
        return accumulated.metric.compute_stderr()
    warn(
        "only one batch was accumulated, so no standard error can be estimated; use a smaller "
        "batch_size or more data to get error bars",
        EstimatorWarning,
        stacklevel=4,
    )
    return None


def dtype_label(dtype_a: str | None, dtype_b: str | None) -> str | None:
    """One dtype, or ``"a/b"`` when the two sides differ (``float32/bfloat16``)."""
    return dtype_a if dtype_a == dtype_b else f"{dtype_a}/{dtype_b}"
