"""``AutoCKA``: compare Hugging Face models (Hub ids, local folders, revisions) in one line.

``AutoCKA.from_pretrained`` resolves and loads the models (:mod:`hf_cka.models`) and their layers
(:mod:`hf_cka.layers`); ``compare`` and ``drift`` stream the data through them
(:mod:`hf_cka.runner`) and wrap the accumulated CKA in results with full provenance
(:mod:`hf_cka.assembly`). A fingerprint on either side gives a :class:`TwoPhaseCKA`, which
extracts the model side alone and combines the stores (:mod:`hf_cka.combine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import Unpack

from .assembly import compare_all, drift_result
from .data import load_samples
from .errors import InvalidInputError, ShapeMismatchError
from .layers import LayerSpec, Part, check_some_layers, resolve_layers
from .model_files import names_fingerprint
from .models import LoadedModel, ModelLoader
from .options import (
    DEFAULTS,
    MIN_MAX_LENGTH,
    ModelRunChanges,
    RunChanges,
    RunOptions,
    check_int,
    split_changes,
)
from .pooling import Pooling, check_pooling, check_same_tokenizer
from .runner import Comparison, Extractor, check_max_length
from .tokens import HubToken, clean_token

if TYPE_CHECKING:
    from .combine import Side
    from .drift import DriftResult
    from .fingerprint import Fingerprint
    from .grid import GridResult
    from .result import CKAResult


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
        pooling: Pooling = DEFAULTS.pooling,
        part_a: Part = "encoder",
        part_b: Part = "encoder",
        token: HubToken = None,
    ) -> None:
        check_some_layers(layers_a=layers_a, layers_b=layers_b)
        # part "vision"/"text" of a two-tower model (CLIP): that tower alone, on its processor
        self.model_a = model_a.tower(part_a)
        self.model_b = (model_b if model_b is not None else model_a).tower(part_b)
        self.same_model = self.model_b is self.model_a
        check_pooling(pooling)
        self.pooling: Pooling = pooling
        self.layers_a = resolve_layers(
            model_a.model, layers_a, model_name=model_a.name, part=part_a
        )
        self.layers_b = resolve_layers(
            self.model_b.model, layers_b, model_name=self.model_b.name, part=part_b
        )
        self._token = token  # for downloads only; never stored in results, files or repr
        if pooling == "tokens" and not self.same_model:
            check_same_tokenizer(self.model_a, self.model_b)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_a={self.model_a.name!r}, model_b={self.model_b.name!r}, "
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
        pooling: Pooling = DEFAULTS.pooling,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        trust_remote_code: bool = False,
        token: HubToken = None,
        part_a: Part = "encoder",
        part_b: Part = "encoder",
    ) -> AutoCKA:
        """Resolve and load both models (and their tokenizers or image processors).

        ``model_b=None`` -- or the same id and revision as ``model_a`` -- compares a model with
        itself: it is loaded once and runs one forward pass per batch. Either id may be
        ``"repo@revision"``. ``part_a``/``part_b`` pick a part of a model: ``"decoder"`` blocks of
        an encoder-decoder model, or one tower of a CLIP-style model (``"vision"``/``"text"``),
        which then runs alone on its part of the processor -- ``model_b=None`` with
        ``part_a="vision", part_b="text"`` compares a CLIP's image tower with its own text
        tower (on paired data: ``compare(data, column_a="image", column_b="caption")``). A PEFT
        adapter (a repo or folder with ``adapter_config.json``) is put
        on its base model; a lone adapter is compared with its base, with one copy of the
        weights. ``dtype=None`` keeps the checkpoint's dtype; accumulation is float64 whatever.
        A fingerprint (a folder or Hub dataset repo with ``fingerprint.json``, see
        :meth:`fingerprint`) stands in for a model: ``compare`` then runs only the other
        model's forward passes.

        Raises:
            InvalidInputError: an empty layer list or an unknown pooling, before any download.
        """
        check_pooling(pooling)
        check_some_layers(layers_a=layers_a, layers_b=layers_b)
        loader = ModelLoader(
            dtype=dtype,
            device=device,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            token=clean_token(token),
        )
        specs = ((model_a, revision_a, layers_a, part_a), (model_b, revision_b, layers_b, part_b))
        if any(names_fingerprint(spec, revision, token) for spec, revision, _, _ in specs):
            from .combine import load_sides

            side_a, side_b = load_sides(specs, pooling, loader, clean_token(token))
            return TwoPhaseCKA(side_a, side_b, pooling=pooling, token=clean_token(token))
        loaded_a = loader.load(model_a, revision_a)
        loaded_b = None if model_b is None else loader.load(model_b, revision_b)
        if loaded_b is None and loaded_a.base is not None:  # lone adapter: base vs adapted
            loaded_a, loaded_b = loaded_a.base, loaded_a
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

    @property
    def comparison(self) -> Comparison:
        """The model pair and layers this object compares."""
        return Comparison(self.model_a, self.model_b, self.layers_a, self.layers_b)

    # ------------------------------------------------------------------ running
    def compare(
        self, data: Any = None, options: RunOptions | None = None, **changes: Unpack[RunChanges]
    ) -> CKAResult:
        """CKA (or another ``measure``) of every layer pair over ``data``; a ``CKAResult``.

        Args:
            data: ``None`` (built-in probe corpus), a list of strings (or images, or audio
                arrays), a ``datasets.Dataset``/``IterableDataset``, a local data file or
                folder, or a Hub dataset id. With ``column_a``/``column_b`` model A reads one
                column and model B another of the same rows (images and their captions).
            options: a :class:`~hf_cka.options.RunOptions` (default: the defaults, with this
                object's ``pooling``).
            **changes: any :class:`~hf_cka.options.RunOptions` field by name, applied over
                ``options``: ``batch_size`` (>= 4), ``max_length``, ``num_samples``,
                ``text_column``, ``column_a``, ``column_b``, ``dataset_config``, ``split``,
                ``callback``, ``progress``, ``sort_by_length``, ``chunk_batches``, ``kernel``,
                ``threshold``, ``estimator``, ``max_bytes``, ``measure``, ``measure_params``,
                ``null_permutations``, ``seed``, ``target_stderr``, ``checkpoint_dir``,
                ``checkpoint_every`` (each documented there).

        A ``measure`` other than ``"cka"`` (``"mutual_knn"``, ``"procrustes"``, ``"svcca"``,
        ``"pwcca"``, ``"rsa"``; see :mod:`hf_cka.measures`) holds the pooled features of every
        layer and is computed once at the end; the result has no ``stderr`` (the measures have
        no per-batch estimate), and its metadata records ``measure`` and ``measure_params``.

        Raises:
            InvalidInputError: an option of the wrong type or value, or a ``pooling`` other than
                the one this object was built with.
            ColumnNotFoundError: a ``column_a``/``column_b`` the data does not have.
            ColumnTypeError: a column its model cannot read (images into a text model).
            FullDataMemoryError: a full-data measure whose features would exceed ``max_bytes``
                (checked before any forward pass when the data size is known).
        """
        options = self._run_options(options, changes)
        (result,) = compare_all([self.comparison], data, options, self._token)
        return result

    def _run_options(self, options: RunOptions | None, changes: RunChanges) -> RunOptions:
        """``options`` (default: the defaults with this object's pooling) with ``changes``."""
        options = (options or RunOptions(pooling=self.pooling)).replace(**changes)
        if options.pooling != self.pooling:
            raise InvalidInputError(
                f"this AutoCKA pools with pooling={self.pooling!r} (set by from_pretrained) but "
                f"the options ask for pooling={options.pooling!r}; give the options "
                f"pooling={self.pooling!r}, or from_pretrained pooling={options.pooling!r}"
            )
        return options

    @classmethod
    def drift(
        cls,
        base: str,
        checkpoints: Sequence[str],
        data: Any = None,
        *,
        revision: str | None = None,
        layers: str | Sequence[LayerSpec] = "auto",
        part: Part = "encoder",
        token: HubToken = None,
        one_model_at_a_time: bool = True,
        options: RunOptions | None = None,
        **changes: Unpack[ModelRunChanges],
    ) -> DriftResult:
        """CKA of a base model against each of several checkpoints; returns a ``DriftResult``.

        Checkpoints are Hub ids, local folders, ``"repo@revision"`` (several revisions of one
        repo work), PEFT adapters or fingerprints (see :meth:`fingerprint`). By default ONE model
        is in memory at a time: the base is extracted once, then each checkpoint is loaded,
        extracted, freed and combined with the base (k + 1 forward-pass sets). With
        ``one_model_at_a_time=False`` all models are loaded together and the data streams once
        (adapters then share one copy of the base weights). ``changes`` are how each model is
        loaded (``dtype``, ``device``, ``device_map``, ``trust_remote_code``, as in
        :meth:`from_pretrained`) and the options of :meth:`compare` (``pooling``,
        ``batch_size``, ``num_samples`` ...), validated before any model is loaded.
        """
        if isinstance(checkpoints, str) or not checkpoints:
            raise InvalidInputError(
                f"expected a non-empty list of checkpoints, got {checkpoints!r}"
            )
        loading, run_changes = split_changes(changes)
        options = (options or DEFAULTS).replace(**run_changes)
        check_some_layers(layers=layers)
        specs = [(base, revision), *((checkpoint, None) for checkpoint in checkpoints)]
        if one_model_at_a_time:
            from .combine import drift_one_at_a_time
            from .extract import ModelSource

            sources = [ModelSource(spec, rev, layers, part, loading) for spec, rev in specs]
            results = drift_one_at_a_time(
                sources[0], sources[1:], data, options, clean_token(token)
            )
            return drift_result(base, list(checkpoints), results)
        loader = ModelLoader(**loading, token=clean_token(token))
        base_model, *models = (loader.load(spec, rev) for spec, rev in specs)
        comparisons = [
            cls(base_model, model, layers_a=layers, layers_b=layers, pooling=options.pooling,
                part_a=part, part_b=part, token=token).comparison
            for model in models
        ]  # fmt: skip
        for comparison in comparisons:  # drift reads same-layer CKA: fail before any forward
            if comparison.layers_a != comparison.layers_b:
                raise ShapeMismatchError(
                    f"drift compares each layer with the same layer of the base, but "
                    f"'{comparison.model_b.name}' has layers {comparison.layers_b} and the base "
                    f"'{base_model.name}' {comparison.layers_a}; pass layers=[...] that both have"
                )
        results = compare_all(comparisons, data, options, token)
        return drift_result(base_model.name, [c.model_b.name for c in comparisons], results)

    @classmethod
    def fingerprint(
        cls,
        model: str,
        data: Any = None,
        *,
        revision: str | None = None,
        layers: str | Sequence[LayerSpec] = "auto",
        part: Part = "encoder",
        shuffle_seed: int | None = None,
        features: bool = False,
        token: HubToken = None,
        shards_dir: str | Path | None = None,
        options: RunOptions | None = None,
        **changes: Unpack[ModelRunChanges],
    ) -> Fingerprint:
        """Run ONE model over ``data`` and return its :class:`~hf_cka.fingerprint.Fingerprint`.

        The store holds, per layer and CKA batch, the float64 squared distances of the pooled
        features (and the features themselves with ``features=True``, which the exact
        estimators and the measures other than CKA read), the batch composition and sample
        digests and the model's provenance; ``save``/``push_to_hub`` it and compare
        any model with it later (``AutoCKA.from_pretrained(folder_or_repo, other)``) without
        this model. Batches are those of :meth:`compare` (``batch_size`` consecutive samples),
        after a fixed shuffle of the samples when ``shuffle_seed`` is given. The model is freed
        before returning. ``changes``: how the model is loaded (``dtype``, ``device``,
        ``device_map``, ``trust_remote_code``, as in :meth:`from_pretrained`) and the data and
        extraction fields of :class:`~hf_cka.options.RunOptions` (``pooling``, ``batch_size``,
        ``max_length``, ``num_samples``, ``text_column`` ...).
        Under several processes each extracts its share of the batches; with ``shards_dir``
        each writes its finished batches there as shards and a rerun skips complete ones
        (:mod:`hf_cka.shards`).
        """
        from .combine import extraction_sources
        from .extract import fingerprint_model

        source, options, extraction = extraction_sources(
            [(model, revision)], layers, part, features, shuffle_seed, options, changes
        )
        extraction = replace(extraction, shards_dir=shards_dir)
        return fingerprint_model(
            source[0], data, options.pooling, extraction, token=clean_token(token)
        )

    @classmethod
    def grid(
        cls,
        models: Sequence[str],
        data: Any = None,
        *,
        layers: str | Sequence[LayerSpec] = "auto",
        part: Part = "encoder",
        shuffle_seed: int | None = None,
        features: bool = False,
        token: HubToken = None,
        options: RunOptions | None = None,
        **changes: Unpack[ModelRunChanges],
    ) -> GridResult:
        """CKA (or another ``measure``) between every pair of ``models``; a
        :class:`~hf_cka.grid.GridResult`.

        Each model (Hub id, folder, ``"repo@revision"``, adapter or fingerprint) is loaded,
        extracted ONCE and freed before the next: N models cost N models' forward passes and
        one model's memory. ``changes`` are those of :meth:`drift`; every model reads the same
        column (``text_column``), so ``column_a``/``column_b`` are refused.
        """
        from .combine import extraction_sources
        from .grid import run_grid

        if isinstance(models, str):
            raise InvalidInputError(f"expected a list of models, got the string {models!r}")
        specs = [(model, None) for model in models]
        sources, options, extraction = extraction_sources(
            specs, layers, part, features, shuffle_seed, options, changes
        )
        return run_grid(sources, data, options, extraction, token=clean_token(token))

    def extract_features(
        self,
        data: Any = None,
        *,
        model: str = "a",
        batch_size: int = DEFAULTS.batch_size,
        max_length: int | None = DEFAULTS.max_length,
        num_samples: int | None = None,
        text_column: str = DEFAULTS.text_column,
        dataset_config: str | None = None,
        split: str | None = None,
        sort_by_length: bool = DEFAULTS.sort_by_length,
    ) -> dict[str, torch.Tensor]:
        """The pooled per-layer features ``{layer: (n, d)}`` exactly as CKA sees them.

        Runs on every sample in this process (no sharding); rows follow the data order. No HSIC
        is computed, so any number of samples >= 1 and any ``batch_size`` >= 1 (the forward
        batch size) work.

        Raises:
            InvalidInputError: an unknown ``model``, or a ``batch_size``/``max_length`` that is
                not an int >= 1.
            EmptyDataError: ``data`` holds no sample.
        """
        if model not in ("a", "b"):
            raise InvalidInputError(f"expected model='a' or 'b', got {model!r}")
        check_int("batch_size", batch_size, 1, "samples per forward pass")
        if max_length is not None:
            check_int("max_length", max_length, MIN_MAX_LENGTH, "or None for no truncation")
        loaded, layers = (
            (self.model_a, self.layers_a) if model == "a" else (self.model_b, self.layers_b)
        )
        check_max_length([loaded], max_length)
        samples, _ = load_samples(
            data,
            num_samples=num_samples,
            modality=loaded.modality,
            token=self._token,
            text_column=text_column,
            dataset_config=dataset_config,
            split=split,
        )
        with Extractor(loaded, layers, self.pooling) as extractor:
            return extractor.all_features(samples, batch_size, max_length, sort_by_length)


class TwoPhaseCKA(AutoCKA):
    """An :class:`~hf_cka.AutoCKA` with a fingerprint on one side (or both).

    :meth:`AutoCKA.from_pretrained` returns it when a model id names a fingerprint folder or
    Hub repo; :meth:`compare` then runs only the other model's forward passes (none when both
    sides are fingerprints) and combines the stores.
    """

    def __init__(
        self, side_a: Side, side_b: Side | None, *, pooling: Pooling, token: HubToken
    ) -> None:  # no super().__init__: a stored side has no module to hook
        self.side_a, self.side_b = side_a, side_b if side_b is not None else side_a
        self.pooling = pooling
        self.layers_a, self.layers_b = self.side_a.layers, self.side_b.layers
        # a stored side holds a Fingerprint where AutoCKA holds a LoadedModel
        self.model_a = side_a.loaded or side_a.fingerprint  # type: ignore[assignment]
        self.model_b = self.side_b.loaded or self.side_b.fingerprint  # type: ignore[assignment]
        self.same_model = self.side_b is self.side_a
        self._token = token

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
        from .combine import compare_two_phase

        options = self._run_options(options, changes)
        side_b = self.side_a if self.same_model else self.side_b
        return compare_two_phase(self.side_a, side_b, data, options, self._token)

    def extract_features(self, data: Any = None, *, model: str = "a", **options: Any) -> Any:
        """Pooled features of one side: extracted for a model, stored for a fingerprint."""
        side = self.side_a if model == "a" else self.side_b
        if side.fingerprint is None:
            assert side.loaded is not None
            auto = AutoCKA(side.loaded, layers_a=side.layers, pooling=self.pooling)
            return auto.extract_features(data, **options)
        return side.fingerprint.layer_features(side.layers)
