"""push_to_hub / from_hub against the loopback Hub (real huggingface_hub and datasets clients)."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import CommitInfo, snapshot_download

import hf_cka.hub
from hf_cka.drift import DriftResult
from hf_cka.errors import HubPushError, HubReadError, ResultFormatError
from hf_cka.result import CKAResult
from hf_cka.tokens import scrub

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
        {
            "pooling": "mean",
            "estimator": "minibatch_unbiased",
            "revision_b": "main",
            "commit_sha_b": "c" * 40,
            "n_samples": 128,
            **metadata,
        },
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
        b.layers_a,
        b.layers_b,
        b.model_a,
        b.model_b,
    )


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
        assert {
            f"data/scores/{run.run_id}.parquet",
            f"data/runs/{run.run_id}.parquet",
            f"plots/{run.run_id}.png",
        } <= set(files)
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


def test_transient_errors_are_retried(hub, repo_id: str, tmp_path: Path, monkeypatch) -> None:
    result = make_result(5)
    serialised = []
    to_parquet = hf_cka.hub._parquet_bytes
    monkeypatch.setattr(
        hf_cka.hub, "_parquet_bytes", lambda table: serialised.append(1) or to_parquet(table)
    )
    info_path = f"/api/datasets/{repo_id}"
    before = sum(info_path in r.path for r in hub.requests)
    hub.fail_next(2, 500, match=repo_id)
    result.push_to_hub(repo_id, local_dir=tmp_path / "run", **FAST)
    assert sum(info_path in r.path for r in hub.requests) - before >= 3  # two 500s, then 200
    assert len(serialised) == 2  # the run's scores and runs tables, once for the 3 attempts
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
    written = [
        p for folder in (snapshot, tmp_path / "local") for p in folder.rglob("*") if p.is_file()
    ]
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


def downloads(hub, repo_id: str, since: int) -> int:
    """File downloads (GET .../resolve/...) of ``repo_id`` recorded since request ``since``."""
    return sum(r.method == "GET" and f"{repo_id}/resolve/" in r.path for r in hub.requests[since:])


def test_push_and_latest_cost_the_same_at_run_2_and_run_20(hub, repo_id: str, tmp_path) -> None:
    from hf_cka.hub import commit, run_commit

    def result(seed: int) -> CKAResult:
        return make_result(100 + seed, created_at=f"2026-01-01T00:00:{seed:02d}+00:00")

    costs = {}
    for seed in (0, 1, 19):
        if seed == 19:  # runs 3 to 19 land in one commit, as a drift's or a grid's runs do
            runs = [result(s)._hub_run() for s in range(2, 19)]
            commit(repo_id, run_commit(runs, repo_id, None, {}),
                   what="17 runs", local_copy=tmp_path, private=None, token=None,
                   commit_message="runs 3-19", max_attempts=1, backoff_s=0.01)  # fmt: skip
        start = len(hub.requests)
        result(seed).push_to_hub(repo_id, local_dir=tmp_path / str(seed))
        costs[seed + 1] = downloads(hub, repo_id, start)
    assert len(json.loads(repo_files(hub, repo_id)["hf_cka_index.json"])["runs"]) == 20
    assert 1 <= costs[20] <= costs[2], costs  # the index, not every earlier run
    start = len(hub.requests)
    latest = CKAResult.from_hub(repo_id)
    assert latest.model_b == "org/finetuned-119" and downloads(hub, repo_id, start) <= 3


def test_a_repo_without_the_index_still_loads_and_gets_one(hub, repo_id: str, tmp_path) -> None:
    from huggingface_hub import HfApi

    old, new = make_result(21), make_result(22)
    old.push_to_hub(repo_id, local_dir=tmp_path / "old")
    HfApi().delete_file("hf_cka_index.json", repo_id, repo_type="dataset")  # as pushed before
    assert_same(CKAResult.from_hub(repo_id), old)
    new.push_to_hub(repo_id, local_dir=tmp_path / "new")
    index = json.loads(repo_files(hub, repo_id)["hf_cka_index.json"])
    assert sorted(index["runs"]) == sorted([old.run_id, new.run_id])
    assert old.run_id.replace("_", r"\_") in repo_files(hub, repo_id)["README.md"].decode()
    for garbage in (b"[1, 2]", b"{not json"):  # a damaged index is read around, not trusted
        HfApi().upload_file(
            path_or_fileobj=garbage,
            path_in_repo="hf_cka_index.json",
            repo_id=repo_id,
            repo_type="dataset",
        )
        assert_same(CKAResult.from_hub(repo_id), new)


def test_push_returns_the_commit_info(hub, repo_id: str, tmp_path: Path) -> None:
    info = make_result(23).push_to_hub(repo_id, local_dir=tmp_path / "run")
    assert isinstance(info, CommitInfo) and info.oid and info == info.commit_url


def test_a_token_read_from_a_file_is_stripped_and_never_shown(
    hub, repo_id: str, tmp_path: Path
) -> None:
    token = hub.token + "\n"  # as read from a file
    result = make_result(24)
    result.push_to_hub(repo_id, token=token, local_dir=tmp_path / "run")
    assert_same(CKAResult.from_hub(repo_id, token=token), result)
    hub.fail_next(1, 401, match=repo_id)
    with pytest.raises(HubPushError) as caught:
        result.push_to_hub(repo_id, token=token, local_dir=tmp_path / "run", **FAST)
    message = str(caught.value)
    assert "after 1 attempt" in message and "hf auth login" in message
    assert "hf-cka push" not in message  # the advice is not the command that just failed
    assert caught.value.local_path == str((tmp_path / "run").resolve())
    assert caught.value.repo_id == repo_id


@pytest.mark.parametrize("form", [str, repr, lambda t: repr(f"Bearer {t}".encode())])
def test_scrub_removes_every_form_of_a_token(form) -> None:
    token = "hf_secretsecret\n"
    text = f"Illegal header value {form(token)} in request"
    assert "secretsecret" not in scrub(text, token) and "***" in scrub(text, token)


def test_offline_mode_is_not_retried(repo_id: str, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match=r"after 1 attempt.*unset HF_HUB_OFFLINE"):
        make_result(25).push_to_hub(repo_id, local_dir=tmp_path / "run", **FAST)


def test_from_hub_errors_are_typed_and_one_line(hub, repo_id: str, tmp_path: Path) -> None:
    with pytest.raises(HubReadError, match="no dataset repo") as caught:
        CKAResult.from_hub(f"{hub.user}/no-such-results")
    assert isinstance(caught.value, OSError) and "\n" not in str(caught.value)
    make_result(26).push_to_hub(repo_id, local_dir=tmp_path / "run")
    with pytest.raises(HubReadError, match="revision 'v9' not found"):
        CKAResult.from_hub(repo_id, revision="v9")
    hub.fail_next(1, 403, match=repo_id)
    with pytest.raises(HubReadError, match="HTTP 403"):
        DriftResult.from_hub(repo_id)
    empty = f"{hub.user}/empty-{uuid.uuid4().hex[:8]}"
    from huggingface_hub import HfApi

    HfApi().create_repo(empty, repo_type="dataset")
    with pytest.raises(ResultFormatError, match="holds no hf_cka run.*push a result"):
        CKAResult.from_hub(empty)


def test_an_illegal_header_is_not_retried_and_not_shown(hub, repo_id: str, tmp_path: Path) -> None:
    token = "hf_abc\ndefsecret"  # a newline inside: the HTTP client refuses the header
    with pytest.raises(HubPushError, match=r"after 1 attempt.*malformed") as caught:
        make_result(27).push_to_hub(repo_id, token=token, local_dir=tmp_path / "run", **FAST)
    assert "defsecret" not in str(caught.value) and "\n" not in str(caught.value)


def test_every_entry_point_strips_the_token(hub, tmp_path: Path, saved) -> None:
    from huggingface_hub import HfApi

    from hf_cka import AutoCKA
    from hf_cka.cli import build_parser

    model = HfApi().create_repo(f"{hub.user}/tiny-{uuid.uuid4().hex[:8]}").repo_id
    HfApi().upload_folder(repo_id=model, folder_path=saved("bert"))
    start = len(hub.requests)
    auto = AutoCKA.from_pretrained(model, token=hub.token + "\n")  # would be an illegal header
    assert auto.model_a.commit_sha
    sent = [r.headers.get("authorization") for r in hub.requests[start:]]
    assert f"Bearer {hub.token}" in sent
    args = build_parser().parse_args(["push", str(tmp_path), "org/x", "--token", " hf_x\n"])
    assert args.token == "hf_x"
