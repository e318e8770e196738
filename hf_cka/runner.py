"""Streaming orchestration: data -> paired per-model features -> accumulators.

Data flow per run: samples -> global CKA batches (round-robin over processes) -> chunks of a few
batches -> per model: encode once, forward in length-sorted sub-batches, pool inside the hooks,
put the pooled rows back in sample order -> split into the CKA batches -> accumulators.
Sorting by length only changes which padded forward batches run, never which samples form a CKA
minibatch; mask-aware pooling ignores the padding, so the result equals the unsorted run up to
the float rounding of the features (padded matrix products sum in another order): about 1e-8
with float32 weights, 1e-15 with float64 (see docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import distributed
from .capture import Extractor
from .checkpoint import RunCheckpoint, fingerprint, model_identity
from .data import PairedColumn, batch_samples, load_samples
from .encoding import same_tokens
from .errors import InvalidInputError, TokenizerMismatchError
from .fulldata import FullDataMeasure
from .measures import estimate_bytes, mutual_knn
from .metric import Accumulator, compute_quietly
from .models import LoadedModel
from .options import RunOptions
from .progress import Progress
from .statistics import null_order, stderr_target_reached
from .streaming import new_accumulator
from .tokens import HubToken


@dataclass
class Comparison:
    """One model pair and its layers; several comparisons may share a model (drift).

    With paired data, ``column_a`` and ``column_b`` name the column each side reads.
    """

    model_a: LoadedModel
    model_b: LoadedModel
    layers_a: list[str]
    layers_b: list[str]
    column_a: str | None = None
    column_b: str | None = None

    @property
    def self_similarity(self) -> bool:
        return (
            self.model_a is self.model_b
            and self.layers_a == self.layers_b
            and self.column_a == self.column_b
        )

    @property
    def sides(self) -> tuple[tuple[LoadedModel, list[str], str | None], ...]:
        """``(model, layers, column)`` of side A and side B."""
        return (
            (self.model_a, self.layers_a, self.column_a),
            (self.model_b, self.layers_b, self.column_b),
        )

    def new_metric(self, options: RunOptions, *, paired: bool = False) -> Accumulator:
        """A fresh accumulator; ``paired`` forces two sides even for a self-comparison."""
        two_sided = paired or not self.self_similarity
        widths = options.pooling != "flatten"  # flattened features are tokens x hidden wide
        return new_metric(
            options,
            self.layers_a,
            self.layers_b if two_sided else None,
            dims_a=self.model_a.feature_widths(self.layers_a) if widths else None,
            dims_b=self.model_b.feature_widths(self.layers_b) if widths and two_sided else None,
        )


def new_metric(
    options: RunOptions,
    layers_a: Sequence[str],
    layers_b: Sequence[str] | None,
    *,
    dims_a: Sequence[int] | None = None,
    dims_b: Sequence[int] | None = None,
) -> Accumulator:
    """The accumulator ``options`` ask for (:func:`hf_cka.streaming.new_accumulator`) over the
    named layers; ``layers_b=None`` compares side A with itself; ``dims_*``: layer widths."""
    return new_accumulator(
        options.estimator,
        len(layers_a),
        None if layers_b is None else len(layers_b),
        kernel=options.kernel,
        threshold=options.threshold,
        max_bytes=options.max_bytes,
        dims_a=dims_a,
        dims_b=dims_b,
        measure=options.measure,
        measure_params=options.measure_params,
        layer_names_a=layers_a,
        layer_names_b=layers_a if layers_b is None else layers_b,
    )


@dataclass
class Accumulated:
    """What one comparison accumulated: the CKA metric and the permutation-null metrics."""

    metric: Accumulator
    nulls: list[Accumulator]

    def accumulators(self) -> list[Accumulator]:
        return [self.metric, *self.nulls]

    def null_matrix(self) -> torch.Tensor | None:
        """Mean CKA over the permutation nulls (``None`` when none were run)."""
        if not self.nulls:
            return None
        return torch.stack([null.compute() for null in self.nulls]).mean(dim=0)


@dataclass
class RunOutcome:
    accumulated: list[Accumulated]
    data_info: dict[str, Any]
    stopped_early: bool  # the target standard error was reached before the data ran out
    wall_time_s: float


def _chunks(
    batches: Iterable[list[Any]],
    chunk_batches: int,
    skip: int = 0,
    seen: Callable[[list[Any]], None] | None = None,
) -> Iterator[list[tuple[int, list[Any]]]]:
    """This process's CKA batches as ``(global_index, batch)``, ``chunk_batches`` at a time.

    Batches are sharded round-robin over processes; the first ``skip`` batches of this process
    (already accumulated by a resumed checkpoint) are passed over without a forward pass.
    ``seen`` is called with every batch of this process, skipped or not, in order.
    """
    chunk: list[tuple[int, list[Any]]] = []
    own = 0
    for index, batch in enumerate(batches):
        if not distributed.shard(index):
            continue
        own += 1
        if seen is not None:
            seen(batch)
        if own <= skip:
            continue
        chunk.append((index, batch))
        if len(chunk) == chunk_batches:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stream(
    extractors: Sequence[Extractor],
    chunks: Iterable[list[tuple[int, list[Any]]]],
    *,
    batch_size: int,
    max_length: int | None,
    sort_by_length: bool,
    progress: Progress,
) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """Per CKA batch: its global index and one ``{layer: features}`` dict per extractor.

    Every extractor encodes the same samples with its own preprocessor and runs ONE forward pass
    per forward batch, however many comparisons use its features.
    """
    for chunk in chunks:
        samples = [sample for _, batch in chunk for sample in batch]
        sizes = [len(batch) for _, batch in chunk]
        progress.start_chunk(len(chunk), len(samples) * len(extractors))
        per_model, first_encoding = [], None
        for extractor in extractors:
            encodings = extractor.encode(samples, max_length)
            if extractor.pooling == "tokens":
                first_encoding = first_encoding or encodings
                if not same_tokens(first_encoding, encodings):
                    raise TokenizerMismatchError(
                        "pooling='tokens' needs identical tokenization, but the tokenizers split "
                        "these texts differently; use pooling='mean' (or 'last', 'max', 'first')"
                    )
            per_model.append(extractor.chunk_features(encodings, sizes, batch_size, sort_by_length))
        progress.end_chunk()
        for position, (index, _) in enumerate(chunk):
            yield index, [features[position] for features in per_model]


def run_comparisons(
    comparisons: Sequence[Comparison],
    data: Any,
    options: RunOptions,
    *,
    token: HubToken = None,
) -> RunOutcome:
    """Stream ``data`` once through every distinct model and accumulate each comparison.

    Each distinct model gets one extractor hooking every layer any comparison needs from it, so
    a model shared by several comparisons (the base of a drift, or a self-comparison) runs one
    forward pass per batch. With ``options.null_permutations = k`` every comparison also
    accumulates k permutation nulls: model B's rows are shuffled within each batch (a fixed
    generator seeded by ``seed`` and the global batch index, so a distributed run draws the same
    permutations). With ``options.target_stderr`` a process stops once every defined cell's
    standard error on its own batches is below the target. With ``options.checkpoint_dir`` the
    sums are saved every ``checkpoint_every`` batches and on any interruption, and a rerun
    resumes from them.
    """
    started = time.perf_counter()
    if options.paired:
        comparisons = [
            replace(c, column_a=options.column_a, column_b=options.column_b) for c in comparisons
        ]
    first = comparisons[0]
    if options.measure != "cka" and distributed.num_processes() > 1:
        raise InvalidInputError(
            f"measure={options.measure!r} needs every sample in one process (it is computed "
            f"once over all the pooled features), got {distributed.num_processes()} processes; "
            "run it in one process; or one model at a time, AutoCKA.grid([model_a, model_b], "
            "data, measure=...) (hf-cka grid A B --measure ...), whose extraction the "
            "processes share; or use measure='cka', which streams"
        )
    # one extractor per distinct (model, column): a model reading two columns runs on both
    layers_by_model: dict[tuple[int, str | None], tuple[LoadedModel, list[str], str | None]] = {}
    for comparison in comparisons:
        for loaded, layers, column in comparison.sides:
            key = (id(loaded), column)
            layers_by_model.setdefault(key, (loaded, [], column))[1].extend(layers)
    check_max_length([loaded for loaded, _, _ in layers_by_model.values()], options.max_length)
    paired: list[PairedColumn] = []
    if options.column_a is not None and options.column_b is not None:
        paired = [
            PairedColumn("column_a", options.column_a, first.model_a.modality),
            PairedColumn("column_b", options.column_b, first.model_b.modality),
        ]
    samples, data_info = load_samples(
        data,
        num_samples=options.num_samples,
        modality=first.model_a.modality,
        token=token,
        text_column=options.text_column,
        dataset_config=options.dataset_config,
        split=options.split,
        paired=paired,
    )
    check_full_data(comparisons, data_info.get("size"), options)
    batches = batch_samples(samples, options.batch_size)
    slots = {key: slot for slot, key in enumerate(layers_by_model)}
    accumulated = [
        Accumulated(
            c.new_metric(options),
            [c.new_metric(options, paired=True) for _ in range(options.null_permutations)],
        )
        for c in comparisons
    ]
    all_accumulators = [acc for item in accumulated for acc in item.accumulators()]
    run_fingerprint = "" if not options.checkpoint_dir else fingerprint(  # hashes weights
        {
            "models": [
                (c.model_a.name, model_identity(c.model_a), c.model_b.name,
                 model_identity(c.model_b), c.layers_a, c.layers_b) for c in comparisons
            ],
            "data": {k: v for k, v in data_info.items() if k != "size"},
            "options": options.resume_key(),
            "num_processes": distributed.num_processes(),
        }
    )  # fmt: skip
    checkpoint = RunCheckpoint(
        options.checkpoint_dir,
        distributed.process_index(),
        all_accumulators,
        run_fingerprint,
        options.checkpoint_every,
    )
    done = checkpoint.resume()
    total = _expected_batches(data_info.get("size"), options.batch_size)
    stopped_early = False
    with contextlib.ExitStack() as stack:
        extractors = [
            stack.enter_context(Extractor(loaded, layers, options.pooling, column))
            for loaded, layers, column in layers_by_model.values()
        ]
        progress = stack.enter_context(
            # one hook per module: a model reading two columns has two extractors on one module
            Progress(
                list(dict.fromkeys(e.forward_module for e in extractors)),
                total,
                options.progress,
                done,
            )
        )
        stream = _stream(
            extractors,
            _chunks(batches, options.chunk_batches, skip=done, seen=checkpoint.record),
            batch_size=options.batch_size,
            max_length=options.max_length,
            sort_by_length=options.sort_by_length,
            progress=progress,
        )
        try:
            for index, features in stream:
                for comparison, item in zip(comparisons, accumulated, strict=True):
                    _update(comparison, item, features, slots, options.seed, index)
                done += 1
                if options.callback is not None:
                    options.callback(done, total or -1, _current(accumulated[0].metric))
                checkpoint.step(done)
                if options.target_stderr is not None and all(
                    stderr_target_reached(item.metric, options.target_stderr)  # type: ignore[arg-type]
                    for item in accumulated
                ):
                    stopped_early = True
                    break
        except BaseException:
            checkpoint.save(done)  # every update so far is complete: keep it
            raise
        progress.finish(done)
    checkpoint.verify()  # also when the checkpoint had already covered every batch
    for accumulator in all_accumulators:
        accumulator.sync(distributed.all_reduce_sum)
    return RunOutcome(accumulated, data_info, stopped_early, time.perf_counter() - started)


def check_max_length(models: Iterable[LoadedModel], max_length: int | None) -> None:
    """Refuse a ``max_length`` that a text model's special tokens alone would fill.

    Tokenizers silently ignore such a ``max_length`` (BERT keeps the whole text at 1) or leave
    nothing but special tokens, so the result would not be what the metadata says.
    """
    if max_length is None:
        return
    for loaded in models:
        count = getattr(loaded.processor, "num_special_tokens_to_add", None)
        special = count() if loaded.modality == "text" and callable(count) else 0
        if max_length <= special:
            raise InvalidInputError(
                f"max_length={max_length} leaves no room for text: the tokenizer of "
                f"'{loaded.name}' adds {special} special token(s) to every text; pass "
                f"max_length >= {special + 1} (or None for the model's own limit)"
            )


def _current(metric: Accumulator) -> torch.Tensor:
    """The matrix a progress callback gets: CKA so far, or NaN for a full-data measure (computed
    once, over every sample, at the end)."""
    if isinstance(metric, FullDataMeasure):
        return torch.full((metric.num_layers_a, metric.num_layers_b), math.nan, dtype=torch.float64)
    return compute_quietly(metric)


def check_full_data(
    comparisons: Sequence[Comparison], size: int | None, options: RunOptions
) -> None:
    """Refuse, before any forward pass, a full-data measure that cannot run on ``size`` samples
    (the data's, capped at ``num_samples``; ``None``: unknown): a
    ``mutual_knn`` ``k`` of at least the number of samples, or pooled features that would exceed
    ``options.max_bytes``. Checked when the number of samples (and, for the memory, the layer
    widths) is known; else the accumulator refuses as soon as the features it holds would exceed
    the budget, and the measure when it is computed.

    Raises:
        InvalidInputError: ``k >= n`` for ``mutual_knn``.
        FullDataMemoryError: the estimate of :func:`hf_cka.measures.estimate_bytes` is too big.
    """
    if options.measure == "cka" or size is None or options.pooling == "tokens":
        return  # (with pooling="tokens" every token is a sample: their number is unknown)
    n = size  # already capped at num_samples
    k = options.measure_params.get("k", inspect.signature(mutual_knn).parameters["k"].default)
    if options.measure == "mutual_knn" and isinstance(k, int) and k >= n:
        raise InvalidInputError(
            f"mutual_knn needs k < n_samples (a sample is not its own neighbour), got k={k} for "
            f"{n} samples; pass a smaller k (measure_params={{'k': ...}}, --measure-param k=...) "
            "or more samples"
        )
    if options.max_bytes is None:
        return
    copies = 1 + options.null_permutations  # every permutation null holds its own copy
    for comparison in comparisons:
        dims_a = comparison.model_a.feature_widths(comparison.layers_a)
        dims_b = comparison.model_b.feature_widths(comparison.layers_b)
        if dims_a is None or dims_b is None or options.pooling == "flatten":
            continue  # widths unknown up front: the accumulator checks batch by batch
        one_sided = comparison.self_similarity and copies == 1
        estimate_bytes(
            n,
            dims_a * copies,
            None if one_sided else dims_b * copies,
            measure=options.measure,
            max_bytes=options.max_bytes,
        )


def _update(
    comparison: Comparison,
    item: Accumulated,
    features: list[dict[str, torch.Tensor]],
    slots: dict[tuple[int, str | None], int],
    seed: int,
    batch_index: int,
) -> None:
    """Feed one batch to a comparison's metric and to its permutation nulls."""
    (model_a, layers_a, column_a), (model_b, layers_b, column_b) = comparison.sides
    feats_a = [features[slots[id(model_a), column_a]][spec] for spec in layers_a]
    feats_b = [features[slots[id(model_b), column_b]][spec] for spec in layers_b]
    item.metric.update(
        feats_a, None if item.metric.self_similarity else feats_b, batch_index=batch_index
    )
    for draw, null in enumerate(item.nulls):
        order = null_order(seed, batch_index, draw, feats_b[0].shape[0]).to(feats_b[0].device)
        null.update(feats_a, [f[order] for f in feats_b], batch_index=batch_index)


def _expected_batches(size: int | None, batch_size: int) -> int | None:
    """Number of CKA batches this process will see, when the data size is known."""
    if size is None:
        return None
    full = max(1, size // batch_size) if size % batch_size < 4 else math.ceil(size / batch_size)
    world, rank = distributed.num_processes(), distributed.process_index()
    return len(range(rank, full, world))
