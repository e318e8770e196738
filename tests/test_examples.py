"""Every script in ``examples/`` runs with ``--offline`` and writes the files it documents."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import REPO_ROOT, subprocess_env

from hf_cka.drift import DriftResult
from hf_cka.result import CKAResult

EXAMPLES = REPO_ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(
    name: str, cwd: Path, *args: str, hub_offline: bool = True, drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python examples/NAME --offline ARGS`` in ``cwd``; the test environment is inherited.

    ``HF_HUB_OFFLINE=1`` (unless ``hub_offline=False``) proves that nothing is downloaded;
    ``drop`` removes variables.
    """
    env = subprocess_env(drop=drop, HF_HUB_OFFLINE="1" if hub_offline else "0", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--offline", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_MAGIC), path


def test_examples_do_not_import_the_tests() -> None:
    test_modules = {path.stem for path in Path(__file__).parent.glob("*.py")} | {"tests"}
    for script in EXAMPLES.glob("*.py"):
        imported = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", script.read_text(), re.M)
        assert not test_modules & {name.split(".")[0] for name in imported}, script


def test_compare_two_checkpoints(tmp_path: Path) -> None:
    proc = run_example("compare_two_checkpoints.py", tmp_path)
    assert_png(tmp_path / "compare_two_checkpoints.png")
    result = CKAResult.load(tmp_path / "compare_two_checkpoints")
    assert result.shape == (4, 4)
    assert result.metadata["n_samples"] == 256
    assert bool((result.matrix.diagonal() > 0.5).all())  # B is A plus a little noise
    assert "same-layer CKA" in proc.stdout


@pytest.mark.slow  # ~30 s; the default set runs compare_two_checkpoints and custom_modules
def test_finetune_drift(tmp_path: Path) -> None:
    proc = run_example("finetune_drift.py", tmp_path)
    checkpoints = tmp_path / "finetune_drift_checkpoints"
    for step in (0, 5, 10):
        assert (checkpoints / f"checkpoint-{step}" / "config.json").is_file()
    assert_png(tmp_path / "finetune_drift.png")
    drift = DriftResult.load(tmp_path / "finetune_drift")
    assert [Path(c).name for c in drift.checkpoints] == ["checkpoint-5", "checkpoint-10"]
    assert Path(drift.base).name == "checkpoint-0"
    # training moved the weights: no layer is identical to the base any more
    assert bool((drift.similarity < 0.999).all()), drift.similarity
    assert "step 10: loss" in proc.stdout


def test_custom_modules(tmp_path: Path) -> None:
    proc = run_example("custom_modules.py", tmp_path)
    for name in ("custom_heatmap.png", "custom_trend.png", "custom_comparison.png"):
        assert_png(tmp_path / name)
    assert "batch 8/8: mean CKA" in proc.stdout  # the seed-style callback ran on every batch


@pytest.mark.slow
def test_multi_gpu_single_process(tmp_path: Path) -> None:
    proc = run_example("multi_gpu.py", tmp_path)
    assert_png(tmp_path / "multi_gpu.png")
    result = CKAResult.load(tmp_path / "multi_gpu")
    assert result.metadata["num_processes"] == 1
    assert "from 1 process(es)" in proc.stdout


@pytest.mark.slow
def test_publish_to_hub_pushes_and_loads_back(hub, tmp_path: Path) -> None:
    repo_id = f"{hub.user}/example-{uuid.uuid4().hex[:8]}"
    proc = run_example("publish_to_hub.py", tmp_path, "--repo-id", repo_id, hub_offline=False)
    local = tmp_path / "publish_to_hub"
    run_id = json.loads((local / "result.json").read_text())["metadata"]["run_id"]
    head = hub.repo(repo_id, "dataset")
    files = head.commits[head.branches["main"]].files
    assert f"data/scores/{run_id}.parquet" in files
    assert f"plots/{run_id}.png" in files
    assert f"loaded back CKAResult(run_id='{run_id}'" in proc.stdout


@pytest.mark.slow
def test_publish_to_hub_without_endpoint_saves_locally(tmp_path: Path) -> None:
    proc = run_example("publish_to_hub.py", tmp_path, drop=("HF_ENDPOINT",))
    assert CKAResult.load(tmp_path / "publish_to_hub").shape == (3, 4)
    assert "HF_ENDPOINT" in proc.stdout
