"""The ``hf-cka`` command line end to end on tiny local models (in-process and as subprocesses)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import tiny
import torch
from helpers import subprocess_env
from hub_server import user_for_token
from huggingface_hub import HfApi
from matplotlib.image import imread

from hf_cka import distributed
from hf_cka.cli import main
from hf_cka.drift import DriftResult
from hf_cka.result import CKAResult

FAST = ["--num-samples", "48", "--batch-size", "16", "--no-progress"]
SECRET = "hf_cli_secret_token_do_not_print"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny BERTs (embedding output + 3 blocks = 4 default layers) saved to folders."""
    root = tmp_path_factory.mktemp("cli-models")
    return {name: str(tiny.save("bert", root / name, seed)) for seed, name in enumerate("abcd")}


@pytest.fixture(scope="module")
def saved_run(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
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


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


# --------------------------------------------------------------------------- compare


def test_compare_writes_result_heatmap_and_summary(
    saved_run: Path, models: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert sorted(p.name for p in saved_run.iterdir()) == [
        "heatmap.png", "result.json", "tensors.safetensors",
    ]  # fmt: skip
    assert (saved_run / "heatmap.png").read_bytes().startswith(PNG_MAGIC)
    result = CKAResult.load(saved_run)
    assert result.shape == (4, 4)
    assert (result.model_a, result.model_b) == (models["a"], models["b"])
    assert result.metadata["n_samples"] == 48
    assert result.metadata["batch_size"] == 16

    # the summary printed by the fixture's run
    folder = saved_run.parent / "again"
    assert main(["compare", models["a"], models["b"], "-o", str(folder), *FAST]) == 0
    out = capsys.readouterr().out
    again = CKAResult.load(folder)
    assert torch.equal(again.matrix, result.matrix)  # same data, same batches, same numbers
    summary = summary_rows(out)
    assert summary["processes"] == "1"
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
    hub, models: dict[str, str], saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
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
    local = CKAResult.load(saved_run)  # the same weights as local folders a and b
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


def test_drift_takes_another_measure(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "drift"
    argv = ["drift", models["a"], models["b"], "-o", str(folder), "--measure", "procrustes"]
    assert main([*argv, *FAST]) == 0
    drift = DriftResult.load(folder)
    assert drift.metadata["measure"] == "procrustes" and drift.results[0].metadata["measure"] == (
        "procrustes"
    )
    assert "same-layer Procrustes" in capsys.readouterr().out


def test_max_bytes_bounds_the_held_features(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compare", models["a"], models["b"], "-o", str(tmp_path / "out"), *FAST]
    assert main([*argv, "--measure", "procrustes", "--max-bytes", "1000"]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert re.search(r"needs about \d+\.\d\d KiB .* max_bytes allows 1000 B", error), error
    assert not (tmp_path / "out").exists()


def test_plot_rewrites_heatmap_and_annotates(
    saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shutil.copytree(saved_run, tmp_path / "run")
    (folder / "heatmap.png").unlink()
    assert main(["plot", str(folder)]) == 0
    assert (folder / "heatmap.png").read_bytes().startswith(PNG_MAGIC)
    annotated = tmp_path / "figures" / "annotated.png"
    assert main(["plot", str(folder), "--annot", "--dpi", "60", "-o", str(annotated)]) == 0
    height, width, _ = imread(annotated).shape
    assert 100 < width < 1000 and 100 < height < 1000  # dpi 60 instead of 150
    assert f"wrote {annotated}" in capsys.readouterr().out


def test_plot_errors(saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "result.json" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- hub


def test_push_then_from_hub_gives_the_same_matrix(
    hub, saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shutil.copytree(saved_run, tmp_path / "run")
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
    one_error_line(capsys.readouterr().err)


def unwritable_folder() -> str:
    """A folder where not even root can create files (procfs), else skip."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs a Linux /proc to stand in for an unwritable folder")
    return "/proc/hf-cka-output"


@pytest.mark.parametrize(
    ("make_output", "message"),
    [
        (lambda tmp: str(tmp / "notes.txt"), "is a file"),
        (lambda tmp: str(tmp / "mine"), "non-empty folder that holds no hf_cka result"),
        (lambda tmp: "", "--output is empty"),
        (lambda tmp: " ", "--output is empty"),
        (lambda tmp: str(tmp / "notes.txt" / "sub"), "notes.txt is a file, so no folder"),
        (lambda tmp: unwritable_folder(), "cannot create files in /proc"),
    ],
    ids=["existing-file", "non-result-folder", "empty", "blank", "below-a-file", "unwritable"],
)
def test_bad_output_fails_in_one_line_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_output, message: str
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("a,b")
    missing = str(tmp_path / "no-such-model")  # loading it would fail with another message
    for command in (["compare", missing], ["drift", missing, missing]):
        started = time.perf_counter()
        assert main([*command, "-o", make_output(tmp_path), *FAST]) == 2
        assert time.perf_counter() - started < 1.0
        line = one_error_line(capsys.readouterr().err)
        assert message in line and "no-such-model" not in line
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["data.csv"]


def test_an_earlier_result_or_empty_folder_is_a_valid_output(
    models: dict[str, str], saved_run: Path, tmp_path: Path
) -> None:
    earlier = shutil.copytree(saved_run, tmp_path / "earlier")
    (tmp_path / "empty").mkdir()
    for folder in (earlier, tmp_path / "empty"):
        assert main(["compare", models["a"], models["b"], "-o", str(folder), *FAST]) == 0
        assert CKAResult.load(folder).shape == (4, 4)


def test_a_save_that_fails_after_the_run_falls_back_and_names_the_folder(
    models: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The output was fine when checked, then something wrote a file there during the run."""
    from hf_cka.auto import AutoCKA

    target = tmp_path / "out"
    compare = AutoCKA.compare

    def compare_then_block_the_output(self: AutoCKA, *args: object, **kwargs: object):
        result = compare(self, *args, **kwargs)  # type: ignore[arg-type]
        target.write_text("another program wrote this file meanwhile")
        return result

    monkeypatch.setattr(AutoCKA, "compare", compare_then_block_the_output)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", models["a"], models["b"], "-o", str(target), *FAST]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    (fallback,) = (tmp_path / "cka-results").iterdir()
    named = fallback.relative_to(tmp_path)  # ./cka-results/<run id>
    assert f"could not save to {target}" in line and line.endswith(f"saved to {named}")
    result = CKAResult.load(fallback)
    assert result.shape == (4, 4) and (fallback / "heatmap.png").is_file()
    assert summary_rows(out)["saved to"].startswith(f"{named}/ ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "a", "--device", "tpu9"], "unknown device 'tpu9'"),
        (["compare", "a", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["compare", "a", "--max-bytes", "0"], "max_bytes >= 1"),
        (["compare", "a", "--device", "cuda"], "no cuda device"),
        (["compare", "a", "--device", "cuda:0"], "no cuda device"),
        (["drift", "a", "b", "--device", "tpu9"], "unknown device 'tpu9'"),
        (["compare", "a", "--batch-size", "8.0"], "expected an integer, got '8.0'"),
        (["compare", "a", "--batch-size", "0"], "batch_size >= 4"),
        (["compare", "a", "--max-length", "0"], "max_length >= 1"),
        (["compare", "a", "--max-length", "-1"], "max_length >= 1"),
        (["compare", "a", "--num-samples", "0"], "num_samples >= 1"),
        (["plot", "x", "--cmap", "bogus"], "unknown colour map 'bogus'"),
        (["plot", "x", "--cmap", "viridiss"], "Did you mean 'viridis'"),
        (["plot", "x", "--dpi", "100000"], "resolution from 1 to 1200, got 100000"),
        (["plot", "x", "--dpi", "0"], "resolution from 1 to 1200, got 0"),
    ],
)
def test_bad_option_values_are_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main([*argv, "--no-progress"] if argv[0] != "plot" else argv) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_plot_options_are_checked_before_the_result_is_read(
    saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shutil.copytree(saved_run, tmp_path / "run")
    before = (folder / "heatmap.png").read_bytes()
    assert main(["plot", str(folder), "--cmap", "bogus", "--dpi", "100"]) == 2
    assert main(["plot", str(folder), "--dpi", "100000"]) == 2
    assert (folder / "heatmap.png").read_bytes() == before
    assert main(["plot", str(folder), "--cmap", "viridis", "--dpi", "20"]) == 0


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


LAZY_IMPORTS = """
import contextlib, io, json, sys
import hf_cka, hf_cka.functional
after_functional = sorted(sys.modules)
from hf_cka.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main([*command, "--help"]) for command in ([], ["compare"], ["drift"], ["plot"])]
    codes.append(main(["--version"]))
print(json.dumps({"functional": after_functional, "help": sorted(sys.modules), "codes": codes}))
"""
HEAVY = ("matplotlib", "pandas", "pyarrow", "huggingface_hub", "transformers", "datasets")


def test_functional_and_help_import_no_heavy_library(tmp_path: Path) -> None:
    """``import hf_cka.functional``, ``hf-cka --help`` and ``--version`` stay cheap: a fresh
    interpreter loads none of matplotlib, pandas, pyarrow, huggingface_hub, transformers or
    datasets for them."""
    proc = run([sys.executable, "-c", LAZY_IMPORTS], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert loaded["codes"] == [0, 0, 0, 0, 0]
    for stage in ("functional", "help"):
        heavy = {name.split(".")[0] for name in loaded[stage]} & set(HEAVY)
        assert not heavy, f"{stage} imported {sorted(heavy)}"
