"""``AutoCKA``: compare Hugging Face models (Hub ids, local folders, revisions) in one line.

Data flow per run: samples -> global CKA batches (round-robin over processes) -> chunks of a few
batches -> per model: encode once, forward in length-sorted sub-batches, pool inside the hooks,
put the pooled rows back in sample order -> split into the CKA batches -> ``MinibatchCKA``.
Sorting by length only changes which padded forward batches run, never which samples form a CKA
minibatch, so the result equals the unsorted run (mask-aware pooling ignores the padding).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from . import distributed
from .data import batch_samples, collate, encode, lengths, load_samples, same_tokens
from .engine import forward_features
from .errors import InvalidInputError, TokenizerMismatchError
from .hooks import FeatureCapture, split_spec
from .layers import LayerSpec, Part, resolve_layers
from .metric import MinibatchCKA
from .models import LoadedModel, ModelLoader
from .pooling import check_pooling

Callback = Callable[[int, int, torch.Tensor], None]
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_LENGTH = 128
ESTIMATOR = "minibatch-unbiased-hsic"
DRIFT_METADATA = (
    "pooling", "estimator", "dataset", "dataset_config", "split", "n_samples", "n_batches",
    "batch_size", "max_length", "num_processes", "versions", "run_id", "created_at", "wall_time_s",
)  # fmt: skip


class _Extractor:
    """Pooled features of one model for chunks of CKA batches (hooks live in ``with``)."""

    def __init__(self, loaded: LoadedModel, layers: Sequence[str], pooling: str) -> None:
        self.loaded, self.layers, self.pooling = loaded, list(dict.fromkeys(layers)), pooling
        model = loaded.model
        self.use_decoder = bool(getattr(model.config, "is_encoder_decoder", False)) and any(
            split_spec(spec)[0].split(".")[0] == "decoder" for spec in self.layers
        )
        is_enc_dec = getattr(model.config, "is_encoder_decoder", False)
        self.forward_module = model.get_encoder() if is_enc_dec and not self.use_decoder else model
        self.capture = FeatureCapture(model, self.layers, pooling, device=torch.device("cpu"))

    def __enter__(self) -> _Extractor:
        self.capture.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.remove()

    def encode(self, samples: Sequence[Any], max_length: int | None) -> Any:
        return encode(self.loaded.processor, samples, self.loaded.modality, max_length)

    def _forward(self, encodings: Any, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate(self.loaded.processor, encodings, indices, self.loaded.modality)
        if self.use_decoder:
            batch["decoder_input_ids"] = batch["input_ids"]
            batch["decoder_attention_mask"] = batch["attention_mask"]
        with self.loaded.forward_context():
            return forward_features(self.forward_module, self.capture, batch)

    def chunk_features(
        self, encodings: Any, sizes: Sequence[int], batch_size: int, sort: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Features of consecutive CKA batches of ``sizes`` samples (encoded in ``encodings``).

        With ``sort`` the forward passes run over the chunk sorted by length (longest first,
        ``batch_size`` samples each) and the pooled rows are put back in sample order.
        """
        bounds = [0, *itertools.accumulate(sizes)]
        if not sort or self.pooling == "tokens":
            return [self._forward(encodings, range(s, e)) for s, e in itertools.pairwise(bounds)]
        total = bounds[-1]
        order = sorted(range(total), key=lengths(encodings, self.loaded.modality).__getitem__)
        order.reverse()
        buffers: dict[str, torch.Tensor] = {}
        for start in range(0, total, batch_size):
            indices = order[start : start + batch_size]
            for spec, rows in self._forward(encodings, indices).items():
                if spec not in buffers:
                    buffers[spec] = rows.new_empty((total, *rows.shape[1:]))
                buffers[spec][indices] = rows
        return [{k: v[s:e] for k, v in buffers.items()} for s, e in itertools.pairwise(bounds)]


def _chunks(batches: Iterable[list[Any]], chunk_batches: int) -> Iterator[list[list[Any]]]:
    """This process's CKA batches (round-robin shard) grouped ``chunk_batches`` at a time."""
    chunk: list[list[Any]] = []
    for index, batch in enumerate(batches):
        if not distributed.shard(index):
            continue
        chunk.append(batch)
        if len(chunk) == chunk_batches:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stream(
    extractors: Sequence[_Extractor],
    batches: Iterable[list[Any]],
    *,
    batch_size: int,
    max_length: int | None,
    sort_by_length: bool,
    chunk_batches: int,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per CKA batch of this process: one ``{layer: features}`` dict per extractor.

    Every extractor encodes the same samples with its own preprocessor and runs ONE forward pass
    per forward batch, however many comparisons use its features.
    """
    for chunk in _chunks(batches, chunk_batches):
        samples = [sample for batch in chunk for sample in batch]
        sizes = [len(batch) for batch in chunk]
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
        for index in range(len(chunk)):
            yield [features[index] for features in per_model]


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("hf_cka", "torch", "transformers", "datasets", "accelerate", "huggingface_hub"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class AutoCKA:
    """Minibatch CKA between the layers of two Hugging Face models.

    Build it with :meth:`from_pretrained`; :meth:`compare` returns a :class:`~hf_cka.CKAResult`.
    """

    def __init__(
        self,
        model_a: LoadedModel,
        model_b: LoadedModel | None = None,
        *,
        layers_a: str | Sequence[LayerSpec] = "auto",
        layers_b: str | Sequence[LayerSpec] = "auto",
        pooling: str = "mean",
        part_a: Part = "encoder",
        part_b: Part = "encoder",
        token: str | bool | None = None,
    ) -> None:
        self.model_a = model_a
        self.model_b = model_b if model_b is not None else model_a
        self.same_model = self.model_b is self.model_a
        self.pooling = check_pooling(pooling)
        self.layers_a = resolve_layers(
            model_a.model, layers_a, model_name=model_a.name, part=part_a
        )
        self.layers_b = resolve_layers(
            self.model_b.model, layers_b, model_name=self.model_b.name, part=part_b
        )
        self._token = token  # used for dataset downloads only; never stored in results
        if pooling == "tokens" and not self.same_model:
            self._check_same_tokenizer()

    def __repr__(self) -> str:
        return (
            f"AutoCKA(model_a={self.model_a.name!r}, model_b={self.model_b.name!r}, "
            f"layers={len(self.layers_a)}x{len(self.layers_b)}, pooling={self.pooling!r})"
        )

    @classmethod
    def from_pretrained(
        cls,
        model_a: str,
        model_b: str | None = None,
        *,
        revision_a: str | None = None,
        revision_b: str | None = None,
        layers_a: str | Sequence[LayerSpec] = "auto",
        layers_b: str | Sequence[LayerSpec] = "auto",
        pooling: str = "mean",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        trust_remote_code: bool = False,
        token: str | bool | None = None,
        part_a: Part = "encoder",
        part_b: Part = "encoder",
    ) -> AutoCKA:
        """Resolve and load both models (and their tokenizers or image processors).

        ``model_b=None`` -- or the same id and revision as ``model_a`` -- compares a model with
        itself: it is loaded once and runs one forward pass per batch. Either id may be
        ``"repo@revision"``. ``dtype=None`` keeps the checkpoint's dtype; accumulation is float64
        whatever it is.
        """
        check_pooling(pooling)
        loader = ModelLoader(
            dtype=dtype,
            device=device,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            token=token,
        )
        loaded_a = loader.load(model_a, revision_a)
        if model_b is not None:
            loaded_b = loader.load(model_b, revision_b)
        elif loaded_a.base is not None:  # a lone adapter: compare its base with it
            loaded_a, loaded_b = loaded_a.base, loaded_a
        else:
            loaded_b = None
        return cls(
            loaded_a,
            loaded_b,
            layers_a=layers_a,
            layers_b=layers_b,
            pooling=pooling,
            part_a=part_a,
            part_b=part_b,
            token=token,
        )

    def _check_same_tokenizer(self) -> None:
        tok_a, tok_b = self.model_a.processor, self.model_b.processor
        if self.model_a.modality != "text" or self.model_b.modality != "text":
            raise TokenizerMismatchError("pooling='tokens' needs two text models")
        if tok_a.get_vocab() != tok_b.get_vocab():
            raise TokenizerMismatchError(
                f"pooling='tokens' makes every token a sample, so both models must tokenize "
                f"identically; '{self.model_a.name}' and '{self.model_b.name}' have different "
                "vocabularies: use pooling='mean' (or 'last', 'max', 'first')"
            )

    # ------------------------------------------------------------------ running
    def compare(
        self,
        data: Any = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = DEFAULT_MAX_LENGTH,
        num_samples: int | None = None,
        text_column: str = "text",
        dataset_config: str | None = None,
        split: str | None = None,
        callback: Callback | None = None,
        progress: bool = True,
        sort_by_length: bool = True,
        chunk_batches: int = 8,
        kernel: str = "linear",
        threshold: float = 1.0,
    ) -> Any:
        """Minibatch CKA of every layer pair over ``data``; returns a ``CKAResult``.

        Args:
            data: ``None`` (built-in probe corpus), a list of strings (or images), a
                ``datasets.Dataset``/``IterableDataset``, a local data file or folder, or a Hub
                dataset id.
            batch_size: samples per CKA minibatch (>= 4); also the forward batch size.
            max_length: truncate texts to this many tokens (``None``: the model's limit).
            num_samples: use at most this many samples.
            text_column: the dataset column holding texts (images are found automatically).
            dataset_config: Hub dataset configuration name.
            split: dataset split (default ``"train"`` or the first one).
            callback: ``callback(batch_idx, total, current_matrix)`` after every batch (this
                process's partial matrix in a distributed run).
            progress: show a progress bar (main process only).
            sort_by_length: run forward passes over length-sorted sub-batches of a chunk
                (faster; the CKA minibatches and the result are unchanged).
            chunk_batches: CKA batches per sorting chunk.
            kernel: ``"linear"`` or ``"rbf"`` (bandwidth: ``threshold`` x per-batch median).
            threshold: RBF bandwidth factor.
        """
        (result,) = _run_comparisons(
            [self],
            data,
            batch_size=batch_size,
            max_length=max_length,
            num_samples=num_samples,
            text_column=text_column,
            dataset_config=dataset_config,
            split=split,
            callback=callback,
            progress=progress,
            sort_by_length=sort_by_length,
            chunk_batches=chunk_batches,
            kernel=kernel,
            threshold=threshold,
        )
        return result

    @classmethod
    def drift(
        cls,
        base: str,
        checkpoints: Sequence[str],
        data: Any = None,
        *,
        revision: str | None = None,
        layers: str | Sequence[LayerSpec] = "auto",
        pooling: str = "mean",
        part: Part = "encoder",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        trust_remote_code: bool = False,
        token: str | bool | None = None,
        **compare_options: Any,
    ) -> Any:
        """CKA of a base model against each of several checkpoints; returns a ``DriftResult``.

        Checkpoints are Hub ids, local folders or ``"repo@revision"`` (several revisions of one
        repo work). All k + 1 models are loaded together and the data streams once: per batch the
        base model runs ONE forward pass shared by the k comparisons (k + 1 passes, not 2k).
        ``compare_options`` are those of :meth:`compare` (``batch_size``, ``max_length``, ...).
        """
        if isinstance(checkpoints, str) or not checkpoints:
            raise InvalidInputError(
                f"expected a non-empty list of checkpoints, got {checkpoints!r}"
            )
        check_pooling(pooling)
        loader = ModelLoader(
            dtype=dtype,
            device=device,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            token=token,
        )
        base_model = loader.load(base, revision)
        comparisons = [
            cls(
                base_model,
                loader.load(checkpoint),
                layers_a=layers,
                layers_b=layers,
                pooling=pooling,
                part_a=part,
                part_b=part,
                token=token,
            )
            for checkpoint in checkpoints
        ]
        results = _run_comparisons(comparisons, data, **compare_options)
        from .result import DriftResult

        return DriftResult(
            base=base_model.name,
            checkpoints=[c.model_b.name for c in comparisons],
            results=results,
            metadata={key: results[0].metadata.get(key) for key in DRIFT_METADATA},
        )

    def _new_metric(self, kernel: str, threshold: float) -> MinibatchCKA:
        self_similarity = self.same_model and self.layers_a == self.layers_b
        return MinibatchCKA(
            len(self.layers_a),
            None if self_similarity else len(self.layers_b),
            kernel=kernel,  # type: ignore[arg-type]
            threshold=threshold,
            layer_names_a=self.layers_a,
            layer_names_b=self.layers_b,
        )

    def _result(self, metric: MinibatchCKA, metadata: dict[str, Any]) -> Any:
        from .result import CKAResult

        return CKAResult(
            matrix=metric.compute(),
            layers_a=list(self.layers_a),
            layers_b=list(self.layers_b),
            model_a=self.model_a.name,
            model_b=self.model_b.name,
            metadata=metadata,
            stderr=metric.compute_stderr() if metric.n_batches >= 2 else None,
        )

    def _metadata(self, info: dict[str, Any], metric: MinibatchCKA, **run: Any) -> dict[str, Any]:
        from .result import new_run_id

        a, b = self.model_a, self.model_b
        return {
            **a.provenance("a"),
            **b.provenance("b"),
            "dtype": a.dtype if a.dtype == b.dtype else f"{a.dtype}/{b.dtype}",
            "pooling": self.pooling,
            "estimator": ESTIMATOR,
            "dataset": info.get("dataset"),
            "dataset_config": info.get("dataset_config"),
            "split": info.get("split"),
            "text_column": info.get("text_column"),
            "n_samples": metric.n_samples,
            "n_batches": metric.n_batches,
            "num_processes": distributed.num_processes(),
            "versions": _library_versions(),
            "run_id": new_run_id(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **run,
        }

    def extract_features(
        self,
        data: Any = None,
        *,
        model: str = "a",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = DEFAULT_MAX_LENGTH,
        num_samples: int | None = None,
        text_column: str = "text",
        dataset_config: str | None = None,
        split: str | None = None,
        sort_by_length: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The pooled per-layer features ``{layer: (n, d)}`` exactly as CKA sees them.

        Runs on every sample in this process (no sharding); rows follow the data order.
        """
        if model not in ("a", "b"):
            raise InvalidInputError(f"expected model='a' or 'b', got {model!r}")
        loaded, layers = (
            (self.model_a, self.layers_a) if model == "a" else (self.model_b, self.layers_b)
        )
        samples, _ = load_samples(
            data,
            num_samples=num_samples,
            modality=loaded.modality,
            token=self._token,
            text_column=text_column,
            dataset_config=dataset_config,
            split=split,
        )
        rows: dict[str, list[torch.Tensor]] = {spec: [] for spec in layers}
        with _Extractor(loaded, layers, self.pooling) as extractor:
            for batch in batch_samples(samples, batch_size):
                encodings = extractor.encode(batch, max_length)
                (feats,) = extractor.chunk_features(
                    encodings, [len(batch)], batch_size, sort_by_length
                )
                for spec in layers:
                    rows[spec].append(feats[spec])
        return {spec: torch.cat(parts) for spec, parts in rows.items()}


def _run_comparisons(
    comparisons: Sequence[AutoCKA],
    data: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    num_samples: int | None = None,
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str | None = None,
    callback: Callback | None = None,
    progress: bool = True,
    sort_by_length: bool = True,
    chunk_batches: int = 8,
    kernel: str = "linear",
    threshold: float = 1.0,
) -> list[Any]:
    """Stream ``data`` once through every distinct model and accumulate each comparison.

    Each distinct model gets one extractor hooking every layer any comparison needs from it, so
    a model shared by several comparisons (the base of a drift, or a self-comparison) runs one
    forward pass per batch.
    """
    started = time.perf_counter()
    first = comparisons[0]
    samples, info = load_samples(
        data,
        num_samples=num_samples,
        modality=first.model_a.modality,
        token=first._token,
        text_column=text_column,
        dataset_config=dataset_config,
        split=split,
    )
    batches = batch_samples(samples, batch_size)
    layers_by_model: dict[int, tuple[LoadedModel, list[str]]] = {}
    for comparison in comparisons:
        for loaded, layers in (
            (comparison.model_a, comparison.layers_a),
            (comparison.model_b, comparison.layers_b),
        ):
            layers_by_model.setdefault(id(loaded), (loaded, []))[1].extend(layers)
    slots = {key: slot for slot, key in enumerate(layers_by_model)}
    metrics = [comparison._new_metric(kernel, threshold) for comparison in comparisons]
    total = _expected_batches(info.get("size"), batch_size)
    with contextlib.ExitStack() as stack:
        extractors = [
            stack.enter_context(_Extractor(loaded, layers, first.pooling))
            for loaded, layers in layers_by_model.values()
        ]
        stream = _stream(
            extractors,
            batches,
            batch_size=batch_size,
            max_length=max_length,
            sort_by_length=sort_by_length,
            chunk_batches=chunk_batches,
        )
        for index, features in enumerate(_progress(stream, total, progress), start=1):
            for comparison, metric in zip(comparisons, metrics, strict=True):
                feats_a = features[slots[id(comparison.model_a)]]
                feats_b = features[slots[id(comparison.model_b)]]
                metric.update(
                    [feats_a[spec] for spec in comparison.layers_a],
                    None
                    if metric.self_similarity
                    else [feats_b[spec] for spec in comparison.layers_b],
                )
            if callback is not None:
                callback(index, total or -1, metrics[0].compute())
    run = {
        "batch_size": batch_size,
        "max_length": max_length,
        "kernel": kernel,
        "threshold": threshold if kernel == "rbf" else None,
        "sort_by_length": sort_by_length,
        "wall_time_s": time.perf_counter() - started,
    }
    results = []
    for comparison, metric in zip(comparisons, metrics, strict=True):
        metric.sync(distributed.all_reduce_sum)
        results.append(comparison._result(metric, comparison._metadata(info, metric, **run)))
    return results


def _progress(stream: Iterable[Any], total: int | None, enabled: bool) -> Iterable[Any]:
    """``stream`` wrapped in a tqdm bar on the main process when ``enabled``."""
    from tqdm.auto import tqdm

    show = enabled and distributed.is_main_process()
    return tqdm(stream, total=total, disable=not show, desc="CKA", unit="batch")


def _expected_batches(size: int | None, batch_size: int) -> int | None:
    """Number of CKA batches this process will see, when the data size is known."""
    if size is None:
        return None
    full = max(1, size // batch_size) if size % batch_size < 4 else math.ceil(size / batch_size)
    world, rank = distributed.num_processes(), distributed.process_index()
    return len(range(rank, full, world))
