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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
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
from .provenance import library_versions
from .shards import BatchStore, ShardFolder, run_key
from .tokens import HubToken

DEFAULT_BUFFER_BYTES = 1 << 30  # pooled features held at once for sorting by length: 1 GiB


@dataclass(frozen=True)
class ExtractOptions:
    """What shapes an extraction besides the model (see :meth:`hf_cka.AutoCKA.fingerprint`).

    ``buffer_bytes`` bounds the pooled features held at once for sorting by length (one window
    of CKA batches after the first, which holds ``chunk_batches``; see :func:`extract`);
    ``shards_dir`` is where each process writes its shards
    (:mod:`hf_cka.shards`), so a killed extraction resumes from them.
    """

    batch_size: int = DEFAULTS.batch_size
    max_length: int | None = DEFAULTS.max_length
    num_samples: int | None = None
    text_column: str = "text"
    dataset_config: str | None = None
    split: str | None = None
    shuffle_seed: int | None = None
    sort_by_length: bool = True
    chunk_batches: int = DEFAULTS.chunk_batches
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    features: bool = False
    progress: bool = True
    shards_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if self.chunk_batches < 1:
            raise InvalidInputError(f"expected chunk_batches >= 1, got {self.chunk_batches}")
        if self.buffer_bytes < 1:
            raise InvalidInputError(
                f"expected buffer_bytes >= 1 (bytes of pooled features held for length "
                f"sorting), got {self.buffer_bytes}"
            )


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


def _windows(
    batches: Iterable[tuple[int, list[Any]]], capacity: Callable[[], int | None], first: int
) -> Iterator[list[tuple[int, list[Any]]]]:
    """Consecutive ``(index, batch)`` pairs grouped while their samples number at most
    ``capacity()`` (asked before each batch is added; a window holds at least one batch), or,
    while ``capacity()`` is ``None``, ``first`` batches."""
    window: list[tuple[int, list[Any]]] = []
    held = 0
    for item in batches:
        limit = capacity()
        full = len(window) >= first if limit is None else held + len(item[1]) > limit
        if window and full:
            yield window
            window, held = [], 0
        window.append(item)
        held += len(item[1])
    if window:
        yield window


def data_provenance(data: Any, info: dict[str, Any], token: HubToken) -> dict[str, Any]:
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


def _dataset_sha(repo_id: str, token: HubToken) -> str | None:
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
    token: HubToken = None,
) -> Fingerprint:
    """Run ``loaded`` over ``data`` and return its fingerprint (see the module docstring).

    The pooled features of a window of consecutive CKA batches are held before each batch's
    distances are formed, so the forward passes run over the whole window sorted by length
    (longest first, ``batch_size`` samples each; ``sort_by_length=False``: batch by batch). A
    window holds as many batches as fit in ``options.buffer_bytes`` of pooled features; the
    first holds ``options.chunk_batches`` (as a streamed run's chunk) and measures the bytes
    per sample. Windows never change the CKA batches: the stored values equal an unsorted
    extraction's to float rounding (padded positions are masked; only the grouping of the
    forward passes differs): within 1e-12 of the largest distance for a float64 model, 1e-7
    for a float32 one (``tests/test_extract_windows.py``).

    Under several processes (``accelerate launch``, ``torchrun``) process ``r`` of ``W``
    extracts global batches ``r, r + W, ...``; each finished window is written as a shard to
    ``options.shards_dir`` (when given; else the batches are exchanged in memory) and the
    store is assembled only when every batch is there. A rerun with the same ``shards_dir``
    skips the batches of complete shards. With ``reference`` the batches must be those of the
    reference fingerprint (checked before each batch's forward pass).

    Raises:
        FingerprintMismatchError: a batch differs from the reference's or from a shard's.
        ShardDamagedError: a shard's tensors do not have the sha256 of its manifest.
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
    settings = {
        "pooling": pooling,
        "max_length": options.max_length,
        "batch_size": options.batch_size,
        "shuffle_seed": options.shuffle_seed,
        "sort_by_length": options.sort_by_length,
    }
    model = {
        **{k.removesuffix("_x"): v for k, v in loaded.provenance().to_dict("x").items()},
        "dtype": loaded.dtype,
        "modality": loaded.modality,
    }
    key = run_key({**settings, "model": model, "layers": list(layers), "f": options.features})
    shards = None if options.shards_dir is None else ShardFolder(options.shards_dir, key)
    done = shards.read() if shards is not None else {}
    rank, world = distributed.process_index(), distributed.num_processes()
    todo = ((i, b) for i, b in enumerate(plan) if i % world == rank and i not in done)
    computed: dict[int, BatchStore] = {}
    per_sample = 0  # bytes of one sample's pooled features, measured on the first window
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(reference.batch_sizes) if reference is not None else None,
        disable=not options.progress or not distributed.is_main_process(),
        desc=f"extract {loaded.name}",
        unit="batch",
    )

    def capacity() -> int | None:
        """Samples a window may hold; ``None`` (count batches) before a sample is measured."""
        return options.buffer_bytes // per_sample if per_sample else None

    with Extractor(loaded, layers, pooling) as extractor, bar:
        for window in _windows(todo, capacity, options.chunk_batches):
            stores, per_sample = _extract_window(extractor, window, layers, plan, options)
            computed.update(stores)
            if shards is not None:
                shards.write(rank, stores)
            bar.update(len(window))
    stores = _assemble(plan, done, computed, shards, world)
    return Fingerprint(
        layers=list(layers),
        distances=torch.cat([stores[i].distances for i in range(len(plan.sizes))], dim=1),
        batch_sizes=plan.sizes,
        batch_digests=plan.digests,
        samples_digest=plan.samples_digest,
        settings=settings,
        data=data_provenance(data, info, token),
        model=model,
        features=_joined_features(layers, stores) if options.features else None,
        metadata={"wall_time_s": time.perf_counter() - started, "versions": library_versions()},
    )


def _extract_window(
    extractor: Extractor,
    window: list[tuple[int, list[Any]]],
    layers: Sequence[str],
    plan: BatchPlan,
    options: ExtractOptions,
) -> tuple[dict[int, BatchStore], int]:
    """Forward passes over one window (sorted by length): each batch's stored values, and the
    bytes of one sample's pooled features over all layers."""
    batches = [batch for _, batch in window]
    encodings = extractor.encode([s for batch in batches for s in batch], options.max_length)
    per_batch = extractor.chunk_features(
        encodings, [len(b) for b in batches], options.batch_size, options.sort_by_length
    )
    per_sample = sum(rows[0].numel() * rows.element_size() for rows in per_batch[0].values())
    stores = {
        index: BatchStore(
            plan.digests[index],
            batch_distances([feats[spec] for spec in layers]),
            [feats[spec].cpu() for spec in layers] if options.features else None,
        )
        for (index, _), feats in zip(window, per_batch, strict=True)
    }
    return stores, max(1, per_sample)


def _assemble(
    plan: BatchPlan,
    done: dict[int, BatchStore],
    computed: dict[int, BatchStore],
    shards: ShardFolder | None,
    world: int,
) -> dict[int, BatchStore]:
    """Every CKA batch's stored values: resumed, computed here, or by the other processes.

    Raises:
        FingerprintMismatchError: a resumed shard holds other samples than the data's batch.
        ShapeMismatchError: a batch is missing (a process did not finish).
    """
    stores = {**done, **computed}
    if world > 1:
        distributed.wait_for_everyone()
        if shards is not None:  # every shard is written: read them all (digests checked)
            stores = shards.read()
            distributed.wait_for_everyone()  # all have read before the main one may save
        else:
            for part in distributed.all_gather_objects(computed):
                stores.update(part)  # type: ignore[call-overload]
    for index, digest in enumerate(plan.digests):
        if index not in stores:
            raise ShapeMismatchError(
                f"CKA batch {index} of {len(plan.digests)} was extracted by no process; the "
                "store is incomplete -- rerun with the same shards folder to finish it"
            )
        if stores[index].digest != digest:
            raise FingerprintMismatchError(
                f"the shard of CKA batch {index} holds other samples than this data's batch "
                f"{index}; pass the data it was made from, or use a new shards folder"
            )
    return stores


def _joined_features(
    layers: Sequence[str], stores: dict[int, BatchStore]
) -> dict[str, torch.Tensor]:
    """Each layer's pooled features of all samples, in data order."""
    ordered = [stores[i].features or [] for i in range(len(stores))]
    return {spec: torch.cat([f[j] for f in ordered]) for j, spec in enumerate(layers)}


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
    token: HubToken = None,
) -> Fingerprint:
    """Load ONE model, extract its fingerprint and free it before returning.

    A fingerprint folder or Hub repo is loaded instead (and checked against ``reference``).
    With ``same_layers`` the selected layers must be those (checked before any forward pass).

    Raises:
        ShapeMismatchError: the selected layers differ from ``same_layers``.
    """
    from .fingerprint import check_compatible, load_fingerprint
    from .model_files import is_fingerprint, parse_model_spec

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
