"""Extraction phase: run ONE model over the data and write its :class:`~hf_cka.Fingerprint`.

The CKA batches are formed exactly as a single-stream comparison forms them
(:func:`hf_cka.data.batch_samples`: consecutive samples, a last batch of fewer than 4 merged into
the one before), optionally after a fixed permutation of the samples drawn from
``shuffle_seed``. They therefore depend on the data order, ``batch_size`` and the seed only --
never on the model or on length sorting -- so two models extracted separately and combined give
the single-stream result. Per batch and layer the store keeps the squared distances of the
pooled features (:mod:`hf_cka.fingerprint`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .capture import Extractor
from .checkpoint import batch_digest
from .data import batch_samples, load_samples, probe_corpus
from .errors import FingerprintMismatchError, InvalidInputError, ShapeMismatchError
from .fingerprint import Fingerprint, upper_triangle
from .functional import as_features, squared_distances
from .layers import LayerSpec, Part, resolve_layers
from .models import LoadedModel, ModelLoader
from .options import DEFAULTS
from .pooling import check_pooling


@dataclass(frozen=True)
class ExtractOptions:
    """What shapes an extraction besides the model (see :meth:`hf_cka.AutoCKA.fingerprint`)."""

    batch_size: int = DEFAULTS.batch_size
    max_length: int | None = DEFAULTS.max_length
    num_samples: int | None = None
    text_column: str = "text"
    dataset_config: str | None = None
    split: str | None = None
    shuffle_seed: int | None = None
    sort_by_length: bool = True
    chunk_batches: int = 8
    features: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.chunk_batches < 1:
            raise InvalidInputError(f"expected chunk_batches >= 1, got {self.chunk_batches}")


@dataclass
class BatchPlan:
    """The CKA batches of ``samples`` and their digests, recorded as they are formed.

    With ``shuffle_seed`` the samples are first put in the order of
    ``torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))``.
    With a ``reference`` fingerprint every batch is checked against the reference's sizes and
    digests as soon as it is formed, before any forward pass over it.
    """

    samples: Iterable[Any]
    batch_size: int
    shuffle_seed: int | None = None
    reference: Fingerprint | None = None
    sizes: list[int] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    _samples_hash: Any = field(default_factory=hashlib.sha256)

    @property
    def samples_digest(self) -> str:
        """sha256 over the per-sample digests in data order (complete after iteration)."""
        return self._samples_hash.hexdigest()

    def _hashed(self, samples: Iterable[Any]) -> Iterator[Any]:
        for sample in samples:
            self._samples_hash.update(batch_digest([sample]))
            yield sample

    def __iter__(self) -> Iterator[list[Any]]:
        samples: Iterable[Any] = self._hashed(self.samples)
        if self.shuffle_seed is not None:
            listed = list(samples)
            generator = torch.Generator().manual_seed(self.shuffle_seed)
            samples = [listed[i] for i in torch.randperm(len(listed), generator=generator)]
        for batch in batch_samples(samples, self.batch_size):
            self.sizes.append(len(batch))
            self.digests.append(batch_digest(batch).hex())
            self._check(len(self.sizes) - 1)
            yield batch
        if self.reference is not None and len(self.sizes) != len(self.reference.batch_sizes):
            raise FingerprintMismatchError(
                f"the data gave {len(self.sizes)} CKA batches of {sum(self.sizes)} samples, the "
                f"fingerprint of '{self.reference.name}' {len(self.reference.batch_sizes)} of "
                f"{self.reference.n_samples}; pass the data and num_samples it was made with"
            )

    def _check(self, index: int) -> None:
        reference = self.reference
        if reference is None:
            return
        if index >= len(reference.batch_sizes) or (
            self.sizes[index],
            self.digests[index],
        ) != (reference.batch_sizes[index], reference.batch_digests[index]):
            raise FingerprintMismatchError(
                f"CKA batch {index} of this data ({self.sizes[index]} samples) differs from "
                f"batch {index} of the fingerprint of '{reference.name}' (other samples or "
                f"another batch composition: it was made on {reference.data.get('dataset')!r} "
                f"with batch_size={reference.settings.get('batch_size')}, "
                f"shuffle_seed={reference.settings.get('shuffle_seed')}); pass the same data, "
                "num_samples, batch_size and shuffle_seed"
            )


def batch_distances(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(L, n (n - 1) / 2)`` float64 squared distances of each layer's column-centred features
    (computed from differences, as the RBF path of :class:`~hf_cka.MinibatchCKA` does)."""
    triangles = []
    for feats in features:
        x = as_features(feats)
        triangles.append(upper_triangle(squared_distances(x - x.mean(dim=0))[None])[0])
    return torch.stack(triangles).cpu()


def _chunks(batches: Iterable[list[Any]], size: int) -> Iterator[list[list[Any]]]:
    chunk: list[list[Any]] = []
    for batch in batches:
        chunk.append(batch)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def data_provenance(data: Any, info: dict[str, Any], token: str | bool | None) -> dict[str, Any]:
    """``info`` from :func:`hf_cka.data.load_samples` plus ``data_revision``: the probe
    corpus's sha256, or the commit sha of a Hub dataset (``None`` when unknown)."""
    out = {key: value for key, value in info.items() if key != "size"}
    if data is None:
        corpus = "\n".join(probe_corpus()).encode("utf-8")
        out["data_revision"] = "sha256:" + hashlib.sha256(corpus).hexdigest()
    elif isinstance(data, str) and info.get("dataset") == data and "/" in data:
        out["data_revision"] = None if Path(data).exists() else _dataset_sha(data, token)
    else:
        out["data_revision"] = None
    return out


def _dataset_sha(repo_id: str, token: str | bool | None) -> str | None:
    from huggingface_hub import HfApi

    from ._network import NETWORK_ERRORS

    unreachable: tuple[type[BaseException], ...] = (OSError, *NETWORK_ERRORS)
    try:
        return HfApi().dataset_info(repo_id, token=token).sha
    except unreachable:  # unknown to the Hub, or offline: no revision recorded
        return None


def extract(
    loaded: LoadedModel,
    layers: Sequence[str],
    pooling: str,
    data: Any = None,
    options: ExtractOptions = ExtractOptions(),
    *,
    reference: Fingerprint | None = None,
    token: str | bool | None = None,
) -> Fingerprint:
    """Run ``loaded`` over ``data`` and return its fingerprint (see the module docstring).

    Forward passes run over length-sorted sub-batches of ``options.chunk_batches`` CKA batches
    (the stored values do not depend on it). With ``reference`` the batches must be those of
    the reference fingerprint (checked before each batch's forward pass).

    Raises:
        FingerprintMismatchError: a batch differs from the reference's.
        InvalidInputError: ``pooling="tokens"`` (its samples depend on the tokenizer).
    """
    if pooling == "tokens":
        raise InvalidInputError(
            "pooling='tokens' makes every token a sample, so its batches depend on the "
            "tokenizer and cannot be stored per model; use pooling='mean' (or 'last', 'max', "
            "'first')"
        )
    started = time.perf_counter()
    samples, info = load_samples(
        data,
        num_samples=options.num_samples,
        modality=loaded.modality,
        token=token,
        text_column=options.text_column,
        dataset_config=options.dataset_config,
        split=options.split,
    )
    plan = BatchPlan(samples, options.batch_size, options.shuffle_seed, reference)
    triangles: list[torch.Tensor] = []
    rows: dict[str, list[torch.Tensor]] = {spec: [] for spec in layers}
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(reference.batch_sizes) if reference is not None else None,
        disable=not options.progress,
        desc=f"extract {loaded.name}",
        unit="batch",
    )
    with Extractor(loaded, layers, pooling) as extractor, bar:
        for chunk in _chunks(plan, options.chunk_batches):
            encodings = extractor.encode([s for batch in chunk for s in batch], options.max_length)
            sizes = [len(batch) for batch in chunk]
            per_batch = extractor.chunk_features(
                encodings, sizes, options.batch_size, options.sort_by_length
            )
            for feats in per_batch:
                triangles.append(batch_distances([feats[spec] for spec in layers]))
                if options.features:
                    for spec in layers:
                        rows[spec].append(feats[spec].cpu())
                bar.update(1)
    return Fingerprint(
        layers=list(layers),
        distances=torch.cat(triangles, dim=1),
        batch_sizes=plan.sizes,
        batch_digests=plan.digests,
        samples_digest=plan.samples_digest,
        settings={
            "pooling": pooling,
            "max_length": options.max_length,
            "batch_size": options.batch_size,
            "shuffle_seed": options.shuffle_seed,
            "sort_by_length": options.sort_by_length,
        },
        data=data_provenance(data, info, token),
        model={
            **{k.removesuffix("_x"): v for k, v in loaded.provenance("x").items()},
            "dtype": loaded.dtype,
            "modality": loaded.modality,
        },
        features={k: torch.cat(v) for k, v in rows.items()} if options.features else None,
        metadata={"wall_time_s": time.perf_counter() - started, "versions": _versions()},
    )


def _versions() -> dict[str, str]:
    from .auto import _library_versions

    return _library_versions()


@dataclass(frozen=True)
class ModelSource:
    """How to load one model (see :class:`hf_cka.models.ModelLoader`) and which layers to take."""

    spec: str
    revision: str | None = None
    layers: str | Sequence[LayerSpec] = "auto"
    part: Part = "encoder"
    loading: dict[str, Any] = field(default_factory=dict)


def fingerprint_model(
    source: ModelSource,
    data: Any,
    pooling: str,
    options: ExtractOptions,
    *,
    reference: Fingerprint | None = None,
    same_layers: Sequence[str] | None = None,
    token: str | bool | None = None,
) -> Fingerprint:
    """Load ONE model, extract its fingerprint and free it before returning.

    A fingerprint folder or Hub repo is loaded instead (and checked against ``reference``).
    With ``same_layers`` the selected layers must be those (checked before any forward pass).

    Raises:
        ShapeMismatchError: the selected layers differ from ``same_layers``.
    """
    from .fingerprint import check_compatible, load_fingerprint
    from .models import is_fingerprint, parse_model_spec

    check_pooling(pooling)
    name, revision = parse_model_spec(source.spec, source.revision)
    if is_fingerprint(name, revision, token):
        stored = load_fingerprint(name, revision, token)
        if reference is not None:
            check_compatible(reference, stored)
        _check_layers(
            stored.name,
            [stored.layers[i] for i in stored.layer_indices(source.layers)],
            same_layers,
        )
        return stored
    loaded = ModelLoader(token=token, **source.loading).load(name, revision)
    try:
        layers = resolve_layers(
            loaded.model, source.layers, model_name=loaded.name, part=source.part
        )
        _check_layers(loaded.name, layers, same_layers)
        return extract(loaded, layers, pooling, data, options, reference=reference, token=token)
    finally:
        release(loaded)


def _check_layers(name: str, layers: list[str], expected: Sequence[str] | None) -> None:
    if expected is not None and list(layers) != list(expected):
        raise ShapeMismatchError(
            f"drift compares each layer with the same layer of the base, but '{name}' has "
            f"layers {layers} and the base {list(expected)}; pass layers=[...] that both have"
        )


def release(loaded: LoadedModel) -> None:
    """Drop the last references to a model's weights and return its memory (CUDA included)."""
    on_cuda = any(p.is_cuda for p in loaded.model.parameters())
    for holder in (loaded, loaded.base):
        if holder is not None:
            holder.model = holder.peft = None  # type: ignore[assignment]
    gc.collect()
    if on_cuda:
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()
