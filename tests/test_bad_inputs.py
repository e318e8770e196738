"""Bad inputs to model loading and data loading: each is one typed ``HfCkaError`` whose message
names what was expected, what was got and what to do, raised before any weights are read, and
without asking the Hub about strings that cannot be Hub ids (issue 13, item 4)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pandas as pd
import pytest
import tiny
import torch
from helpers import subprocess_env
from huggingface_hub import HfApi

from hf_cka.auto import AutoCKA
from hf_cka.data import load_samples
from hf_cka.errors import (
    DataFormatError,
    DataNotFoundError,
    DeviceNotAvailableError,
    EmptyDataError,
    InvalidInputError,
    ModelFormatError,
    ModelNotFoundError,
    SplitNotFoundError,
    UnsafeWeightsError,
    WeightsFileError,
)
from hf_cka.models import ModelLoader


def copy_model(saved, tmp_path: Path, name: str = "model") -> Path:
    """A private copy of the tiny BERT folder, free to damage."""
    return Path(shutil.copytree(saved("bert"), tmp_path / name))


def load_no_warnings(spec: str, **options) -> None:
    """``ModelLoader(**options).load(spec)``, failing the test on any ``UserWarning``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ModelLoader(**options).load(spec)


# ------------------------------------------------------------------------------ weights files


@pytest.mark.parametrize("cut", ["header", "tensors"])
def test_truncated_safetensors_is_a_weights_file_error(saved, tmp_path: Path, cut: str) -> None:
    folder = copy_model(saved, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:20] if cut == "header" else data[:-100])
    with pytest.raises(WeightsFileError, match="damaged or truncated") as err:
        AutoCKA.from_pretrained(str(folder))
    assert isinstance(err.value, OSError)
    assert str(weights) in str(err.value) and "save the model again" in str(err.value)


def test_pickle_only_folder_is_refused_and_never_unpickled(saved, tmp_path: Path) -> None:
    folder = copy_model(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(tiny.code_running_pickle(marker))
    with pytest.raises(UnsafeWeightsError, match=r"only as pickles \(pytorch_model\.bin\)") as err:
        AutoCKA.from_pretrained(str(folder))
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "save_pretrained(folder, safe_serialization=True)" in message
    assert "weights_only" not in message
    assert not marker.exists()


def test_pickle_only_hub_repo_is_refused_before_download(hub, saved, tmp_path: Path) -> None:
    api, repo = HfApi(), f"{hub.user}/cka-pickle-only"
    api.create_repo(repo)
    marker = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(tiny.code_running_pickle(marker))
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        api.upload_file(path_or_fileobj=Path(saved("bert"), file), path_in_repo=file, repo_id=repo)
    api.upload_file(
        path_or_fileobj=tmp_path / "pytorch_model.bin",
        path_in_repo="pytorch_model.bin",
        repo_id=repo,
    )
    seen = len(hub.requests)
    with pytest.raises(UnsafeWeightsError, match="model repo .* only as pickles"):
        AutoCKA.from_pretrained(repo)
    assert not any("pytorch_model.bin" in r.path for r in hub.requests[seen:])
    assert not marker.exists()


def test_a_damaged_cached_hub_download_is_a_weights_file_error(hub) -> None:
    """A Hub model whose cached ``model.safetensors`` was cut short fails at load, typed."""
    from huggingface_hub import try_to_load_from_cache

    repo = f"{hub.user}/cka-damaged-cache"
    model, tokenizer = tiny.build("bert")
    model.push_to_hub(repo)
    tokenizer.push_to_hub(repo)
    sha = AutoCKA.from_pretrained(repo).model_a.commit_sha  # fills the cache
    blob = Path(try_to_load_from_cache(repo, "model.safetensors", revision=sha)).resolve()
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(WeightsFileError, match=f"weights of model '{repo}' are damaged"):
        AutoCKA.from_pretrained(repo)


def test_a_folder_that_is_not_a_model_names_the_missing_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match=r"holds no config\.json"):
        load_no_warnings(str(tmp_path))


def test_a_broken_config_is_blamed_on_the_folder(saved, tmp_path: Path) -> None:
    folder = copy_model(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config)[:40])
    with pytest.raises(ModelNotFoundError, match="could not load the model folder") as err:
        load_no_warnings(str(folder))
    assert "network" not in str(err.value)
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="model_type") as err:
        load_no_warnings(str(folder))
    assert isinstance(err.value, ValueError)


def test_a_weights_file_given_as_the_model_names_the_folder(saved, hub) -> None:
    seen = len(hub.requests)
    with pytest.raises(ModelNotFoundError, match="is a file; expected a model folder"):
        load_no_warnings(str(Path(saved("bert"), "model.safetensors")))
    assert len(hub.requests) == seen


# ------------------------------------------------------------------------- paths and revisions


def test_a_path_that_does_not_exist_never_asks_the_hub(hub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    seen = len(hub.requests)
    with pytest.raises(ModelNotFoundError, match=r"no local folder '\.\./\.\./etc'") as err:
        load_no_warnings("../../etc")
    assert str(tmp_path.parent.parent / "etc") in str(err.value)  # where it looked
    assert "not a Hub repo id" in str(err.value)
    assert len(hub.requests) == seen


@pytest.mark.parametrize(
    ("spec", "revision", "match"),
    [
        ("org/model@", None, "a revision may not be empty"),
        ("org/model", "", "a revision may not be empty"),
        ("org/model", "  ", "a revision may not be empty"),
        ("@v1", None, "expected a model id before '@'"),
    ],
)
def test_empty_revisions_and_ids_are_invalid_input(hub, spec, revision, match: str) -> None:
    seen = len(hub.requests)
    with pytest.raises(InvalidInputError, match=match):
        ModelLoader().load(spec, revision)
    assert len(hub.requests) == seen


def test_a_revision_of_a_local_folder_is_refused(saved) -> None:
    with pytest.raises(InvalidInputError, match="local folder, which has no revisions"):
        AutoCKA.from_pretrained(saved("bert"), revision_a="v1")


def test_misspelled_local_folder_names_what_is_missing_and_suggests(
    hub, saved, tmp_path: Path, monkeypatch
) -> None:
    shutil.copytree(saved("bert"), tmp_path / "minilm")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        load_no_warnings("minlm")
    message = str(err.value)
    assert "no local folder 'minlm'" in message and "no model repo 'minlm' on the Hub" in message
    assert message.endswith("Did you mean './minilm'?")


def test_a_hub_server_error_on_lookup_is_typed(hub) -> None:
    hub.fail_next(1, status=500, match="/api/models/")
    with pytest.raises(ModelNotFoundError, match="the Hub answered HTTP 500 .* 'org/any'"):
        load_no_warnings("org/any")


def offline_error(cwd: Path, call: str, error: str) -> tuple[str, str]:
    """Run ``call`` (it may name ``hf_cka.models`` and ``hf_cka.data``) in a child process in
    ``cwd`` with the Hub unreachable (``HF_HUB_OFFLINE=1``); the ``error`` it raises as
    ``"ERROR <message>"`` on stdout, and stderr."""
    script = (
        f"import hf_cka.data, hf_cka.models\nfrom hf_cka.errors import {error}\n"
        f"try:\n    {call}\nexcept {error} as err:\n    print('ERROR', err)\n"
    )
    env = subprocess_env(HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_misspelled_local_folder_offline_is_one_error_without_a_warning(tmp_path: Path) -> None:
    """Offline (the Hub unreachable), a name that is neither local nor cached fails at once:
    no Python warning, no download retries, and the close local folder is suggested."""
    (tmp_path / "minilm").mkdir()
    out, err = offline_error(
        tmp_path, "hf_cka.models.ModelLoader().load('minlm')", "ModelNotFoundError"
    )
    assert out.startswith("ERROR no local folder 'minlm'"), out
    assert "not in the local cache" in out and "Did you mean './minilm'?" in out
    assert "UserWarning" not in err and "Retry" not in err, err


# --------------------------------------------------------------------------- devices, dtypes


def unavailable_cuda() -> str:
    """A CUDA device this machine lacks: ``cuda`` without CUDA, else one past the last GPU."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize(
    ("device", "match"),
    [("tpu9", "expected a torch device"), (unavailable_cuda(), "is not available")],
)
def test_bad_device_fails_before_any_weights_are_read(saved, tmp_path, device, match) -> None:
    folder = copy_model(saved, tmp_path)
    (folder / "model.safetensors").write_bytes(b"")  # reading weights would fail otherwise
    with pytest.raises(DeviceNotAvailableError, match=match) as err:
        AutoCKA.from_pretrained(str(folder), device=device)
    assert isinstance(err.value, RuntimeError) and "'cpu'" in str(err.value)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"device": "meta"}, "'meta' holds no data"),
        ({"device_map": "bogus"}, "expected device_map in .* got 'bogus'"),
        ({"device_map": unavailable_cuda()}, "is not available"),
    ],
)
def test_meta_device_and_bad_device_map_are_refused(options, match: str) -> None:
    with pytest.raises(DeviceNotAvailableError, match=match):
        ModelLoader(**options)


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn]
)
def test_non_floating_dtype_is_invalid_input(saved, dtype: torch.dtype) -> None:
    with pytest.raises(InvalidInputError, match=f"expected a floating dtype.*got {dtype}"):
        AutoCKA.from_pretrained(saved("bert"), dtype=dtype)


# ------------------------------------------------------------------------------ data files


def samples(data, **options) -> list:
    """Every sample ``load_samples`` yields for ``data``."""
    return list(load_samples(data, **options)[0])


@pytest.mark.parametrize("suffix", ["csv", "tsv", "json", "jsonl", "parquet", "txt"])
def test_empty_data_file_names_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data.{suffix}"
    path.write_bytes(b"")
    with pytest.raises(EmptyDataError, match=f"the data file '{path}' is empty"):
        samples(str(path))


def test_a_data_file_without_rows_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("text\n")
    with pytest.raises(EmptyDataError, match=f"the data file '{path}' holds no rows"):
        samples(str(path))


MALFORMED = {
    "csv": b'text\n"an unterminated quote\n',
    "json": b"{not json",
    "jsonl": b'{"text": "fine"}\n{broken\n',
    "parquet": b"not a parquet file",
    "txt": b"\xff\xfe\x00 not utf-8",
}


@pytest.mark.parametrize("suffix", sorted(MALFORMED))
def test_malformed_data_file_names_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data.{suffix}"
    path.write_bytes(MALFORMED[suffix])
    with pytest.raises(DataFormatError, match=f"could not read '{path}'") as err:
        samples(str(path))
    assert isinstance(err.value, ValueError) and f"valid .{suffix} file" in str(err.value)


def test_an_empty_string_or_a_dataset_dict_as_data() -> None:
    with pytest.raises(InvalidInputError, match="got an empty string"):
        samples(" ")
    splits = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a b"]})})
    with pytest.raises(
        InvalidInputError, match=r"got DatasetDict: pick one split, e\.g\. data=data\['test'\]"
    ):
        samples(splits)


def test_split_or_config_with_in_memory_data_and_a_bool_cap_are_refused() -> None:
    texts = tiny.varied_texts(8)
    with pytest.raises(InvalidInputError, match="split='test' and dataset_config=None"):
        samples(texts, split="test")
    with pytest.raises(InvalidInputError, match="with data of type Dataset"):
        samples(datasets.Dataset.from_dict({"text": texts}), dataset_config="short")
    with pytest.raises(InvalidInputError, match="num_samples >= 1 or None, got True"):
        samples(texts, num_samples=True)


def test_a_split_or_config_of_a_single_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    pd.DataFrame({"text": ["a b", "c d", "e f", "g h"]}).to_csv(path, index=False)
    with pytest.raises(SplitNotFoundError, match="one split, 'train'"):
        samples(str(path), split="validation")
    with pytest.raises(SplitNotFoundError, match="no config"):
        samples(str(path), dataset_config="short")


# ------------------------------------------------------------------- strings that name no data


def test_a_sentence_as_data_suggests_a_list(hub) -> None:
    seen = len(hub.requests)
    with pytest.raises(DataNotFoundError, match="neither an existing file or folder") as err:
        samples("just a sentence")
    assert "data=['just a sentence', ...]" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert len(hub.requests) == seen


def test_a_missing_data_file_says_it_is_missing(hub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("text\na b\n")
    seen = len(hub.requests)
    with pytest.raises(DataNotFoundError, match="the data file 'dta.csv' does not exist") as err:
        samples("dta.csv")
    assert "Hub" not in str(err.value) and "Did you mean './data.csv'?" in str(err.value)
    with pytest.raises(DataNotFoundError, match=r"'\.\./\.\./etc' is neither an existing"):
        samples("../../etc")
    assert len(hub.requests) == seen


def test_a_misspelled_data_folder_offline_says_what_is_missing(tmp_path: Path) -> None:
    """Offline, a name that is no local path and no cached dataset names both, and suggests the
    close local folder."""
    (tmp_path / "corpus").mkdir()
    out, _ = offline_error(tmp_path, "hf_cka.data.load_samples('corpse')", "DataNotFoundError")
    assert out.startswith("ERROR no data file or folder 'corpse'"), out
    assert "the Hub could not be reached" in out
    assert out.rstrip().endswith("Did you mean './corpus'?"), out


def test_an_unknown_hub_dataset_and_an_empty_folder(hub, tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="no dataset '.*/no-such-data' on the Hub"):
        samples(f"{hub.user}/no-such-data")
    with pytest.raises(DataNotFoundError, match="found no data file in"):
        samples(str(tmp_path))


@pytest.fixture(scope="module")
def two_config_dataset(hub) -> str:
    """A Hub dataset with configs ``default`` (split ``train``) and ``short`` (``validation``)."""
    repo_id = f"{hub.user}/cka-two-configs"
    texts = tiny.varied_texts(8)
    datasets.Dataset.from_dict({"text": texts}).push_to_hub(repo_id)
    datasets.Dataset.from_dict({"text": texts}).push_to_hub(
        repo_id, config_name="short", split="validation"
    )
    return repo_id


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"split": "test"}, r"no split 'test'; it has splits \['train'\]: pass split="),
        (
            {"dataset_config": "short", "split": "train"},
            r"\(config 'short'\) has no split 'train'; it has splits \['validation'\]",
        ),
        (
            {"dataset_config": "long"},
            r"no config 'long'; it has configs \['default', 'short'\]: pass dataset_config=",
        ),
    ],
)
def test_bad_split_or_config_lists_the_existing_ones(two_config_dataset, options, match) -> None:
    with pytest.raises(SplitNotFoundError, match=match) as err:
        samples(two_config_dataset, **options)
    assert isinstance(err.value, KeyError)


def test_good_split_and_config_still_load(two_config_dataset) -> None:
    texts = tiny.varied_texts(8)
    assert samples(two_config_dataset, split="train") == texts
    assert samples(two_config_dataset, dataset_config="short", split="validation") == texts


def test_json_records_file_still_loads(tmp_path: Path) -> None:
    """The checks above refuse only broken files: a valid one loads as before."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a b"}, {"text": "c d"}]))
    assert samples(str(path)) == ["a b", "c d"]
