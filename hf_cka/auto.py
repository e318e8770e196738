"""``AutoCKA``: compare Hugging Face models (Hub ids, local folders, revisions) in one line.

``AutoCKA.from_pretrained`` resolves and loads the models (:mod:`hf_cka.models`) and their layers
(:mod:`hf_cka.layers`); ``compare`` and ``drift`` stream the data through them
(:mod:`hf_cka.runner`) and wrap the accumulated CKA in results with full provenance
(:mod:`hf_cka.result`).
"""

from __future__ import annotations

import itertools
import platform
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import Unpack

from . import distributed
from .data import MIN_BATCH, batch_samples, load_samples
from .errors import (
    EstimatorWarning,
    InvalidInputError,
    ShapeMismatchError,
    TokenizerMismatchError,
)
from .layers import LayerSpec, Part, resolve_layers
from .logging import warn
from .metric import MinibatchCKA
from .models import LoadedModel, ModelLoader
from .options import DEFAULTS, MIN_MAX_LENGTH, RunChanges, RunOptions, check_int
from .pooling import Pooling, check_pooling
from .provenance import DataProvenance, Provenance
from .runner import Accumulated, Comparison, Extractor, check_max_length, run_comparisons
from .tokens import clean_token

if TYPE_CHECKING:
    from .result import CKAResult, DriftResult

ESTIMATOR_LABELS = {
    "minibatch": "minibatch-unbiased-hsic",  # Nguyen et al. 2020
    "linear": "exact-linear-cka",  # Kornblith et al. 2019, biased HSIC, streamed
    "debiased": "exact-debiased-linear-cka",  # U-centred HSIC (Song et al. 2012), streamed
}


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
        token: str | bool | None = None,
    ) -> None:
        _check_some_layers(layers_a=layers_a, layers_b=layers_b)
        self.model_a = model_a
        self.model_b = model_b if model_b is not None else model_a
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
        pooling: Pooling = DEFAULTS.pooling,
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
        ``"repo@revision"``. A PEFT adapter (a repo or folder with ``adapter_config.json``) is put
        on its base model; a lone adapter is compared with its base, with one copy of the
        weights. ``dtype=None`` keeps the checkpoint's dtype; accumulation is float64 whatever.

        Raises:
            InvalidInputError: an empty layer list or an unknown pooling, before any download.
        """
        check_pooling(pooling)
        _check_some_layers(layers_a=layers_a, layers_b=layers_b)
        loader = ModelLoader(
            dtype=dtype,
            device=device,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            token=clean_token(token),
        )
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

    @property
    def comparison(self) -> Comparison:
        """The model pair and layers this object compares."""
        return Comparison(self.model_a, self.model_b, self.layers_a, self.layers_b)

    # ------------------------------------------------------------------ running
    def compare(
        self, data: Any = None, options: RunOptions | None = None, **changes: Unpack[RunChanges]
    ) -> CKAResult:
        """Minibatch CKA of every layer pair over ``data``; returns a ``CKAResult``.

        Args:
            data: ``None`` (built-in probe corpus), a list of strings (or images), a
                ``datasets.Dataset``/``IterableDataset``, a local data file or folder, or a Hub
                dataset id.
            options: a :class:`~hf_cka.options.RunOptions` (default: the defaults, with this
                object's ``pooling``).
            **changes: any :class:`~hf_cka.options.RunOptions` field by name, applied over
                ``options``: ``batch_size`` (>= 4), ``max_length``, ``num_samples``,
                ``text_column``, ``dataset_config``, ``split``, ``callback``, ``progress``,
                ``sort_by_length``, ``chunk_batches``, ``kernel``, ``threshold``, ``estimator``,
                ``max_bytes``, ``null_permutations``, ``seed``, ``target_stderr``,
                ``checkpoint_dir``, ``checkpoint_every`` (each documented there).

        Raises:
            InvalidInputError: an option of the wrong type or value, or a ``pooling`` other than
                the one this object was built with.
        """
        options = (options or RunOptions(pooling=self.pooling)).replace(**changes)
        if options.pooling != self.pooling:
            raise InvalidInputError(
                f"this AutoCKA pools with pooling={self.pooling!r} (set by from_pretrained) but "
                f"the options ask for pooling={options.pooling!r}; give the options "
                f"pooling={self.pooling!r}, or from_pretrained pooling={options.pooling!r}"
            )
        (result,) = _compare_all([self.comparison], data, options, self._token)
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
        part: Part = "encoder",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        trust_remote_code: bool = False,
        token: str | bool | None = None,
        options: RunOptions | None = None,
        **changes: Unpack[RunChanges],
    ) -> DriftResult:
        """CKA of a base model against each of several checkpoints; returns a ``DriftResult``.

        Checkpoints are Hub ids, local folders, ``"repo@revision"`` (several revisions of one
        repo work) or PEFT adapters (put on the base model: one copy of its weights). All models
        are loaded together and the data streams once: per batch the base model runs ONE
        forward pass shared by the k comparisons (k + 1 passes, not 2k). ``options`` and
        ``changes`` are those of :meth:`compare` (``pooling``, ``batch_size``, ``num_samples``
        ...), validated before any model is loaded.
        """
        if isinstance(checkpoints, str) or not checkpoints:
            raise InvalidInputError(
                f"expected a non-empty list of checkpoints, got {checkpoints!r}"
            )
        options = (options or DEFAULTS).replace(**changes)
        _check_some_layers(layers=layers)
        loader = ModelLoader(
            dtype=dtype,
            device=device,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            token=clean_token(token),
        )
        base_model = loader.load(base, revision)
        comparisons = [
            cls(
                base_model,
                loader.load(checkpoint),
                layers_a=layers,
                layers_b=layers,
                pooling=options.pooling,
                part_a=part,
                part_b=part,
                token=token,
            ).comparison
            for checkpoint in checkpoints
        ]
        for comparison in comparisons:  # drift reads same-layer CKA: fail before any forward
            if comparison.layers_a != comparison.layers_b:
                raise ShapeMismatchError(
                    f"drift compares each layer with the same layer of the base, but "
                    f"'{comparison.model_b.name}' has layers {comparison.layers_b} and the base "
                    f"'{base_model.name}' {comparison.layers_a}; pass layers=[...] that both have"
                )
        results = _compare_all(comparisons, data, options, token)
        from .result import DriftResult

        return DriftResult(
            base=base_model.name,
            checkpoints=[c.model_b.name for c in comparisons],
            results=results,
            metadata=Provenance.from_dict(results[0].metadata).drift_dict(),
        )

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
        rows: dict[str, list[torch.Tensor]] = {spec: [] for spec in layers}
        with Extractor(loaded, layers, self.pooling) as extractor:
            for batch in _batches(samples, batch_size):
                encodings = extractor.encode(batch, max_length)
                (feats,) = extractor.chunk_features(
                    encodings, [len(batch)], batch_size, sort_by_length
                )
                for spec in layers:
                    rows[spec].append(feats[spec])
        return {spec: torch.cat(parts).cpu() for spec, parts in rows.items()}


def _batches(samples: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """The batches ``compare`` would form (a tail of < 4 samples joins the batch before it), so
    the features match its own bit for bit; with ``size`` < 4 or fewer than 4 samples, plain
    consecutive batches of ``size`` (the last one possibly shorter)."""
    head = list(itertools.islice(samples, MIN_BATCH))
    if size >= MIN_BATCH and len(head) == MIN_BATCH:
        yield from batch_samples(itertools.chain(head, samples), size)
        return
    samples = itertools.chain(head, samples)
    while batch := list(itertools.islice(samples, size)):
        yield batch


def _check_some_layers(**layer_lists: str | Sequence[LayerSpec]) -> None:
    """Refuse an empty layer list (``layers_a=[]``) before any model is loaded."""
    for name, layers in layer_lists.items():
        if not isinstance(layers, str) and len(layers) == 0:
            raise InvalidInputError(
                f"expected at least one layer in {name}, got an empty list; pass 'auto' (the "
                "embedding output and every block), module names or indices such as [0, -1]"
            )


def _compare_all(
    comparisons: list[Comparison],
    data: Any,
    options: RunOptions,
    token: str | bool | None,
) -> list[CKAResult]:
    """Run the comparisons over ``data`` in one stream and wrap each in a ``CKAResult``."""
    from .result import CKAResult

    outcome = run_comparisons(comparisons, data, options, token=token)
    versions = _library_versions()
    results = []
    for comparison, accumulated in zip(comparisons, outcome.accumulated, strict=True):
        metric = accumulated.metric
        provenance = Provenance(
            model_a=comparison.model_a.provenance(),
            model_b=comparison.model_b.provenance(),
            dtype=_dtype_label(comparison),
            pooling=options.pooling,
            estimator=ESTIMATOR_LABELS[options.estimator],
            data=DataProvenance.from_dict(outcome.data_info),
            n_samples=metric.n_samples,
            n_batches=metric.n_batches,
            num_processes=distributed.num_processes(),
            batch_size=options.batch_size,
            max_length=options.max_length,
            kernel=options.kernel,
            threshold=options.threshold if options.kernel == "rbf" else None,
            sort_by_length=options.sort_by_length,
            null_permutations=options.null_permutations,
            target_stderr=options.target_stderr,
            stopped_early=outcome.stopped_early,
            wall_time_s=outcome.wall_time_s,
            versions=versions,
        )
        results.append(
            CKAResult(
                matrix=metric.compute(),
                layers_a=list(comparison.layers_a),
                layers_b=list(comparison.layers_b),
                model_a=comparison.model_a.name,
                model_b=comparison.model_b.name,
                metadata=provenance.to_dict(),
                stderr=_stderr(accumulated),
                null=accumulated.null_matrix(),
            )
        )
    return results


def _stderr(accumulated: Accumulated) -> torch.Tensor | None:
    """Standard errors of a minibatch estimate, or ``None``: the exact estimators have none, and
    fewer than two batches cannot give one (a warning says so)."""
    if not isinstance(accumulated.metric, MinibatchCKA):
        return None
    if accumulated.metric.n_batches >= 2:
        return accumulated.metric.compute_stderr()
    warn(
        "only one batch was accumulated, so no standard error can be estimated; use a smaller "
        "batch_size or more data to get error bars",
        EstimatorWarning,
        stacklevel=3,
    )
    return None


def _dtype_label(comparison: Comparison) -> str:
    a, b = comparison.model_a.dtype, comparison.model_b.dtype
    return a if a == b else f"{a}/{b}"


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("hf_cka", "torch", "transformers", "datasets", "accelerate", "huggingface_hub"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
