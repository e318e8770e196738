"""Provenance of a CKA run: which models, data and settings produced a result.

:class:`Provenance` is built once, by the orchestration layer (:mod:`hf_cka.auto`), and read by
attribute by the dataset card and the CLI summary. On disk and on the Hub it is the plain
``CKAResult.metadata`` dict (:meth:`Provenance.to_dict`); :meth:`Provenance.from_dict` reads
such a dict back, including one saved by an older version that lacks some keys (they read as
``None``) or one with keys this version does not know (they are ignored).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ESTIMATOR_LABELS = {
    "minibatch": "minibatch-unbiased-hsic",  # Nguyen et al. 2020
    "linear": "exact-linear-cka",  # Kornblith et al. 2019, biased HSIC, streamed
    "debiased": "exact-debiased-linear-cka",  # U-centred HSIC (Song et al. 2012), streamed
}
"""The ``estimator`` a result records for each ``RunOptions.estimator``."""
DRIFT_KEYS = (
    "pooling", "estimator", "dataset", "dataset_config", "split", "n_samples", "n_batches",
    "batch_size", "max_length", "num_processes", "versions", "wall_time_s", "measure",
    "measure_params",
)  # fmt: skip
"""The metadata keys a drift analysis shares with each of its runs."""
_FILLED_BY_RESULT = ("run_id", "created_at")
_TWO_PHASE = ("shuffle_seed", "samples_digest", "two_phase")  # saved only when set
_SAVED_WHEN_SET = ("text_column", "data_revision")


@dataclass(frozen=True)
class ModelProvenance:
    """One side of a comparison: the model, its revision and commit, its tower, and its base if
    an adapter.

    Saved as ``model_a``, ``revision_a``, ``commit_sha_a`` (side ``"a"``), for a tower of a
    two-tower model ``part_a``, and for an adapter ``adapter_a``, ``base_model_a`` and
    ``base_commit_sha_a``.
    """

    name: str | None
    revision: str | None = None
    commit_sha: str | None = None
    part: str | None = None  # "vision" or "text" for a tower of a two-tower model only
    base_model: str | None = None  # set for a PEFT adapter only
    base_commit_sha: str | None = None

    def to_dict(self, side: str) -> dict[str, Any]:
        """The metadata entries of side ``side`` (``"a"`` or ``"b"``)."""
        info = {
            f"model_{side}": self.name,
            f"revision_{side}": self.revision,
            f"commit_sha_{side}": self.commit_sha,
        }
        if self.part is not None:
            info[f"part_{side}"] = self.part
        if self.base_model is not None:
            info[f"adapter_{side}"] = self.name
            info[f"base_model_{side}"] = self.base_model
            info[f"base_commit_sha_{side}"] = self.base_commit_sha
        return info

    @classmethod
    def from_dict(cls, metadata: Mapping[str, Any], side: str) -> ModelProvenance:
        """Side ``side`` of a metadata dict written by :meth:`to_dict`."""
        return cls(
            name=metadata.get(f"model_{side}"),
            revision=metadata.get(f"revision_{side}"),
            commit_sha=metadata.get(f"commit_sha_{side}"),
            part=metadata.get(f"part_{side}"),
            base_model=metadata.get(f"base_model_{side}"),
            base_commit_sha=metadata.get(f"base_commit_sha_{side}"),
        )

    def same_weights(self, other: ModelProvenance) -> bool:
        """Whether both name the same revision, commit and tower (the model names aside)."""
        return (self.revision, self.commit_sha, self.part) == (
            other.revision,
            other.commit_sha,
            other.part,
        )


@dataclass(frozen=True)
class DataProvenance:
    """Where the samples came from: a Hub dataset (with config and split), a file, or memory.

    ``text_column`` is the column every model read; with paired data model A read ``columns[0]``
    and model B ``columns[1]`` of the same rows (saved as ``column_a`` and ``column_b``).
    ``data_revision`` (a two-phase run) is the commit sha of the Hub dataset or the sha256 of the
    probe corpus its fingerprints were made from. Each of these is saved only when set.
    """

    dataset: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    text_column: str | None = None
    columns: tuple[str, str] | None = None
    data_revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        info = {"dataset": self.dataset, "dataset_config": self.dataset_config, "split": self.split}
        for name in _SAVED_WHEN_SET:
            if getattr(self, name) is not None:
                info[name] = getattr(self, name)
        if self.columns is not None:
            info["column_a"], info["column_b"] = self.columns
        return info

    def same_column(self) -> bool:
        """Whether both models read the same column (always, without paired data)."""
        return self.columns is None or self.columns[0] == self.columns[1]

    @classmethod
    def from_dict(cls, metadata: Mapping[str, Any]) -> DataProvenance:
        """Read back :meth:`to_dict`; ``columns`` only when both ``column_a`` and ``column_b``
        are there."""
        pair = (metadata.get("column_a"), metadata.get("column_b"))
        columns = None if None in pair else (str(pair[0]), str(pair[1]))
        fields = [name for name in _field_names(cls) if name != "columns"]
        return cls(**{name: metadata.get(name) for name in fields}, columns=columns)

    def label(self) -> str | None:
        """``dataset/config:split`` with the parts that are known (``None`` without a dataset)."""
        if not self.dataset:
            return None
        config = f"/{self.dataset_config}" if self.dataset_config else ""
        return f"{self.dataset}{config}{f':{self.split}' if self.split else ''}"


@dataclass(frozen=True)
class Provenance:
    """Everything a CKA result records about how it was computed.

    ``run_id`` and ``created_at`` are filled in by :class:`~hf_cka.CKAResult` itself; they are
    here so that a saved result reads back whole.
    """

    model_a: ModelProvenance
    model_b: ModelProvenance
    dtype: str | None = None
    pooling: str | None = None
    estimator: str | None = None  # the CKA estimator; None for another measure
    data: DataProvenance = field(default_factory=DataProvenance)
    n_samples: int | None = None
    n_batches: int | None = None
    num_processes: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    measure: str | None = None  # "cka", or a full-data measure of hf_cka.measures
    measure_params: dict[str, Any] | None = None
    kernel: str | None = None
    threshold: float | None = None
    sort_by_length: bool | None = None
    null_permutations: int | None = None
    target_stderr: float | None = None
    stopped_early: bool | None = None
    shuffle_seed: int | None = None  # a two-phase run: the fixed shuffle of its fingerprints
    samples_digest: str | None = None  # a two-phase run: sha256 of the samples, in data order
    two_phase: bool | None = None  # True: combined from fingerprints (hf_cka.combine)
    wall_time_s: float | None = None
    versions: dict[str, str] | None = None
    run_id: str | None = None
    created_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable ``metadata`` dict of a result (the saved and pushed form).

        ``run_id`` and ``created_at`` are left out while unset, so the result fills them in; the
        fields of a two-phase run (``shuffle_seed``, ``samples_digest``, ``two_phase``) are left
        out of any other run.
        """
        flat: dict[str, Any] = {}
        for name in _field_names(Provenance):
            value = getattr(self, name)
            if isinstance(value, ModelProvenance):
                flat.update(value.to_dict(side=name.removeprefix("model_")))
            elif isinstance(value, DataProvenance):
                flat.update(value.to_dict())
            elif value is not None or name not in (*_FILLED_BY_RESULT, *_TWO_PHASE):
                flat[name] = value
        return flat

    @classmethod
    def from_dict(cls, metadata: Mapping[str, Any]) -> Provenance:
        """Read back a metadata dict; missing keys read as ``None``, unknown ones are ignored."""
        nested = ("model_a", "model_b", "data")
        return cls(
            model_a=ModelProvenance.from_dict(metadata, "a"),
            model_b=ModelProvenance.from_dict(metadata, "b"),
            data=DataProvenance.from_dict(metadata),
            **{name: metadata.get(name) for name in _field_names(cls) if name not in nested},
        )

    def drift_dict(self) -> dict[str, Any]:
        """The entries a drift analysis shares with this run (:data:`DRIFT_KEYS`)."""
        flat = self.to_dict()
        return {key: flat.get(key) for key in DRIFT_KEYS}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def library_versions() -> dict[str, str]:
    """The versions of Python and of the libraries a result depends on (its ``versions``)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("hf_cka", "torch", "transformers", "datasets", "accelerate", "huggingface_hub"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
