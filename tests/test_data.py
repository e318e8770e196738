"""Data sources of ``AutoCKA.compare``: lists, ``datasets`` objects, local files and folders,
Hub datasets on the loopback Hub, sample caps, batch merging, provenance and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
import tiny
import torch

from hf_cka.auto import AutoCKA
from hf_cka.data import batch_samples, probe_corpus
from hf_cka.errors import (
    ColumnNotFoundError,
    EmptyDataError,
    EstimatorWarning,
    InvalidInputError,
)
from hf_cka.result import CKAResult

TEXTS = probe_corpus()[:19]  # batch_size 8 -> CKA batches of 8 and 11 (the 3 left are merged)


@pytest.fixture(scope="module")
def auto(tmp_path_factory: pytest.TempPathFactory) -> AutoCKA:
    """A tiny BERT compared with a tiny GPT-2 (different tokenizers, one set of samples)."""
    bert = tiny.save("bert", tmp_path_factory.mktemp("bert"))
    gpt2 = tiny.save("gpt2", tmp_path_factory.mktemp("gpt2"))
    return AutoCKA.from_pretrained(str(bert), str(gpt2))


@pytest.fixture(scope="module")
def reference(auto: AutoCKA) -> torch.Tensor:
    """The matrix of ``TEXTS`` given as a plain list."""
    return auto.compare(TEXTS, batch_size=8, progress=False).matrix


def run(auto: AutoCKA, data: object, **options: object) -> CKAResult:
    """``compare`` with batches of 8 and no progress bar."""
    return auto.compare(data, batch_size=8, progress=False, **options)


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    ("size", "batch_size", "expected"),
    [(19, 8, [8, 11]), (20, 8, [8, 8, 4]), (21, 8, [8, 8, 5]), (16, 8, [8, 8]), (6, 4, [6])],
)
def test_a_final_batch_under_four_is_merged(size: int, batch_size: int, expected) -> None:
    batches = list(batch_samples(range(size), batch_size))
    assert [len(b) for b in batches] == expected
    assert [x for b in batches for x in b] == list(range(size))


def test_list_of_strings_records_batches_and_provenance(auto: AutoCKA, reference) -> None:
    result = run(auto, TEXTS, max_length=64)
    metadata = result.metadata
    assert (metadata["n_samples"], metadata["n_batches"]) == (19, 2)
    assert (metadata["batch_size"], metadata["max_length"]) == (8, 64)
    assert metadata["dataset"] == "in-memory list"
    assert metadata["pooling"] == "mean"
    assert result.stderr is not None and result.stderr.shape == reference.shape


def test_num_samples_caps_the_data(auto: AutoCKA) -> None:
    with pytest.warns(EstimatorWarning, match="only one batch"):
        result = run(auto, TEXTS, num_samples=10)
    assert result.stderr is None
    metadata = result.metadata
    assert (metadata["n_samples"], metadata["n_batches"]) == (10, 1)  # 8 + 2 merged
    metadata = auto.compare(TEXTS, batch_size=4, num_samples=12, progress=False).metadata
    assert (metadata["n_samples"], metadata["n_batches"], metadata["batch_size"]) == (12, 3, 4)


# --------------------------------------------------------------------- datasets objects


def test_dataset_and_iterable_dataset_with_text_column(auto: AutoCKA, reference) -> None:
    dataset = datasets.Dataset.from_dict({"sentence": TEXTS, "label": list(range(19))})
    result = run(auto, dataset, text_column="sentence")
    torch.testing.assert_close(result.matrix, reference, atol=1e-10, rtol=0)
    assert result.metadata["n_samples"] == 19
    assert result.metadata["text_column"] == "sentence"

    streamed = run(auto, dataset.to_iterable_dataset(), text_column="sentence")
    torch.testing.assert_close(streamed.matrix, reference, atol=1e-10, rtol=0)
    assert (streamed.metadata["n_samples"], streamed.metadata["n_batches"]) == (19, 2)


def test_missing_text_column_lists_the_columns(auto: AutoCKA) -> None:
    dataset = datasets.Dataset.from_dict({"sentence": TEXTS, "label": list(range(19))})
    with pytest.raises(ColumnNotFoundError, match=r"'text'.*\['sentence', 'label'\]") as err:
        run(auto, dataset)
    assert isinstance(err.value, KeyError)


# ------------------------------------------------------------------------------ local files


def write_files(folder: Path) -> dict[str, Path]:
    """The texts as csv, tsv, json, jsonl, parquet and txt files in ``folder``."""
    frame = pd.DataFrame({"text": TEXTS, "label": range(19)})
    paths = {s: folder / f"data.{s}" for s in ("csv", "tsv", "json", "jsonl", "parquet", "txt")}
    frame.to_csv(paths["csv"], index=False)
    frame.to_csv(paths["tsv"], index=False, sep="\t")
    paths["json"].write_text(json.dumps(frame.to_dict(orient="records")))
    frame.to_json(paths["jsonl"], orient="records", lines=True)
    frame.to_parquet(paths["parquet"])
    paths["txt"].write_text("\n".join(TEXTS) + "\n")
    return paths


@pytest.mark.parametrize("suffix", ["csv", "tsv", "json", "jsonl", "parquet", "txt"])
def test_local_data_files(auto: AutoCKA, reference, tmp_path: Path, suffix: str) -> None:
    path = write_files(tmp_path)[suffix]
    result = run(auto, str(path))
    torch.testing.assert_close(result.matrix, reference, atol=1e-10, rtol=0)
    assert result.metadata["dataset"] == str(path)
    assert (result.metadata["split"], result.metadata["n_samples"]) == ("train", 19)


def test_local_folder(auto: AutoCKA, reference, tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    pd.DataFrame({"text": TEXTS}).to_csv(folder / "train.csv", index=False)
    result = run(auto, folder)
    torch.testing.assert_close(result.matrix, reference, atol=1e-10, rtol=0)
    assert (result.metadata["dataset"], result.metadata["split"]) == (str(folder), "train")


def test_unsupported_file_suffix(auto: AutoCKA, tmp_path: Path) -> None:
    path = tmp_path / "data.xml"
    path.write_text("<texts/>")
    with pytest.raises(InvalidInputError, match=r"\.csv"):
        run(auto, str(path))


# ------------------------------------------------------------------------------ Hub datasets


def test_hub_dataset_with_split_and_config(auto: AutoCKA, reference, hub) -> None:
    repo_id = f"{hub.user}/cka-probe-texts"
    datasets.Dataset.from_dict({"text": TEXTS}).push_to_hub(repo_id)
    result = run(auto, repo_id, split="train")
    torch.testing.assert_close(result.matrix, reference, atol=1e-10, rtol=0)
    metadata = result.metadata
    assert metadata["dataset"] == repo_id
    assert (metadata["split"], metadata["dataset_config"]) == ("train", None)
    assert (metadata["n_samples"], metadata["n_batches"], metadata["batch_size"]) == (19, 2, 8)

    datasets.Dataset.from_dict({"body": TEXTS[:12]}).push_to_hub(
        repo_id, config_name="short", split="validation"
    )
    short = run(auto, repo_id, dataset_config="short", text_column="body")
    metadata = short.metadata
    assert (metadata["dataset_config"], metadata["split"]) == ("short", "validation")
    assert (metadata["n_samples"], metadata["n_batches"]) == (12, 2)  # 8 + 4


# ------------------------------------------------------------------------------ input errors


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([], EmptyDataError, "no samples"),
        (["a cat", "a dog", 3, "a bird", "a fish"], InvalidInputError, "int at index 2"),
        (["a cat", "  ", "a dog", "a bird"], InvalidInputError, "sample 1 is an empty string"),
        (42, InvalidInputError, "got int"),
    ],
)
def test_bad_data_raises_a_typed_error(auto: AutoCKA, data, error, match: str) -> None:
    with pytest.raises(error, match=match) as err:
        run(auto, data)
    assert isinstance(err.value, ValueError)


def test_batch_size_under_four_is_rejected(auto: AutoCKA) -> None:
    with pytest.raises(InvalidInputError, match="batch_size >= 4"):
        auto.compare(TEXTS, batch_size=3, progress=False)


def test_fewer_than_four_samples_in_total(auto: AutoCKA) -> None:
    """``batch_samples`` documents EmptyDataError here: no batch size can make 3 samples work."""
    with pytest.raises(EmptyDataError, match="4"):
        list(batch_samples(TEXTS[:3], 8))
    with pytest.raises(EmptyDataError, match="4"):
        run(auto, TEXTS[:3])
