"""Inputs -> samples -> CKA batches -> per-model encoded tensors.

Samples are examples (texts or images). Every model encodes the SAME samples with its own
tokenizer or image processor, so the minibatches of the two models always hold the same
examples even when their tokenizers differ.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from typing import Any

from .errors import ColumnNotFoundError, EmptyDataError, InvalidInputError

MIN_BATCH = 4
FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
IMAGE_COLUMNS = ("image", "img", "pixel_values")


def probe_corpus() -> list[str]:
    """The built-in probe corpus: varied English sentences written for this project."""
    text = resources.files("hf_cka").joinpath("resources/probe_corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def load_samples(
    data: Any = None,
    *,
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str | None = None,
    num_samples: int | None = None,
    modality: str = "text",
    token: str | bool | None = None,
) -> tuple[Iterator[Any], dict[str, Any]]:
    """Validated samples from ``data`` (capped at ``num_samples``) and a provenance dict.

    ``data`` is ``None`` (the probe corpus), a sequence of strings (or images), a
    ``datasets.Dataset``/``IterableDataset``, a local csv/tsv/json/jsonl/parquet/txt file or a
    folder, or a Hub dataset id (with ``dataset_config`` and ``split``, default ``"train"``).
    """
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise InvalidInputError(f"expected num_samples >= 1 or None, got {num_samples!r}")
    info: dict[str, Any] = {"dataset": None, "dataset_config": None, "split": None}
    if data is None:
        info["dataset"] = "hf_cka/probe_corpus"
        samples: Iterable[Any] = probe_corpus()
    elif isinstance(data, (str, os.PathLike)):
        dataset, info = _load_dataset(os.fspath(data), dataset_config, split, token)
        samples = _column(dataset, text_column, modality)
        info["text_column"] = samples.column_name
    elif _is_dataset(data):
        samples = _column(data, text_column, modality)
        info["dataset"] = getattr(data.info, "dataset_name", None) or "in-memory Dataset"
        info["split"] = str(data.split) if data.split is not None else None
        info["text_column"] = samples.column_name
    elif isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        info["dataset"] = "in-memory list"
        samples = data
    else:
        raise InvalidInputError(
            f"expected data as None, a list of strings, a datasets.Dataset, a file/folder path "
            f"or a Hub dataset id, got {type(data).__name__}"
        )
    try:
        size: int | None = len(samples)  # type: ignore[arg-type]
    except TypeError:  # a generator or an IterableDataset: size unknown
        size = None
    info["size"] = size if num_samples is None or size is None else min(size, num_samples)
    return _validated(itertools.islice(samples, num_samples), modality), info


def _is_dataset(data: Any) -> bool:
    try:
        from datasets import Dataset, IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, (Dataset, IterableDataset))


def _load_dataset(
    source: str, config: str | None, split: str | None, token: str | bool | None
) -> tuple[Any, dict[str, Any]]:
    """A ``datasets`` split from a local file/folder or a Hub dataset id."""
    import datasets

    suffix = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if suffix not in FILE_BUILDERS:
            raise InvalidInputError(
                f"expected a data file ending in {sorted(FILE_BUILDERS)}, got '{source}'"
            )
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        loaded = datasets.load_dataset(
            FILE_BUILDERS[suffix], data_files=source, split="train", **kwargs
        )
        return loaded, {"dataset": source, "dataset_config": None, "split": "train"}
    try:
        loaded = datasets.load_dataset(source, config, split=split, token=token)
    except FileNotFoundError as err:
        raise EmptyDataError(
            f"'{source}' is neither a data file, a folder nor a dataset on the Hub ({err})"
        ) from err
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return loaded, {"dataset": source, "dataset_config": config, "split": split}


class _ColumnIterable:
    """Iterates one column of a ``datasets`` dataset without materialising the others."""

    def __init__(self, dataset: Any, column_name: str) -> None:
        self.dataset, self.column_name = dataset, column_name

    def __len__(self) -> int:
        return len(self.dataset)  # TypeError for an IterableDataset: the size is unknown

    def __iter__(self) -> Iterator[Any]:
        for row in self.dataset.select_columns([self.column_name]):
            yield row[self.column_name]


def _column(dataset: Any, column: str, modality: str) -> _ColumnIterable:
    columns = list(dataset.column_names or [])
    if modality == "image" and column not in columns:
        column = next((c for c in IMAGE_COLUMNS if c in columns), column)
    if column not in columns:
        raise ColumnNotFoundError(
            f"column '{column}' not found; the dataset has columns {columns}: pass "
            "text_column=<one of them> (--text-column)"
        )
    return _ColumnIterable(dataset, column)


def _validated(samples: Iterable[Any], modality: str) -> Iterator[Any]:
    """Yield samples, rejecting non-strings and empty strings for text models."""
    count = 0
    for index, sample in enumerate(samples):
        if modality == "text":
            if not isinstance(sample, str):
                raise InvalidInputError(
                    f"expected text samples (str), got {type(sample).__name__} at index {index}; "
                    "pass a list of strings or the right text_column"
                )
            if not sample.strip():
                raise InvalidInputError(
                    f"sample {index} is an empty string; drop empty texts before comparing"
                )
        count += 1
        yield sample
    if count == 0:
        raise EmptyDataError("the data yielded no samples; pass at least 4 texts or images")


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


def encode(processor: Any, samples: Sequence[Any], modality: str, max_length: int | None) -> Any:
    """Unpadded encodings of ``samples`` (token lists for text, tensors for images)."""
    if modality == "image":
        return processor(images=list(samples), return_tensors="pt")
    return processor(
        list(samples), truncation=max_length is not None, max_length=max_length, padding=False
    )


def collate(processor: Any, encodings: Any, indices: Sequence[int], modality: str) -> dict:
    """A padded model batch of the samples at ``indices`` of ``encodings``."""
    if modality == "image":
        return {k: v[list(indices)] for k, v in encodings.items()}
    rows = [{k: encodings[k][i] for k in encodings} for i in indices]
    # right padding whatever the tokenizer says: left padding would shift the absolute position
    # ids of real tokens (BERT, GPT-2); pooling skips the pads on either side anyway
    return dict(processor.pad(rows, return_tensors="pt", padding_side="right"))


def lengths(encodings: Any, modality: str) -> list[int]:
    """Sequence length of each encoded sample (all equal for images)."""
    if modality == "image":
        return [1] * len(next(iter(encodings.values())))
    return [len(ids) for ids in encodings["input_ids"]]


def same_tokens(enc_a: Any, enc_b: Any) -> bool:
    """Whether two text encodings hold identical token ids for every sample."""
    return list(enc_a["input_ids"]) == list(enc_b["input_ids"])
