"""push_to_hub / from_hub against the loopback Hub (real huggingface_hub and datasets clients)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import snapshot_download

from hf_cka.errors import HubPushError, ResultFormatError
from hf_cka.result import CKAResult, DriftResult

FAST = {"backoff_s": 0.01}


def make_result(seed: int, la: int = 3, lb: int = 4, **metadata: object) -> CKAResult:
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(la, lb, generator=gen, dtype=torch.float64)
    matrix[1, 1] = float("nan")
    return CKAResult(
        matrix,
        [f"model.layers.{i}" for i in range(la)],
        [f"encoder.layer.{j}" for j in range(lb)],
        "org/base",
        f"org/finetuned-{seed}",
        {"pooling": "mean", "estimator": "minibatch_unbiased", "revision_b": "main",
         "commit_sha_b": "c" * 40, "n_samples": 128, **metadata},
        stderr=torch.rand(la, lb, generator=gen, dtype=torch.float64),
        null=torch.rand(la, lb, generator=gen, dtype=torch.float64) / 100,
    )


def assert_same(a: CKAResult, b: CKAResult) -> None:
    for name in ("matrix", "stderr", "null"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.float64
        assert torch.equal(x.view(torch.int64), y.view(torch.int64)), name  # bit-identical
    assert a.metadata == b.metadata
    assert (a.layers_a, a.layers_b, a.model_a, a.model_b) == (
        b.layers_a, b.layers_b, b.model_a, b.model_b)


def repo_files(hub, repo_id: str) -> dict[str, bytes]:
    repo = hub.repo(repo_id, "dataset")
    head = repo.commits[repo.branches["main"]]
    return {path: entry.blob.data for path, entry in head.files.items()}


@pytest.fixture
def repo_id(hub) -> str:
    return f"{hub.user}/cka-{uuid.uuid4().hex[:8]}"


def test_two_pushes_accumulate_runs(hub, repo_id: str, tmp_path: Path) -> None:
    first, second = make_result(1), make_result(2, la=2, lb=2)
    url = first.push_to_hub(repo_id, local_dir=tmp_path / "first")
    assert repo_id in url and "/commit/" in url
    assert_same(CKAResult.load(tmp_path / "first"), first)  # the local copy comes first
    second.push_to_hub(repo_id, local_dir=tmp_path / "second")

    scores = datasets.load_dataset(repo_id, "scores", split="train")
    assert scores.num_rows == 3 * 4 + 2 * 2
    assert sorted(set(scores["run_id"])) == sorted([first.run_id, second.run_id])
    runs = datasets.load_dataset(repo_id, "runs")
    assert list(runs) == ["train"] and runs["train"].num_rows == 2

    assert_same(CKAResult.from_hub(repo_id), second)  # the latest run
    assert_same(CKAResult.from_hub(repo_id, first.run_id), first)
    with pytest.raises(ResultFormatError, match=f"available runs: .*{first.run_id}"):
        CKAResult.from_hub(repo_id, "r_missing")

    files = repo_files(hub, repo_id)
    for run in (first, second):
        assert {f"data/scores/{run.run_id}.parquet", f"data/runs/{run.run_id}.parquet",
                f"plots/{run.run_id}.png"} <= set(files)
        assert files[f"plots/{run.run_id}.png"].startswith(b"\x89PNG")
    readme = files["README.md"].decode()
    for run in (first, second):
        assert run.run_id.replace("_", r"\_") in readme
    assert f"plots/{second.run_id}.png" in readme


def test_from_hub_pins_a_revision(hub, repo_id: str, tmp_path: Path) -> None:
    first = make_result(3)
    first.push_to_hub(repo_id, local_dir=tmp_path / "a")
    old_head = hub.repo(repo_id, "dataset").branches["main"]
    make_result(4).push_to_hub(repo_id, local_dir=tmp_path / "b")
    assert_same(CKAResult.from_hub(repo_id, revision=old_head), first)


def test_transient_errors_are_retried(hub, repo_id: str, tmp_path: Path) -> None:
    result = make_result(5)
    info_path = f"/api/datasets/{repo_id}"
    before = sum(info_path in r.path for r in hub.requests)
    hub.fail_next(2, 500, match=repo_id)
    result.push_to_hub(repo_id, local_dir=tmp_path / "run", **FAST)
    assert sum(info_path in r.path for r in hub.requests) - before >= 3  # two 500s, then 200
    assert_same(CKAResult.from_hub(repo_id), result)


def test_final_failure_names_the_local_copy(hub, repo_id: str, tmp_path: Path) -> None:
    result = make_result(6)
    local = tmp_path / "kept"
    hub.fail_next(100, 500, match=repo_id)  # only this test's repo is affected
    with pytest.raises(HubPushError, match="after 3 attempt") as caught:
        result.push_to_hub(repo_id, token=hub.token, local_dir=local, max_attempts=3, **FAST)
    message = str(caught.value)
    assert str(local.resolve()) in message and "500" in message
    assert hub.token not in message and hub.token not in repr(caught.value)
    assert_same(CKAResult.load(local), result)


def test_conflict_is_rebuilt_on_the_new_head(hub, repo_id: str, tmp_path: Path, caplog) -> None:
    first, second = make_result(11), make_result(12)
    first.push_to_hub(repo_id, local_dir=tmp_path / "first")
    hub.fail_next(1, 412, match=f"{repo_id}/commit/")  # as if another push just landed
    with caplog.at_level("WARNING", logger="hf_cka.hub"):
        second.push_to_hub(repo_id, local_dir=tmp_path / "second", **FAST)
    assert "conflict with a concurrent push (HTTP 412)" in caplog.text
    runs = datasets.load_dataset(repo_id, "runs", split="train")
    assert sorted(runs["run_id"]) == sorted([first.run_id, second.run_id])


def test_client_errors_are_not_retried(hub, repo_id: str, tmp_path: Path) -> None:
    hub.fail_next(1, 403, match=repo_id)
    with pytest.raises(HubPushError, match="after 1 attempt"):
        make_result(7).push_to_hub(repo_id, local_dir=tmp_path / "run", **FAST)


def test_token_is_never_written(hub, repo_id: str, tmp_path: Path) -> None:
    result = make_result(8)
    result.push_to_hub(repo_id, token=hub.token, local_dir=tmp_path / "local")
    snapshot = Path(snapshot_download(repo_id, repo_type="dataset", local_dir=tmp_path / "snap"))
    written = [p for folder in (snapshot, tmp_path / "local") for p in folder.rglob("*")
               if p.is_file()]
    assert len(written) >= 6
    for path in written:
        assert hub.token.encode() not in path.read_bytes(), path
    assert hub.token not in repr(result) and hub.token not in str(result.metadata)


def test_concurrent_pushes_both_land(hub, repo_id: str, tmp_path: Path) -> None:
    results = [make_result(10 + i) for i in range(2)]
    make_result(9).push_to_hub(repo_id, local_dir=tmp_path / "seed")  # the repo exists
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def push(result: CKAResult) -> None:
        barrier.wait()
        try:
            result.push_to_hub(repo_id, local_dir=tmp_path / result.run_id, backoff_s=0.05)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=push, args=(r,)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    files = repo_files(hub, repo_id)
    for result in results:
        assert f"data/scores/{result.run_id}.parquet" in files
        assert result.run_id.replace("_", r"\_") in files["README.md"].decode()
    runs = datasets.load_dataset(repo_id, "runs", split="train")
    assert runs.num_rows == 3


def test_drift_pushes_all_checkpoints_in_one_commit(hub, repo_id: str, tmp_path: Path) -> None:
    layers = [f"h.{i}" for i in range(3)]
    results = [
        CKAResult(torch.rand(3, 3, dtype=torch.float64), layers, layers, "base", f"ckpt-{i}")
        for i in range(3)
    ]
    drift = DriftResult("base", [f"ckpt-{i}" for i in range(3)], results)
    drift.push_to_hub(repo_id, local_dir=tmp_path / "drift")
    repo = hub.repo(repo_id, "dataset")
    assert len(repo.history(repo.commits[repo.branches["main"]])) == 2  # initial + one push
    assert DriftResult.load(tmp_path / "drift").checkpoints == drift.checkpoints
    scores = datasets.load_dataset(repo_id, "scores", split="train")
    assert sorted(set(scores["run_id"])) == sorted(r.run_id for r in results)

    make_result(13).push_to_hub(repo_id, local_dir=tmp_path / "single")  # not part of the drift
    for pulled in (DriftResult.from_hub(repo_id), DriftResult.from_hub(repo_id, drift.drift_id)):
        assert (pulled.base, pulled.checkpoints) == (drift.base, drift.checkpoints)
        assert pulled.metadata == drift.metadata
        assert torch.equal(pulled.similarity, drift.similarity)
        for mine, theirs in zip(drift.results, pulled.results, strict=True):
            assert torch.equal(mine.matrix, theirs.matrix) and mine.metadata == theirs.metadata
    with pytest.raises(ResultFormatError, match=f"available drifts: {drift.drift_id}"):
        DriftResult.from_hub(repo_id, "d_missing")
