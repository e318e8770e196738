"""Inputs -> samples -> CKA batches (encoding them for a model is :mod:`hf_cka.encoding`).

Samples are examples (texts, images or audio). Every model encodes the SAME samples with its own
tokenizer, image processor or feature extractor, so the minibatches of the two models always hold
the same examples even when their tokenizers differ.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .data_sources import load_dataset_split
from .errors import (
    ColumnNotFoundError,
    ColumnTypeError,
    EmptyDataError,
    InvalidInputError,
)
from .tokens import HubToken

MIN_BATCH = 4
IMAGE_COLUMNS = ("image", "img", "pixel_values")
DEFAULT_COLUMN = "text"
AUTO_COLUMNS = {"image": IMAGE_COLUMNS, "audio": ("audio",)}
"""Columns an image or audio model reads when ``text_column`` is left at its default or absent."""


@dataclass(frozen=True)
class PairedColumn:
    """One side of paired data: the option naming the column, the column, the model's input."""

    option: str  # "column_a" or "column_b"
    column: str
    modality: str  # "text", "image" or "audio"


def probe_corpus() -> list[str]:
    """The built-in probe corpus: varied English sentences written for this project."""
    text = resources.files("hf_cka").joinpath("resources/probe_corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def load_samples(
    data: Any = None,
    *,
    text_column: str = DEFAULT_COLUMN,
    dataset_config: str | None = None,
    split: str | None = None,
    num_samples: int | None = None,
    modality: str = "text",
    token: HubToken = None,
    paired: Sequence[PairedColumn] = (),
) -> tuple[Iterator[Any], dict[str, Any]]:
    """Validated samples from ``data`` (capped at ``num_samples``) and a provenance dict.

    ``data`` is ``None`` (the probe corpus), a sequence of strings (or images, or audio), a
    ``datasets.Dataset``/``IterableDataset``, a local csv/tsv/json/jsonl/parquet/txt file or a
    folder, or a Hub dataset id (with ``dataset_config`` and ``split``, default ``"train"``).

    With ``paired`` columns (a dataset, file, folder or Hub id only) every sample is a dict
    ``{column: value}`` of one row, each model reading its own column, so both models always
    see the same rows. The columns are checked against the models' inputs on the first row,
    before any forward pass.

    Raises:
        ColumnNotFoundError: a column the dataset does not have (named with its option).
        ColumnTypeError: a paired column holding values its model cannot take.
    """
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise InvalidInputError(f"expected num_samples >= 1 or None, got {num_samples!r}")
    if not isinstance(data, (str, os.PathLike)) and (split, dataset_config) != (None, None):
        raise InvalidInputError(
            f"split and dataset_config choose part of a data file, folder or Hub dataset, got "
            f"split={split!r} and dataset_config={dataset_config!r} with data of type "
            f"{type(data).__name__}; drop them, or pick the split yourself (e.g. ds['test'])"
        )
    info: dict[str, Any] = {"dataset": None, "dataset_config": None, "split": None}
    if data is None:
        info["dataset"] = "hf_cka/probe_corpus"
        samples: Iterable[Any] = probe_corpus()
    elif isinstance(data, (str, os.PathLike)):
        if not os.fspath(data).strip():
            raise InvalidInputError(
                "expected data as a file or folder path, a Hub dataset id or a list of texts, "
                "got an empty string"
            )
        dataset, info = load_dataset_split(os.fspath(data), dataset_config, split, token)
        samples = (
            _columns(dataset, paired, info) if paired else _column(dataset, text_column, modality)
        )
        info.update(_column_info(samples, paired))
    elif _is_dataset(data):
        info["dataset"] = getattr(data.info, "dataset_name", None) or "in-memory Dataset"
        info["split"] = str(data.split) if data.split is not None else None
        samples = _columns(data, paired, info) if paired else _column(data, text_column, modality)
        info.update(_column_info(samples, paired))
    elif paired:
        raise InvalidInputError(
            f"column_a and column_b pick two columns of a dataset, got data of type "
            f"{type(data).__name__}; pass a datasets.Dataset (e.g. Dataset.from_dict({{"
            f"{paired[0].column!r}: [...], {paired[1].column!r}: [...]}})), a data file or a Hub "
            "dataset id"
        )
    elif isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        info["dataset"] = "in-memory list"
        samples = data
    else:
        splits = f": pick one split, e.g. data=data[{next(iter(data))!r}]" if _is_dict(data) else ""
        raise InvalidInputError(
            f"expected data as None, a list of strings, a datasets.Dataset, a file/folder path "
            f"or a Hub dataset id, got {type(data).__name__}{splits}"
        )
    try:
        size: int | None = len(samples)  # type: ignore[arg-type]
    except TypeError:  # a generator or an IterableDataset: size unknown
        size = None
    info["size"] = size if num_samples is None or size is None else min(size, num_samples)
    source = info["dataset"]
    checks = {item.column: item.modality for item in paired} if paired else None
    return _validated(itertools.islice(samples, num_samples), modality, source, checks), info


def _column_info(samples: Any, paired: Sequence[PairedColumn]) -> dict[str, Any]:
    """The provenance of the column(s) read: ``text_column``, or ``column_a``/``column_b``."""
    if paired:
        return {item.option: item.column for item in paired}
    return {"text_column": samples.column_name}


def _is_dataset(data: Any) -> bool:
    try:
        from datasets import Dataset, IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, (Dataset, IterableDataset))


def _is_dict(data: Any) -> bool:
    """Whether ``data`` is a non-empty ``datasets.DatasetDict`` (or its iterable twin)."""
    from datasets import DatasetDict, IterableDatasetDict

    return isinstance(data, (DatasetDict, IterableDatasetDict)) and len(data) > 0


class _ColumnIterable:
    """Iterates one column of a ``datasets`` dataset without materialising the others."""

    def __init__(self, dataset: Any, column_name: str) -> None:
        self.dataset, self.column_name = dataset, column_name

    def __len__(self) -> int:
        return len(self.dataset)  # TypeError for an IterableDataset: the size is unknown

    def __iter__(self) -> Iterator[Any]:
        for row in self.dataset.select_columns([self.column_name]):
            yield row[self.column_name]


class _RowsIterable:
    """Iterates rows of a ``datasets`` dataset as ``{column: value}`` dicts of a few columns."""

    def __init__(self, dataset: Any, columns: Sequence[str]) -> None:
        self.dataset, self.columns = dataset, list(dict.fromkeys(columns))

    def __len__(self) -> int:
        return len(self.dataset)  # TypeError for an IterableDataset: the size is unknown

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.dataset.select_columns(self.columns)


def _columns(dataset: Any, paired: Sequence[PairedColumn], info: Mapping[str, Any]) -> Any:
    """The rows of ``dataset`` restricted to the paired columns, checked on the first row."""
    columns = list(dataset.column_names or [])
    for item in paired:
        if item.column not in columns:
            raise ColumnNotFoundError(
                f"column {item.column!r} ({item.option}) not found in {info.get('dataset')}; the "
                f"dataset has columns {columns}: pass {item.option}=<one of them> "
                f"(--{item.option.replace('_', '-')})"
            )
    rows = _RowsIterable(dataset, [item.column for item in paired])
    first = next(iter(rows), None)  # no row: EmptyDataError once the samples are read
    for item in paired if first is not None else ():
        value = first[item.column]  # type: ignore[index]
        found = sample_kind(value)
        if found != item.modality:
            raise ColumnTypeError(
                f"column {item.column!r} ({item.option}) holds {found} "
                f"({type(value).__name__}), but model {item.option[-1].upper()} "
                f"reads {item.modality}; pass a {item.modality} column as {item.option}"
            )
    return rows


def sample_kind(value: Any) -> str:
    """``"text"``, ``"image"``, ``"audio"`` or else ``"neither text, image nor audio"``: what a
    dataset value holds.

    Audio is a ``datasets.Audio`` value (a decoded ``{"array", "sampling_rate"}`` dict or a
    decoder with ``get_all_samples``), or a 1-d array of samples; images are PIL images or
    arrays of 2 or 3 dimensions.
    """
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping) and "array" in value:
        return "audio"
    if callable(getattr(value, "get_all_samples", None)):
        return "audio"
    if type(value).__module__.startswith("PIL."):
        return "image"
    ndim = getattr(value, "ndim", None)
    if ndim is None and isinstance(value, (list, tuple)) and value:
        ndim = 1 if isinstance(value[0], (int, float)) else None
    return {1: "audio", 2: "image", 3: "image"}.get(ndim, "neither text, image nor audio")  # type: ignore[arg-type]


def _column(dataset: Any, column: str, modality: str) -> _ColumnIterable:
    columns = list(dataset.column_names or [])
    if modality in AUTO_COLUMNS and (column not in columns or column == DEFAULT_COLUMN):
        # an image or audio model reads its own column, not a caption column named "text"
        column = next((c for c in AUTO_COLUMNS[modality] if c in columns), column)
    if column not in columns:
        raise ColumnNotFoundError(
            f"column '{column}' not found; the dataset has columns {columns}: pass "
            "text_column=<one of them> (--text-column)"
        )
    return _ColumnIterable(dataset, column)


def _validated(
    samples: Iterable[Any],
    modality: str,
    source: str,
    paired: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Yield samples, rejecting non-strings and empty strings for text models (in each text
    column of ``paired`` rows, ``{column: modality}``)."""
    count = 0
    for index, sample in enumerate(samples):
        if paired is None:
            _check_text(sample, modality, index)
        else:
            for column, column_modality in paired.items():
                _check_text(sample[column], column_modality, index, column)
        count += 1
        yield sample
    if count == 0:
        raise EmptyDataError(
            f"the data ({source}) yielded no samples; pass at least 4 texts or images"
        )


def _check_text(sample: Any, modality: str, index: int, column: str | None = None) -> None:
    """Refuse a non-string or empty sample for a text model."""
    if modality != "text":
        return
    where = f"at index {index}" if column is None else f"in column {column!r} at row {index}"
    if not isinstance(sample, str):
        raise InvalidInputError(
            f"expected text samples (str), got {type(sample).__name__} {where}; "
            "pass a list of strings or the right text_column"
        )
    if not sample.strip():
        raise InvalidInputError(
            f"sample {index} is an empty string{'' if column is None else f' ({where})'}; drop "
            "empty texts before comparing"
        )


def batch_samples(samples: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Consecutive batches of ``batch_size`` samples; a final batch of fewer than 4 samples
    (too small for the unbiased HSIC) is merged into the batch before it, so every sample is
    used exactly once.

    Raises:
        InvalidInputError: ``batch_size < 4``.
        EmptyDataError: fewer than 4 samples in total.
    """
    if not isinstance(batch_size, int) or batch_size < MIN_BATCH:
        raise InvalidInputError(
            f"expected batch_size >= {MIN_BATCH} (the unbiased HSIC needs 4 samples per batch), "
            f"got {batch_size!r}"
        )
    iterator = iter(samples)
    previous = list(itertools.islice(iterator, batch_size))
    if len(previous) < MIN_BATCH:
        raise EmptyDataError(
            f"got {len(previous)} sample(s); the unbiased HSIC needs at least {MIN_BATCH}: pass "
            "more texts or images"
        )
    while previous:
        current = list(itertools.islice(iterator, batch_size))
        if 0 < len(current) < MIN_BATCH:
            previous += current
            current = []
        yield previous
        previous = current
