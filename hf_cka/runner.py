"""Streaming orchestration: data -> paired per-model features -> accumulators.

Data flow per run: samples -> global CKA batches (round-robin over processes) -> chunks of a few
batches -> per model: encode once, forward in length-sorted sub-batches, pool inside the hooks,
put the pooled rows back in sample order -> split into the CKA batches -> accumulators.
Sorting by length only changes which padded forward batches run, never which samples form a CKA
minibatch, so the result equals the unsorted run (mask-aware pooling ignores the padding).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import distributed
from .capture import Extractor
from .checkpoint import RunCheckpoint, fingerprint, model_identity
from .data import batch_samples, load_samples, same_tokens
from .errors import InvalidInputError, TokenizerMismatchError
from .metric import Accumulator, compute_quietly
from .models import LoadedModel
from .statistics import stderr_target_reached
from .streaming import ESTIMATORS, new_accumulator

Callback = Callable[[int, int, torch.Tensor], None]
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class RunOptions:
    """Everything that shapes a run besides the models and the data (see ``AutoCKA.compare``)."""

    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int | None = DEFAULT_MAX_LENGTH
    num_samples: int | None = None
    text_column: str = "text"
    dataset_config: str | None = None
    split: str | None = None
    callback: Callback | None = field(default=None, compare=False)
    progress: bool = True
    sort_by_length: bool = True
    chunk_batches: int = 8
    kernel: str = "linear"
    threshold: float = 1.0
    estimator: str = "minibatch"
    max_bytes: int | None = None
    null_permutations: int = 0
    seed: int = 0
    target_stderr: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.chunk_batches < 1 or self.checkpoint_every < 1 or self.null_permutations < 0:
            raise InvalidInputError(
                "expected chunk_batches >= 1, checkpoint_every >= 1 and null_permutations >= 0, "
                f"got {self.chunk_batches}, {self.checkpoint_every}, {self.null_permutations}"
            )
        if self.estimator not in ESTIMATORS:
            raise InvalidInputError(f"expected estimator in {ESTIMATORS}, got {self.estimator!r}")
        if self.target_stderr is not None and not self.target_stderr > 0:
            raise InvalidInputError(f"expected target_stderr > 0, got {self.target_stderr!r}")
        if self.target_stderr is not None and self.estimator != "minibatch":
            raise InvalidInputError(
                f"target_stderr needs the per-batch standard errors of estimator='minibatch', "
                f"got estimator={self.estimator!r}"
            )

    def resume_key(self) -> dict[str, Any]:
        """The options a resumed run must share with the checkpointed one."""
        keep = ("batch_size", "max_length", "num_samples", "text_column", "dataset_config",
                "split", "kernel", "threshold", "estimator", "null_permutations",
                "seed")  # fmt: skip
        return {key: value for key, value in asdict(self).items() if key in keep}


@dataclass
class Comparison:
    """One model pair and its layers; several comparisons may share a model (drift)."""

    model_a: LoadedModel
    model_b: LoadedModel
    layers_a: list[str]
    layers_b: list[str]

    @property
    def self_similarity(self) -> bool:
        return self.model_a is self.model_b and self.layers_a == self.layers_b

    def new_metric(self, options: RunOptions, pooling: str, *, paired: bool = False) -> Accumulator:
        """A fresh accumulator; ``paired`` forces two sides even for a self-comparison."""
        two_sided = paired or not self.self_similarity
        widths = pooling != "flatten"  # flattened features are tokens x hidden wide
        return new_accumulator(
            options.estimator,  # type: ignore[arg-type]
            len(self.layers_a),
            len(self.layers_b) if two_sided else None,
            kernel=options.kernel,  # type: ignore[arg-type]
            threshold=options.threshold,
            layer_names_a=self.layers_a,
            layer_names_b=self.layers_b,
            max_bytes=options.max_bytes,
            dims_a=self.model_a.feature_widths(self.layers_a) if widths else None,
            dims_b=self.model_b.feature_widths(self.layers_b) if widths and two_sided else None,
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
    run_info: dict[str, Any]


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
) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """Per CKA batch: its global index and one ``{layer: features}`` dict per extractor.

    Every extractor encodes the same samples with its own preprocessor and runs ONE forward pass
    per forward batch, however many comparisons use its features.
    """
    for chunk in chunks:
        samples = [sample for _, batch in chunk for sample in batch]
        sizes = [len(batch) for _, batch in chunk]
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
        for position, (index, _) in enumerate(chunk):
            yield index, [features[position] for features in per_model]


def run_comparisons(
    comparisons: Sequence[Comparison],
    data: Any,
    *,
    pooling: str,
    options: RunOptions,
    token: str | bool | None = None,
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
    first = comparisons[0]
    samples, data_info = load_samples(
        data,
        num_samples=options.num_samples,
        modality=first.model_a.modality,
        token=token,
        text_column=options.text_column,
        dataset_config=options.dataset_config,
        split=options.split,
    )
    batches = batch_samples(samples, options.batch_size)
    layers_by_model: dict[int, tuple[LoadedModel, list[str]]] = {}
    for comparison in comparisons:
        for loaded, layers in (
            (comparison.model_a, comparison.layers_a),
            (comparison.model_b, comparison.layers_b),
        ):
            layers_by_model.setdefault(id(loaded), (loaded, []))[1].extend(layers)
    slots = {key: slot for slot, key in enumerate(layers_by_model)}
    accumulated = [
        Accumulated(
            c.new_metric(options, pooling),
            [c.new_metric(options, pooling, paired=True) for _ in range(options.null_permutations)],
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
            "pooling": pooling,
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
            stack.enter_context(Extractor(loaded, layers, pooling))
            for loaded, layers in layers_by_model.values()
        ]
        stream = _stream(
            extractors,
            _chunks(batches, options.chunk_batches, skip=done, seen=checkpoint.record),
            batch_size=options.batch_size,
            max_length=options.max_length,
            sort_by_length=options.sort_by_length,
        )
        bar = _progress(stream, total, options.progress, initial=done)
        try:
            for index, features in bar:
                for comparison, item in zip(comparisons, accumulated, strict=True):
                    _update(comparison, item, features, slots, options.seed, index)
                done += 1
                if options.callback is not None:
                    options.callback(done, total or -1, compute_quietly(accumulated[0].metric))
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
    checkpoint.verify()  # also when the checkpoint had already covered every batch
    for accumulator in all_accumulators:
        accumulator.sync(distributed.all_reduce_sum)
    run_info = {
        "batch_size": options.batch_size,
        "max_length": options.max_length,
        "kernel": options.kernel,
        "threshold": options.threshold if options.kernel == "rbf" else None,
        "sort_by_length": options.sort_by_length,
        "null_permutations": options.null_permutations,
        "target_stderr": options.target_stderr,
        "stopped_early": stopped_early,
        "wall_time_s": time.perf_counter() - started,
    }
    return RunOutcome(accumulated, data_info, run_info)


def _update(
    comparison: Comparison,
    item: Accumulated,
    features: list[dict[str, torch.Tensor]],
    slots: dict[int, int],
    seed: int,
    batch_index: int,
) -> None:
    """Feed one batch to a comparison's metric and to its permutation nulls."""
    feats_a = [features[slots[id(comparison.model_a)]][spec] for spec in comparison.layers_a]
    feats_b = [features[slots[id(comparison.model_b)]][spec] for spec in comparison.layers_b]
    item.metric.update(
        feats_a, None if item.metric.self_similarity else feats_b, batch_index=batch_index
    )
    for draw, null in enumerate(item.nulls):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_index * 7919 + draw)
        order = torch.randperm(feats_b[0].shape[0], generator=generator).to(feats_b[0].device)
        null.update(feats_a, [f[order] for f in feats_b], batch_index=batch_index)


def _progress(
    stream: Iterable[Any], total: int | None, enabled: bool, initial: int = 0
) -> Iterable[Any]:
    """``stream`` wrapped in a tqdm bar on the main process when ``enabled``."""
    from tqdm.auto import tqdm

    show = enabled and distributed.is_main_process()
    return tqdm(stream, total=total, initial=initial, disable=not show, desc="CKA", unit="batch")


def _expected_batches(size: int | None, batch_size: int) -> int | None:
    """Number of CKA batches this process will see, when the data size is known."""
    if size is None:
        return None
    full = max(1, size // batch_size) if size % batch_size < 4 else math.ceil(size / batch_size)
    world, rank = distributed.num_processes(), distributed.process_index()
    return len(range(rank, full, world))
