"""Data from a source string: a local csv/tsv/json/jsonl/parquet/txt file or folder, or a Hub
dataset id, loaded as one ``datasets`` split; every failure is a typed error that names the file,
dataset, config or split (a path or a sentence is never sent to the Hub).
"""

from __future__ import annotations

import os
from typing import Any

from .errors import (
    DataFormatError,
    DataNotFoundError,
    EmptyDataError,
    HfCkaError,
    InvalidInputError,
    SplitNotFoundError,
    suggest_paths,
)
from .tokens import HubToken

FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


def load_dataset_split(
    source: str, config: str | None, split: str | None, token: HubToken
) -> tuple[Any, dict[str, Any]]:
    """A ``datasets`` split from a local file/folder or a Hub dataset id.

    Raises:
        DataNotFoundError: ``source`` is no existing file or folder and no Hub dataset (a path
            or a sentence is never sent to the Hub).
        EmptyDataError: an empty data file.
        DataFormatError: a file or dataset that cannot be read; the message names it.
        SplitNotFoundError: an unknown split or config; the message lists the existing ones.
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

    from ._network import NETWORK_ERRORS  # imports the Hub client: not at `hf-cka --help`

    if os.path.isfile(source):
        return _load_file(source, config, split), {
            "dataset": source,
            "dataset_config": None,
            "split": "train",
        }
    if not os.path.isdir(source):
        _check_hub_dataset_id(source)
    try:
        loaded = datasets.load_dataset(source, config, split=split, token=token)
    except DatasetNotFoundError as err:
        raise DataNotFoundError(
            f"no data file or folder '{source}' (looked for {os.path.abspath(source)}) and no "
            f"dataset '{source}' on the Hub (or it is private: pass token=...); check the path "
            f"or the id.{suggest_paths(source)}"
        ) from err
    except FileNotFoundError as err:  # a folder without data files
        raise DataNotFoundError(
            f"found no data file in '{source}' ({err}); expected files ending in "
            f"{sorted(FILE_BUILDERS)}"
        ) from err
    except NETWORK_ERRORS as err:
        raise DataNotFoundError(
            f"no data file or folder '{source}' (looked for {os.path.abspath(source)}), and the "
            f"Hub could not be reached ({type(err).__name__}) to load a dataset '{source}', "
            f"which is not in the local cache either; check the path, or your network and "
            f"HF_HUB_OFFLINE.{suggest_paths(source)}"
        ) from err
    except ValueError as err:  # datasets says "Unknown split" / "BuilderConfig not found"
        raise _part_error(source, config, split, token, err) from err
    except DatasetGenerationError as err:
        raise DataFormatError(
            f"could not read the dataset '{source}' ({_root_cause(err)}); check its files"
        ) from err
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return loaded, {"dataset": source, "dataset_config": config, "split": split}


def _load_file(path: str, config: str | None, split: str | None) -> Any:
    """The one ``train`` split of a local csv/tsv/json/jsonl/parquet/txt file."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_BUILDERS:
        raise InvalidInputError(
            f"expected a data file ending in {sorted(FILE_BUILDERS)}, got '{path}'"
        )
    if config is not None or split not in (None, "train"):
        raise SplitNotFoundError(
            f"a single data file has one split, 'train', and no config, got "
            f"dataset_config={config!r} and split={split!r} for '{path}'; drop them"
        )
    if os.path.getsize(path) == 0:
        raise EmptyDataError(
            f"the data file '{path}' is empty; expected {FILE_BUILDERS[suffix]} data with a "
            "text column"
        )
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        return datasets.load_dataset(
            FILE_BUILDERS[suffix], data_files=path, split="train", **kwargs
        )
    except (DatasetGenerationError, ValueError, StopIteration) as err:  # ArrowInvalid: ValueError
        if "corresponds to no data" in str(err):  # parsed, but not a single row
            raise EmptyDataError(
                f"the data file '{path}' holds no rows; expected {FILE_BUILDERS[suffix]} data with "
                "a text column and at least 4 rows"
            ) from err
        raise DataFormatError(
            f"could not read '{path}' as {FILE_BUILDERS[suffix]} ({_root_cause(err)}); expected "
            f"a valid {suffix} file: fix or re-export it"
        ) from err


def _check_hub_dataset_id(source: str) -> None:
    """Refuse, without asking the Hub, a string that is no existing path and no Hub id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    where = f"(looked for {os.path.abspath(source)})"
    if os.path.splitext(source)[1].lower() in FILE_BUILDERS:
        raise DataNotFoundError(
            f"the data file '{source}' does not exist {where}; check the path."
            f"{suggest_paths(source)}"
        )
    try:
        validate_repo_id(source)
    except HFValidationError as err:
        if os.sep in source or "/" in source:
            advice = f"check the path.{suggest_paths(source)}"
        else:
            advice = f"to compare on your own texts pass them as a list: data=[{source!r}, ...]"
        raise DataNotFoundError(
            f"data {source!r} is neither an existing file or folder {where} nor a Hub dataset "
            f"id; {advice}"
        ) from err


def _part_error(
    source: str, config: str | None, split: str | None, token: HubToken, err: Exception
) -> HfCkaError:
    """The typed error for a ``ValueError`` of ``load_dataset``: an unknown config or split
    (listing the existing ones), or else an unreadable dataset."""
    import datasets

    configs = datasets.get_dataset_config_names(source, token=token)
    if config is not None and config not in configs:
        return SplitNotFoundError(
            f"dataset '{source}' has no config {config!r}; it has configs {configs}: pass "
            "dataset_config=<one of them> (--dataset-config)"
        )
    try:
        splits = datasets.get_dataset_split_names(source, config, token=token)
    except ValueError:  # several configs and none chosen
        return SplitNotFoundError(
            f"dataset '{source}' has several configs {configs} and none was chosen; pass "
            "dataset_config=<one of them> (--dataset-config)"
        )
    if split is not None and split not in splits:
        named = f"'{source}' (config {config!r})" if config is not None else f"'{source}'"
        return SplitNotFoundError(
            f"dataset {named} has no split {split!r}; it has splits {splits}: pass "
            "split=<one of them> (--split)"
        )
    return DataFormatError(f"could not load the dataset '{source}' ({_root_cause(err)})")


def _root_cause(err: BaseException) -> str:
    """``"Type: first line"`` of the innermost cause of ``err`` (datasets wraps parse errors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
