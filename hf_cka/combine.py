"""Combine phase: CKA of any two fingerprints with no model loaded, and the one-model-at-a-time
``compare`` and ``drift`` built on it.

Per CKA batch ``b`` the minibatch accumulator receives the stored squared distances of both
sides (:meth:`hf_cka.MinibatchCKA.update_from_distances`), in the batch order of the
single-stream run, so the result equals it to float64 rounding. Permutation nulls shuffle side
B's samples within each batch with the generator the single-stream run uses; permuting the rows
of ``Y`` by ``P`` permutes both the rows and the columns of ``D_Y``: ``D_Y -> P D_Y P^T``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from .assembly import dtype_label, measure_fields, to_result
from .errors import InvalidInputError
from .extract import ExtractOptions, ModelSource, extract, fingerprint_model
from .fingerprint import Fingerprint, check_compatible, check_settings, load_fingerprint
from .layers import LayerSpec, Part, check_some_layers, resolve_layers
from .metric import MinibatchCKA
from .model_files import is_fingerprint, parse_model_spec
from .models import LoadedModel, ModelLoader
from .options import DEFAULTS, ModelRunChanges, RunOptions, split_changes
from .provenance import (
    DataProvenance,
    ModelProvenance,
    Provenance,
    library_versions,
)
from .runner import Accumulated, new_metric
from .statistics import null_order
from .tokens import HubToken

# compare() options that only the single-stream path has
_STREAM_ONLY = ("callback", "target_stderr", "checkpoint_dir")


def extract_options(options: RunOptions, *, features: bool = False) -> ExtractOptions:
    """The extraction part of ``compare`` options; refuses options of the streamed path only."""
    for name in _STREAM_ONLY:
        if getattr(options, name) not in (None, RunOptions.__dataclass_fields__[name].default):
            raise InvalidInputError(
                f"{name} is an option of the single-stream run, which a comparison with a "
                f"fingerprint (or one model at a time) does not use; drop {name} (or, for a "
                "drift, pass one_model_at_a_time=False / --all-models-at-once)"
            )
    if options.paired:
        raise InvalidInputError(
            f"column_a={options.column_a!r} and column_b={options.column_b!r} pair two columns "
            "of the same rows in the single-stream compare, which holds both models; a "
            "fingerprint, a grid or a one-model-at-a-time drift reads ONE column for every "
            "model: pass text_column=... (--text-column), or compare the pair with "
            "AutoCKA.from_pretrained(model_a, model_b).compare(data, column_a=..., column_b=...)"
        )
    shared = {f.name for f in fields(ExtractOptions)} & {f.name for f in fields(RunOptions)}
    return ExtractOptions(
        **{name: getattr(options, name) for name in shared},
        features=features or options.estimator != "minibatch" or options.measure != "cka",
    )


def extraction_sources(
    specs: Sequence[tuple[str, str | None]],
    layers: str | Sequence[LayerSpec],
    part: Part,
    features: bool,
    shuffle_seed: int | None,
    options: RunOptions | None,
    changes: ModelRunChanges,
) -> tuple[list[ModelSource], RunOptions, ExtractOptions]:
    """The sources, options and extraction options of ``fingerprint`` and ``grid``, validated
    (paired columns and the single-stream options refused) before any model is loaded."""
    loading, run_changes = split_changes(changes)
    options = (options or DEFAULTS).replace(**run_changes)
    check_some_layers(layers=layers)
    extraction = replace(extract_options(options, features=features), shuffle_seed=shuffle_seed)
    sources = [ModelSource(spec, revision, layers, part, loading) for spec, revision in specs]
    return sources, options, extraction


def combine(
    a: Fingerprint,
    b: Fingerprint,
    *,
    layers_a: str | Sequence[LayerSpec] = "auto",
    layers_b: str | Sequence[LayerSpec] = "auto",
    options: RunOptions | None = None,
) -> Any:
    """The ``CKAResult`` of fingerprint ``a`` (rows) against ``b`` (columns).

    ``options`` supplies ``kernel``, ``threshold``, ``estimator``, ``measure`` and
    ``measure_params`` (the exact estimators and the measures other than CKA read stored
    features), ``max_bytes``, ``null_permutations`` and ``seed``. The same fingerprint object on
    both sides with the same layers is a self-comparison.

    Raises:
        FingerprintMismatchError: the stores describe other samples, batches or settings.
    """
    started = time.perf_counter()
    options = options or RunOptions()
    check_compatible(a, b)
    index_a, index_b = a.layer_indices(layers_a), b.layer_indices(layers_b)
    names_a, names_b = [a.layers[i] for i in index_a], [b.layers[i] for i in index_b]
    same = a is b and index_a == index_b

    accumulated = Accumulated(
        new_metric(options, names_a, None if same else names_b),
        [new_metric(options, names_a, names_b) for _ in range(options.null_permutations)],
    )
    minibatch = isinstance(accumulated.metric, MinibatchCKA)

    def batches(store: Fingerprint, index: list[int]) -> list[Any]:
        return store.batches(index) if minibatch else store.batch_features(index)

    side_a = batches(a, index_a)
    side_b = side_a if same else batches(b, index_b)
    for index, (x, y) in enumerate(zip(side_a, side_b, strict=True)):
        update = "update_from_distances" if minibatch else "update"
        getattr(accumulated.metric, update)(x, None if same else y, batch_index=index)
        for draw, null in enumerate(accumulated.nulls):
            order = null_order(options.seed, index, draw, a.batch_sizes[index])
            permuted = y[:, order][:, :, order] if minibatch else [f[order] for f in y]
            getattr(null, update)(x, permuted, batch_index=index)
    metric = accumulated.metric
    stores = [a] if a is b else [a, b]
    extraction_s = sum(float(store.metadata.get("wall_time_s") or 0.0) for store in stores)
    provenance = Provenance(
        model_a=_model_provenance(a),
        model_b=_model_provenance(b),
        dtype=dtype_label(a.model.get("dtype"), b.model.get("dtype")),
        pooling=a.settings.get("pooling"),
        data=DataProvenance.from_dict(a.data),
        n_samples=metric.n_samples,
        n_batches=metric.n_batches,
        num_processes=1,
        batch_size=a.settings.get("batch_size"),
        max_length=a.settings.get("max_length"),
        sort_by_length=a.settings.get("sort_by_length"),
        target_stderr=None,
        stopped_early=False,
        shuffle_seed=a.settings.get("shuffle_seed"),
        samples_digest=a.samples_digest,
        two_phase=True,
        wall_time_s=time.perf_counter() - started + extraction_s,
        versions=library_versions(),
        **measure_fields(options),
    )
    return to_result(accumulated, names_a, names_b, provenance)


def _model_provenance(fingerprint: Fingerprint) -> ModelProvenance:
    """The model a fingerprint was made from (its ``model`` entries, without a side suffix)."""
    return ModelProvenance.from_dict({f"{k}_x": v for k, v in fingerprint.model.items()}, "x")


class Side:
    """One side of a two-phase comparison: a stored fingerprint, or a loaded model and layers."""

    def __init__(
        self,
        fingerprint: Fingerprint | None = None,
        loaded: LoadedModel | None = None,
        layers: str | Sequence[LayerSpec] = "auto",
        part: Any = "encoder",
    ) -> None:
        self.fingerprint, self.loaded = fingerprint, loaded
        if fingerprint is not None:
            self.layers = [fingerprint.layers[i] for i in fingerprint.layer_indices(layers)]
        else:
            assert loaded is not None
            self.layers = resolve_layers(loaded.model, layers, model_name=loaded.name, part=part)

    @property
    def name(self) -> str:
        if self.fingerprint is not None:
            return self.fingerprint.name
        assert self.loaded is not None
        return self.loaded.name

    def store(
        self,
        data: Any,
        pooling: str,
        options: ExtractOptions,
        reference: Fingerprint | None,
        token: HubToken,
    ) -> Fingerprint:
        """The fingerprint of this side, extracted now for a model (checked against
        ``reference``)."""
        if self.fingerprint is not None:
            if reference is not None and reference is not self.fingerprint:
                check_compatible(reference, self.fingerprint)
            return self.fingerprint
        assert self.loaded is not None
        return extract(
            self.loaded, self.layers, pooling, data, options, reference=reference, token=token
        )


def load_sides(
    specs: Sequence[tuple[str | None, str | None, str | Sequence[LayerSpec], Part]],
    pooling: str,
    loader: ModelLoader,
    token: HubToken,
) -> tuple[Side, Side | None]:
    """Side A and side B (``None``: no model B) of ``(spec, revision, layers, part)`` each: the
    fingerprint a spec names, else the model it names, loaded with ``loader``.

    Raises:
        InvalidInputError: ``pooling="tokens"``, whose samples depend on the tokenizer.
    """
    if pooling == "tokens":
        raise InvalidInputError(
            "pooling='tokens' cannot be compared through a fingerprint (its samples depend "
            "on the tokenizer); use pooling='mean' (or 'last', 'max', 'first')"
        )
    sides: list[Side | None] = []
    for spec, revision, layers, part in specs:
        if spec is None:
            sides.append(None)
            continue
        name, revision = parse_model_spec(spec, revision)
        if is_fingerprint(name, revision, token):
            stored = load_fingerprint(name, revision, token)
            sides.append(Side(fingerprint=stored, layers=layers))
        else:
            sides.append(Side(loaded=loader.load(name, revision), layers=layers, part=part))
    first, second = sides
    assert first is not None  # model A is never None
    return first, second


def reference_data(reference: Fingerprint | None, data: Any) -> Any:
    """``data``, or -- when ``None`` and a fingerprint fixes the samples -- the data it was
    made from (the probe corpus, a Hub dataset id or a local file it names)."""
    if data is not None or reference is None:
        return data
    dataset = reference.data.get("dataset")
    if dataset == "hf_cka/probe_corpus":
        return None
    if isinstance(dataset, str) and not dataset.startswith("in-memory"):
        return dataset
    raise InvalidInputError(
        f"the fingerprint of '{reference.name}' was made from {dataset!r}, which cannot be "
        "reloaded by name; pass the same data (data=...)"
    )


def compare_two_phase(
    side_a: Side,
    side_b: Side,
    data: Any,
    options: RunOptions,
    token: HubToken,
) -> Any:
    """Extract each model side separately (a stored side runs nothing) and combine."""
    pooling = options.pooling
    stored = next((s.fingerprint for s in (side_a, side_b) if s.fingerprint is not None), None)
    data = reference_data(stored, data)
    opts = extract_options(options)
    if stored is not None:
        opts = _with_shuffle(opts, stored)
        for side in (side_a, side_b):
            settings = {"pooling": pooling, "max_length": opts.max_length}
            check_settings(stored, settings, side.name)
    store_a = side_a.store(data, pooling, opts, stored, token)
    store_b = store_a if side_b is side_a else side_b.store(data, pooling, opts, store_a, token)
    return combine(
        store_a, store_b, layers_a=side_a.layers, layers_b=side_b.layers, options=options
    )


def _with_shuffle(options: ExtractOptions, reference: Fingerprint) -> ExtractOptions:
    return replace(options, shuffle_seed=reference.settings.get("shuffle_seed"))


def drift_one_at_a_time(
    base: ModelSource,
    checkpoints: Sequence[ModelSource],
    data: Any,
    options: RunOptions,
    token: HubToken,
) -> list[Any]:
    """Base-vs-checkpoint results holding ONE model at a time: the base is extracted once, then
    each checkpoint is loaded, extracted against the base's batches, freed and combined."""
    pooling = options.pooling
    opts = extract_options(options)
    base_store = fingerprint_model(base, data, pooling, opts, token=token)
    data = reference_data(base_store, data) if data is None else data
    opts = _with_shuffle(opts, base_store)
    layers = [base_store.layers[i] for i in base_store.layer_indices(base.layers)]
    results = []
    for checkpoint in checkpoints:
        store = fingerprint_model(
            checkpoint, data, pooling, opts, reference=base_store, same_layers=layers, token=token
        )
        results.append(
            combine(base_store, store, layers_a=layers, layers_b=layers, options=options)
        )
    return results
