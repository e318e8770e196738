"""The ``hf-cka`` command line end to end on tiny local models (in-process and as subprocesses)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import tiny
import torch
from hub_server import user_for_token
from huggingface_hub import HfApi
from matplotlib.image import imread

from hf_cka import distributed
from hf_cka.cli import main
from hf_cka.result import CKAResult, DriftResult

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-samples", "48", "--batch-size", "16", "--no-progress"]
SECRET = "hf_cli_secret_token_do_not_print"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny BERTs (embedding output + 3 blocks = 4 default layers) saved to folders."""
    root = tmp_path_factory.mktemp("cli-models")
    return {name: str(tiny.save("bert", root / name, seed)) for seed, name in enumerate("abcd")}


@pytest.fixture(scope="module")
def saved(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A result folder written by ``hf-cka compare`` (copy it before changing it)."""
    folder = tmp_path_factory.mktemp("cli-saved") / "run"
    assert main(["compare", models["a"], models["b"], "-o", str(folder), *FAST]) == 0
    return folder


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-cka: error: "), err
    assert "Traceback" not in err
    return lines[0]


def summary_rows(out: str) -> dict[str, str]:
    """The ``label  value`` rows of a printed summary (labels may hold single spaces)."""
    pairs = (re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines())
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def subprocess_env() -> dict[str, str]:
    """The test environment (loopback Hub settings included) with this checkout importable.

    One OpenMP thread: on a small busy machine more threads make tiny models far slower.
    """
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    pythonpath = os.pathsep.join(p for p in paths if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


# --------------------------------------------------------------------------- compare


def test_compare_writes_result_heatmap_and_summary(
    saved: Path, models: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [
        "heatmap.png", "result.json", "tensors.safetensors",
    ]  # fmt: skip
    assert (saved / "heatmap.png").read_bytes().startswith(PNG_MAGIC)
    result = CKAResult.load(saved)
    assert result.shape == (4, 4)
    assert (result.model_a, result.model_b) == (models["a"], models["b"])
    assert result.metadata["n_samples"] == 48
    assert result.metadata["batch_size"] == 16

    # the summary printed by the fixture's run
    folder = saved.parent / "again"
    assert main(["compare", models["a"], models["b"], "-o", str(folder), *FAST]) == 0
    out = capsys.readouterr().out
    again = CKAResult.load(folder)
    assert torch.equal(again.matrix, result.matrix)  # same data, same batches, same numbers
    summary = summary_rows(out)
    assert summary["model A"] == models["a"]
    assert summary["model B"] == models["b"]
    assert summary["layers"].startswith("4 x 4 (pooling=mean, kernel=linear")
    diagonal = [f"{value:.3f}" for value in again.matrix.diagonal().tolist()]
    assert summary["diagonal"].split() == diagonal
    assert summary["mean CKA"].startswith(f"{again.matrix.mean().item():.4f} ")
    assert summary["samples"] == "48 in 3 batches of 16 from hf_cka/probe_corpus"
    assert summary["std. error"].startswith("at most ")
    assert summary["saved to"].startswith(f"{folder}/ ")


def test_compare_default_output_is_a_new_run_folder(
    models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["compare", models["a"], *FAST]) == 0
    (folder,) = (tmp_path / "cka-results").iterdir()
    result = CKAResult.load(folder)
    assert folder.name == result.run_id
    assert (folder / "heatmap.png").is_file()
    assert result.is_self_comparison  # B omitted: A with itself
    assert torch.allclose(result.matrix.diagonal(), torch.ones(4, dtype=torch.float64))


def test_compare_layer_indices(models: dict[str, str], tmp_path: Path) -> None:
    args = ["--layers-a", "0,-1", *FAST]
    assert main(["compare", models["a"], models["b"], "-o", str(tmp_path / "ab"), *args]) == 0
    result = CKAResult.load(tmp_path / "ab")
    assert result.layers_a == ["encoder.layer.0:input", "encoder.layer.2"]
    assert result.shape == (2, 4)  # B keeps its default layers

    assert main(["compare", models["a"], "-o", str(tmp_path / "self"), *args]) == 0
    assert CKAResult.load(tmp_path / "self").shape == (2, 2)  # B omitted: B follows --layers-a


def test_compare_two_revisions_of_one_hub_repo(
    hub, models: dict[str, str], saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = HfApi()
    repo_id = f"{hub.user}/tiny-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id)
    api.upload_folder(folder_path=models["a"], repo_id=repo_id)
    api.create_branch(repo_id, branch="v2")
    api.upload_folder(folder_path=models["b"], repo_id=repo_id, revision="v2")
    sha_main, sha_v2 = (api.model_info(repo_id, revision=rev).sha for rev in ("main", "v2"))

    folder = tmp_path / "revisions"
    assert main(["compare", repo_id, "--revision-b", "v2", "-o", str(folder), *FAST]) == 0
    result = CKAResult.load(folder)
    assert (result.metadata["commit_sha_a"], result.metadata["commit_sha_b"]) == (sha_main, sha_v2)
    model_b = summary_rows(capsys.readouterr().out)["model B"]
    assert model_b == f"{repo_id}@v2 (commit {sha_v2[:12]})"
    local = CKAResult.load(saved)  # the same weights as local folders a and b
    torch.testing.assert_close(result.matrix, local.matrix, rtol=0, atol=1e-12)


def test_only_the_main_process_writes_and_prints(
    models: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    assert main(["compare", models["a"], models["b"], "-o", str(tmp_path / "out"), *FAST]) == 0
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- drift, plot


def test_drift_writes_folder_plot_and_table(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "drift"
    argv = ["drift", models["a"], models["b"], models["a"], "-o", str(folder), *FAST]
    assert main(argv) == 0
    drift = DriftResult.load(folder)
    assert drift.checkpoints == [models["b"], models["a"]]
    assert (folder / "drift.png").read_bytes().startswith(PNG_MAGIC)
    assert torch.allclose(drift.similarity[:, 1], torch.ones(4, dtype=torch.float64))
    out = capsys.readouterr().out
    assert summary_rows(out)["checkpoint [2]"] == models["a"]
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["layer"] == ["[1]", "[2]"]
    for layer, values in zip(drift.layers, drift.similarity.tolist(), strict=True):
        assert rows[layer] == [f"{value:.3f}" for value in values]


def test_plot_rewrites_heatmap_and_annotates(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shutil.copytree(saved, tmp_path / "run")
    (folder / "heatmap.png").unlink()
    assert main(["plot", str(folder)]) == 0
    assert (folder / "heatmap.png").read_bytes().startswith(PNG_MAGIC)
    annotated = tmp_path / "figures" / "annotated.png"
    assert main(["plot", str(folder), "--annot", "--dpi", "60", "-o", str(annotated)]) == 0
    height, width, _ = imread(annotated).shape
    assert 100 < width < 1000 and 100 < height < 1000  # dpi 60 instead of 150
    assert f"wrote {annotated}" in capsys.readouterr().out


def test_plot_errors(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "result.json" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- hub


def test_push_then_from_hub_gives_the_same_matrix(
    hub, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shutil.copytree(saved, tmp_path / "run")
    heatmap = (folder / "heatmap.png").read_bytes()
    repo_id = f"org/cli-{uuid.uuid4().hex[:8]}"
    assert main(["push", str(folder), repo_id]) == 0
    assert repo_id in capsys.readouterr().out
    loaded, pushed = CKAResult.from_hub(repo_id), CKAResult.load(folder)
    assert torch.equal(loaded.matrix.view(torch.int64), pushed.matrix.view(torch.int64))
    assert loaded.run_id == pushed.run_id
    assert (folder / "heatmap.png").read_bytes() == heatmap  # the local copy keeps its plot
    assert not hub.repo(repo_id, "dataset").private


def test_drift_push_to_hub(hub, models: dict[str, str], tmp_path: Path) -> None:
    folder, repo_id = tmp_path / "drift", f"org/cli-drift-{uuid.uuid4().hex[:8]}"
    argv = ["drift", models["a"], models["b"], models["c"], "-o", str(folder), *FAST]
    assert main([*argv, "--push-to-hub", repo_id]) == 0
    drift = DriftResult.load(folder)
    assert (folder / "drift.png").is_file()  # kept although push_to_hub re-saved the folder
    for result in drift.results:
        pulled = CKAResult.from_hub(repo_id, result.run_id)
        assert torch.equal(pulled.matrix, result.matrix)


def test_token_is_used_but_never_printed_or_written(
    hub, models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo_id = f"org/cli-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "run"
    argv = ["compare", models["a"], models["b"], "-o", str(folder), *FAST]
    argv += ["--token", SECRET, "--push-to-hub", repo_id, "--private"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "pushed to" in out and "heatmap.png" in out
    repo = hub.repo(repo_id, "dataset")
    assert repo.author == user_for_token(SECRET)  # the push used --token
    assert repo.private
    assert (folder / "heatmap.png").is_file()

    assert main(["compare", str(tmp_path / "missing"), "--token", SECRET, "--debug"]) == 2
    out2, err2 = capsys.readouterr()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for text in (out, err, out2, err2):
        assert SECRET not in text
    assert SECRET.encode() not in written


# --------------------------------------------------------------------------- errors and help


def test_bad_model_path_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(tmp_path / "no-such-model")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no-such-model" in line


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path / "no-such-model"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "ModelNotFoundError" in err
    assert err.strip().splitlines()[-1].startswith("hf-cka: error: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "a", "--batch-size", "2"],
        ["compare", "a", "--layers-a", ","],
        ["compare", "a", "--pooling", "median"],
        ["drift", "base"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_private_needs_push_to_hub(
    models: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", models["a"], "--private", *FAST]) == 2
    assert "--push-to-hub" in one_error_line(capsys.readouterr().err)


def test_interrupt_exits_130(
    models: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hf_cka.auto import AutoCKA

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoCKA, "compare", interrupted)
    assert main(["compare", models["a"], *FAST]) == 130
    assert capsys.readouterr().err.strip() == "hf-cka: interrupted"


@pytest.mark.parametrize("command", [[], ["compare"], ["drift"], ["plot"], ["push"]])
def test_help_of_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-cka {' '.join(command)}".rstrip())
    assert "examples:" in out


# --------------------------------------------------------------------------- real processes


def test_python_m_hf_cka_compare(models: dict[str, str], tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "hf_cka", "compare", models["a"], models["b"], "-o", "out"]
    proc = run([*argv, *FAST], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mean CKA" in proc.stdout
    assert CKAResult.load(tmp_path / "out").shape == (4, 4)
    assert (tmp_path / "out" / "heatmap.png").is_file()


def test_console_script_errors_in_one_line(tmp_path: Path) -> None:
    script = shutil.which("hf-cka", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the hf-cka console script is not installed next to this Python")
    proc = run([script, "compare", str(tmp_path / "no-such-model"), "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 2
    one_error_line(proc.stderr)
    assert proc.stdout == ""
