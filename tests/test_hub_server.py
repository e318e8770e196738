"""The loopback Hub answers the real huggingface_hub, transformers and datasets clients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer, parse_range
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

PARQUET_BYTES = b"PAR1" + bytes(range(256)) * 4 + b"PAR1"


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    """A client with the environment's endpoint and token, once the Hub serves."""
    return HfApi()


@pytest.fixture
def dataset_repo(api: HfApi, request: pytest.FixtureRequest) -> str:
    """A dataset repo holding a parquet shard and a README in one commit, tagged ``v1``."""
    repo_id = api.create_repo(f"org/{request.node.name}", repo_type="dataset").repo_id
    api.create_commit(
        repo_id,
        [
            CommitOperationAdd("data/train-00000.parquet", PARQUET_BYTES),
            CommitOperationAdd("README.md", b"---\nlicense: mit\n---\n# v1\n"),
        ],
        commit_message="data and card",
        repo_type="dataset",
    )
    api.create_tag(repo_id, tag="v1", repo_type="dataset")
    return repo_id


def test_endpoint_env_points_at_the_loopback_hub(hub: HubServer) -> None:
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub.endpoint == os.environ["HF_ENDPOINT"]
    assert constants.HF_HUB_DISABLE_XET
    assert Path(constants.HF_HUB_CACHE).is_relative_to(os.environ["HF_HOME"])


def test_create_repo_exist_ok_and_delete(api: HfApi, hub: HubServer) -> None:
    url = api.create_repo("org/exists")
    assert (url.repo_id, url.repo_type) == ("org/exists", "model")
    assert api.create_repo("org/exists", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("org/exists")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("mine").repo_id == f"{hub.user}/mine"  # the token's namespace
    api.delete_repo("org/exists")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/exists")
    api.create_repo("org/secret", private=True)
    assert api.model_info("org/secret").private
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/secret", token=False)


def test_commit_stores_parquet_as_lfs_and_readme_inline(api: HfApi, dataset_repo: str) -> None:
    info = api.dataset_info(dataset_repo, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "data/train-00000.parquet"}
    parquet = siblings["data/train-00000.parquet"]
    assert parquet.lfs is not None and parquet.lfs.size == parquet.size == len(PARQUET_BYTES)
    assert siblings["README.md"].lfs is None


def test_tags_refs_and_revisions_resolve_to_commits(api: HfApi, dataset_repo: str) -> None:
    tagged = api.dataset_info(dataset_repo).sha
    second = api.upload_file(
        path_or_fileobj=b"---\nlicense: mit\n---\n# v2\n",
        path_in_repo="README.md",
        repo_id=dataset_repo,
        repo_type="dataset",
    ).oid
    assert second != tagged and len(second) == 40
    refs = api.list_repo_refs(dataset_repo, repo_type="dataset")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second)]
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", tagged)]
    resolved = api.resolve_revision(dataset_repo, repo_type="dataset", revision="v1")
    assert resolved.resolved == tagged
    assert api.dataset_info(dataset_repo, revision="v1").sha == tagged
    commits = api.list_repo_commits(dataset_repo, repo_type="dataset")
    assert [c.commit_id for c in commits][:2] == [second, tagged]
    assert commits[-1].title == "initial commit"


def test_downloads_at_tag_sha_and_branch(api: HfApi, dataset_repo: str, tmp_path: Path) -> None:
    tagged = api.dataset_info(dataset_repo).sha
    api.upload_file(
        path_or_fileobj=b"# v2\n",
        path_in_repo="README.md",
        repo_id=dataset_repo,
        repo_type="dataset",
    )

    def readme(revision: str) -> str:
        path = hf_hub_download(dataset_repo, "README.md", repo_type="dataset", revision=revision)
        return Path(path).read_text()

    assert readme("v1").endswith("# v1\n")
    assert readme(tagged).endswith("# v1\n")
    assert readme("main") == "# v2\n"
    shard = hf_hub_download(
        dataset_repo, "data/train-00000.parquet", repo_type="dataset", revision=tagged
    )
    assert Path(shard).read_bytes() == PARQUET_BYTES
    folder = Path(snapshot_download(dataset_repo, repo_type="dataset", revision="v1"))
    assert folder.name == tagged
    assert (folder / "data" / "train-00000.parquet").read_bytes() == PARQUET_BYTES
    local = Path(snapshot_download(dataset_repo, repo_type="dataset", local_dir=tmp_path / "s"))
    assert (local / "README.md").read_text() == "# v2\n"


def test_head_headers_and_ranged_get(hub: HubServer, dataset_repo: str) -> None:
    url = f"{hub.endpoint}/datasets/{dataset_repo}/resolve/v1/data/train-00000.parquet"
    head = get_session().head(url)
    assert head.status_code == 200
    assert len(head.headers["X-Repo-Commit"]) == 40
    size = str(len(PARQUET_BYTES))
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == size
    assert head.headers["ETag"].strip('"') == head.headers["X-Linked-Etag"].strip('"')
    part = get_session().get(url, headers={"Range": "bytes=4-9"})
    assert part.status_code == 206 and part.content == PARQUET_BYTES[4:10]
    assert part.headers["Content-Range"] == f"bytes 4-9/{len(PARQUET_BYTES)}"
    assert get_session().get(url, headers={"Range": "bytes=-4"}).content == b"PAR1"
    beyond = get_session().get(url, headers={"Range": f"bytes={len(PARQUET_BYTES)}-"})
    assert beyond.status_code == 416
    with HfFileSystem().open(f"datasets/{dataset_repo}@v1/data/train-00000.parquet", "rb") as f:
        f.seek(100)
        assert f.read(8) == PARQUET_BYTES[100:108]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=2-4", (2, 5)),
        ("bytes=3-", (3, 10)),
        ("bytes=-4", (6, 10)),
        ("bytes=8-20", (8, 10)),
        ("bytes=12-", (12, 10)),
        ("items=1-2", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 10) == expected


def test_tree_paths_info_branches_and_deletions(api: HfApi, dataset_repo: str) -> None:
    kw = {"repo_id": dataset_repo, "repo_type": "dataset"}
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(**kw)}
    assert top == {".gitattributes": "RepoFile", "README.md": "RepoFile", "data": "RepoFolder"}
    deep = [e.path for e in api.list_repo_tree(**kw, recursive=True)]
    assert "data/train-00000.parquet" in deep
    infos = api.get_paths_info(paths=["data", "README.md", "nope"], expand=True, **kw)
    assert [i.path for i in infos] == ["data", "README.md"]
    assert infos[1].last_commit.title == "data and card"

    api.create_branch(branch="feature/x", **kw)  # a branch name that needs URL-encoding
    api.create_commit(
        operations=[CommitOperationDelete("data/")],
        commit_message="drop data",
        revision="feature/x",
        **kw,
    )
    on_branch = [e.path for e in api.list_repo_tree(revision="feature/x", recursive=True, **kw)]
    assert on_branch == [".gitattributes", "README.md"]
    assert "data/train-00000.parquet" in [e.path for e in api.list_repo_tree(recursive=True, **kw)]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(filename="data/train-00000.parquet", revision="feature/x", **kw)
    api.delete_branch(branch="feature/x", **kw)
    assert [b.name for b in api.list_repo_refs(**kw).branches] == ["main"]


def test_stale_parent_commit_is_rejected(api: HfApi, dataset_repo: str) -> None:
    stale = api.list_repo_commits(dataset_repo, repo_type="dataset")[1].commit_id
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            dataset_repo,
            [CommitOperationAdd("notes.txt", b"hello")],
            commit_message="late",
            repo_type="dataset",
            parent_commit=stale,
        )
    assert err.value.response.status_code == 412


def test_not_found_errors_are_typed(api: HfApi, dataset_repo: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(dataset_repo, "README.md", repo_type="dataset", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(dataset_repo, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(dataset_repo, "missing.txt", repo_type="dataset")


def test_fault_injection_and_request_log(api: HfApi, hub: HubServer, dataset_repo: str) -> None:
    hub.fail_next(1, 500, match=f"/api/datasets/{dataset_repo}")
    with pytest.raises(HfHubHTTPError) as err:
        api.dataset_info(dataset_repo)
    assert err.value.response.status_code == 500
    assert api.dataset_info(dataset_repo).sha  # only one request failed
    hub.fail_next(2, 401)
    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as err:
            api.dataset_info(dataset_repo)
        assert err.value.response.status_code == 401
    assert api.dataset_info(dataset_repo).sha

    log = list(hub.requests)
    assert any(r.method == "PUT" and r.path.startswith("/lfs-objects/") for r in log)
    for record in log:
        assert hub.token not in record.path
        leaks = {k for k, v in record.headers.items() if hub.token in v}
        assert leaks <= {"authorization"}, record
    assert any(r.headers.get("authorization") == f"Bearer {hub.token}" for r in log)


def test_subprocesses_inherit_the_loopback_hub(hub: HubServer) -> None:
    code = "from huggingface_hub import HfApi; print(HfApi().whoami()['name'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hub.user


def test_whoami_and_validate_yaml(api: HfApi, hub: HubServer) -> None:
    assert api.whoami()["name"] == hub.user
    api._validate_yaml("---\nlicense: mit\n---\n")  # raises on a non-2xx answer


def test_transformers_push_and_load_at_revision(api: HfApi, hub: HubServer) -> None:
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
    )
    torch.manual_seed(0)
    first = BertModel(config)
    first.push_to_hub("org/tiny-bert")
    sha = api.model_info("org/tiny-bert").sha
    torch.manual_seed(1)
    BertModel(config).push_to_hub("org/tiny-bert")
    assert api.model_info("org/tiny-bert").sha != sha

    loaded = AutoModel.from_pretrained("org/tiny-bert", revision=sha)
    assert isinstance(loaded, BertModel) and loaded.config.hidden_size == 32
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    files = {s.rfilename for s in api.model_info("org/tiny-bert", files_metadata=True).siblings}
    assert {"config.json", "model.safetensors"} <= files
    assert hub.repo("org/tiny-bert").commits[sha].files["model.safetensors"].blob.lfs


def test_datasets_push_two_splits_and_load(api: HfApi) -> None:
    import datasets

    repo_id = "org/scores"
    datasets.Dataset.from_dict({"x": [1.0, 2.0], "run": ["a", "a"]}).push_to_hub(
        repo_id, config_name="scores", split="r1"
    )
    datasets.Dataset.from_dict({"x": [3.0], "run": ["b"]}).push_to_hub(
        repo_id, config_name="scores", split="r2"
    )
    loaded = datasets.load_dataset(repo_id, "scores")
    assert sorted(loaded) == ["r1", "r2"]
    assert loaded["r1"]["x"] == [1.0, 2.0] and loaded["r2"]["run"] == ["b"]
    readme = hf_hub_download(repo_id, "README.md", repo_type="dataset")
    assert "config_name: scores" in Path(readme).read_text()


def test_reset_forgets_everything() -> None:
    with HubServer() as server:
        api = HfApi(endpoint=server.endpoint, token=server.token)
        api.create_repo("org/tmp")
        server.fail_next(5, 503, match="never-matches")
        server.reset()
        assert server.repos == {} and server.requests == []
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("org/tmp")
