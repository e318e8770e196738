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
from typing import Any

import torch
from typing_extensions import Unpack

from .auto import AutoCKA
from .errors import InvalidInputError
from .extract import ExtractOptions, ModelSource, extract, fingerprint_model
from .fingerprint import Fingerprint, check_compatible, check_settings, load_fingerprint
from .layers import LayerSpec, Part, resolve_layers
from .metric import MinibatchCKA
from .models import LoadedModel, ModelLoader, is_fingerprint, parse_model_spec
from .options import RunChanges, RunOptions
from .pooling import Pooling
from .statistics import null_order
from .streaming import new_accumulator

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
    return ExtractOptions(
        batch_size=options.batch_size,
        max_length=options.max_length,
        num_samples=options.num_samples,
        text_column=options.text_column,
        dataset_config=options.dataset_config,
        split=options.split,
        sort_by_length=options.sort_by_length,
        chunk_batches=options.chunk_batches,
        features=features or options.estimator != "minibatch",
        progress=options.progress,
    )


def combine(
    a: Fingerprint,
    b: Fingerprint,
    *,
    layers_a: str | Sequence[LayerSpec] = "auto",
    layers_b: str | Sequence[LayerSpec] = "auto",
    options: RunOptions | None = None,
) -> Any:
    """The ``CKAResult`` of fingerprint ``a`` (rows) against ``b`` (columns).

    ``options`` supplies ``kernel``, ``threshold``, ``estimator`` (the exact ones need stored
    features), ``max_bytes``, ``null_permutations`` and ``seed``. The same fingerprint object on
    both sides with the same layers is a self-comparison.

    Raises:
        FingerprintMismatchError: the stores describe other samples, batches or settings.
    """
    from .auto import ESTIMATOR_LABELS, _library_versions, _stderr
    from .result import CKAResult
    from .runner import Accumulated

    started = time.perf_counter()
    options = options or RunOptions()
    check_compatible(a, b)
    index_a, index_b = a.layer_indices(layers_a), b.layer_indices(layers_b)
    names_a, names_b = [a.layers[i] for i in index_a], [b.layers[i] for i in index_b]
    same = a is b and index_a == index_b

    def accumulator(two_sided: bool) -> Any:
        return new_accumulator(
            options.estimator,
            len(names_a),
            len(names_b) if two_sided else None,
            kernel=options.kernel,
            threshold=options.threshold,
            layer_names_a=names_a,
            layer_names_b=names_b,
            max_bytes=options.max_bytes,
        )

    accumulated = Accumulated(
        accumulator(not same), [accumulator(True) for _ in range(options.null_permutations)]
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
    dtypes = a.model.get("dtype"), b.model.get("dtype")
    metadata = {
        **_side(a, "a"),
        **_side(b, "b"),
        "dtype": dtypes[0] if dtypes[0] == dtypes[1] else f"{dtypes[0]}/{dtypes[1]}",
        "pooling": a.settings.get("pooling"),
        "estimator": ESTIMATOR_LABELS[options.estimator],
        **a.data,
        "n_samples": metric.n_samples,
        "n_batches": metric.n_batches,
        "num_processes": 1,
        "batch_size": a.settings.get("batch_size"),
        "max_length": a.settings.get("max_length"),
        "shuffle_seed": a.settings.get("shuffle_seed"),
        "kernel": options.kernel,
        "threshold": options.threshold if options.kernel == "rbf" else None,
        "sort_by_length": a.settings.get("sort_by_length"),
        "null_permutations": options.null_permutations,
        "target_stderr": None,
        "stopped_early": False,
        "samples_digest": a.samples_digest,
        "two_phase": True,
        "wall_time_s": time.perf_counter() - started + extraction_s,
        "versions": _library_versions(),
    }
    return CKAResult(
        matrix=metric.compute(),
        layers_a=names_a,
        layers_b=names_b,
        model_a=a.name,
        model_b=b.name,
        metadata=metadata,
        stderr=_stderr(accumulated),
        null=accumulated.null_matrix(),
    )


def _side(fingerprint: Fingerprint, suffix: str) -> dict[str, Any]:
    """Model provenance entries of one side (``model_a``, ``revision_a``, ...)."""
    skip = ("dtype", "modality")
    return {f"{k}_{suffix}": v for k, v in fingerprint.model.items() if k not in skip}


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
        token: str | bool | None,
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
    token: str | bool | None,
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
    from dataclasses import replace

    return replace(options, shuffle_seed=reference.settings.get("shuffle_seed"))


def drift_one_at_a_time(
    base: ModelSource,
    checkpoints: Sequence[ModelSource],
    data: Any,
    options: RunOptions,
    token: str | bool | None,
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


class TwoPhaseCKA(AutoCKA):
    """An :class:`~hf_cka.AutoCKA` with a fingerprint on one side (or both).

    :meth:`AutoCKA.from_pretrained` returns it when a model id names a fingerprint folder or
    Hub repo; :meth:`compare` then runs only the other model's forward passes (none when both
    sides are fingerprints) and combines the stores.
    """

    def __init__(
        self, side_a: Side, side_b: Side | None, *, pooling: Pooling, token: str | bool | None
    ) -> None:  # no super().__init__: a stored side has no module to hook
        self.side_a, self.side_b = side_a, side_b if side_b is not None else side_a
        self.pooling = pooling
        self.layers_a, self.layers_b = self.side_a.layers, self.side_b.layers
        # a stored side holds a Fingerprint where AutoCKA holds a LoadedModel
        self.model_a = side_a.loaded or side_a.fingerprint  # type: ignore[assignment]
        self.model_b = self.side_b.loaded or self.side_b.fingerprint  # type: ignore[assignment]
        self.same_model = self.side_b is self.side_a
        self._token = token

    def __repr__(self) -> str:
        return (
            f"TwoPhaseCKA(model_a={self.side_a.name!r}, model_b={self.side_b.name!r}, "
            f"layers={len(self.layers_a)}x{len(self.layers_b)}, pooling={self.pooling!r})"
        )

    @classmethod
    def from_sources(
        cls,
        model_a: str,
        model_b: str | None,
        *,
        revision_a: str | None = None,
        revision_b: str | None = None,
        layers_a: str | Sequence[LayerSpec] = "auto",
        layers_b: str | Sequence[LayerSpec] = "auto",
        pooling: Pooling = "mean",
        part_a: Part = "encoder",
        part_b: Part = "encoder",
        token: str | bool | None = None,
        **loading: Any,
    ) -> TwoPhaseCKA:
        """Load the fingerprint side(s) and the model side (see ``AutoCKA.from_pretrained``)."""
        if pooling == "tokens":
            raise InvalidInputError(
                "pooling='tokens' cannot be compared through a fingerprint (its samples depend "
                "on the tokenizer); use pooling='mean' (or 'last', 'max', 'first')"
            )
        loader = ModelLoader(token=token, **loading)

        def side(spec: str, revision: str | None, layers: Any, part: Part) -> Side:
            name, revision = parse_model_spec(spec, revision)
            if is_fingerprint(name, revision, token):
                return Side(fingerprint=load_fingerprint(name, revision, token), layers=layers)
            return Side(loaded=loader.load(name, revision), layers=layers, part=part)

        first = side(model_a, revision_a, layers_a, part_a)
        second = None if model_b is None else side(model_b, revision_b, layers_b, part_b)
        return cls(first, second, pooling=pooling, token=token)

    @property
    def comparison(self) -> Any:
        raise InvalidInputError(
            "a comparison with a fingerprint has no model pair to stream; call compare()"
        )

    def compare(
        self, data: Any = None, options: RunOptions | None = None, **changes: Unpack[RunChanges]
    ) -> Any:
        """CKA over ``data`` (default: the data the fingerprint was made from); the options
        are those of :meth:`AutoCKA.compare` except ``callback``, ``target_stderr`` and
        ``checkpoint_dir``. Returns a ``CKAResult``."""
        options = (options or RunOptions(pooling=self.pooling)).replace(**changes)
        if options.pooling != self.pooling:
            raise InvalidInputError(
                f"this AutoCKA pools with pooling={self.pooling!r} (set by from_pretrained) but "
                f"the options ask for pooling={options.pooling!r}"
            )
        side_b = self.side_a if self.same_model else self.side_b
        return compare_two_phase(self.side_a, side_b, data, options, self._token)

    def extract_features(self, data: Any = None, *, model: str = "a", **options: Any) -> Any:
        """Pooled features of one side: extracted for a model, stored for a fingerprint."""
        side = self.side_a if model == "a" else self.side_b
        if side.fingerprint is None:
            assert side.loaded is not None
            auto = AutoCKA(side.loaded, layers_a=side.layers, pooling=self.pooling)
            return auto.extract_features(data, **options)
        indices = side.fingerprint.layer_indices(side.layers)
        rows = side.fingerprint.batch_features(indices)
        return {
            side.layers[k]: torch.cat([batch[k] for batch in rows]) for k in range(len(indices))
        }
