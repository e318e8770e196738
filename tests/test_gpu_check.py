"""``benchmarks/gpu_check.sh``: its verdicts, and its CPU dry run (plumbing, every JSON key)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def verdicts(overhead_256: float, products: set[str], dry_run: bool = False) -> dict:
    plan = gpu_check.DRY if dry_run else gpu_check.REAL
    ctx = gpu_check.Context(
        plan, dry_run, ROOT, ROOT, ROOT, texts=[], shared={"products": products}
    )
    largest = f"batch_{plan.batch_sizes[-1]}"
    report = {
        "overhead": {largest: {"overhead": overhead_256}},
        "minilm_pair": {"finite": True},
        "llama_pair": {"finite": True},
        "cuda_tests": {"ok": True},
    }
    return gpu_check.targets(ctx, report)


def test_targets_need_overhead_within_3_percent_and_float64_products_on_the_gpu() -> None:
    good = verdicts(0.021, {"cuda:0 torch.float64"})
    assert good["evaluated"] and good["overhead_256_within_3_percent"]
    assert good["products_on_gpu"] and good["products_float64"] and good["results_finite"]
    slow = verdicts(0.031, {"cuda:0 torch.float64", "cpu torch.float64"})
    assert not slow["overhead_256_within_3_percent"] and not slow["products_on_gpu"]
    assert not verdicts(0.0, {"cuda:0 torch.float32"})["products_float64"]
    assert not verdicts(0.0, set())["products_on_gpu"]  # nothing recorded is no evidence
    assert not verdicts(0.0, {"cpu torch.float64"}, dry_run=True)["evaluated"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_the_real_check_refuses_to_run_without_cuda(tmp_path: Path) -> None:
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    """The whole script on CPU with tiny models (~30 s of CPU; longer on a loaded machine)."""
    done = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report) == list(gpu_check.SECTIONS)
    assert all(section["error"] is None for section in report.values()), report
    assert report["machine"]["dry_run"] is True
    tests = report["cuda_tests"]
    assert tests["ok"] and tests["failed"] == 0
    assert "tests.test_reliability::test_engine_on_cuda_matches_cpu" in tests["outcomes"]
    for name in ("minilm_pair", "llama_pair", "device_map_auto"):
        assert report[name]["finite"] and report[name]["shape"][0] > 1, name
    assert report["minilm_pair"]["model_dtype"] == "torch.bfloat16"
    assert report["minilm_pair"]["max_abs_diff_vs_float32"] < 0.05
    assert report["minilm_drift"]["larger_perturbation_lower_cka"]
    assert report["device_map_auto"]["max_abs_diff_vs_device"] < 1e-6
    for batch_size in gpu_check.DRY.batch_sizes:
        figures = report["overhead"][f"batch_{batch_size}"]
        assert figures["median_s"]["bare"] > 0 and isinstance(figures["overhead"], float)
    assert report["syncs"]["measured"] is False
    targets = report["targets"]
    assert targets["evaluated"] is False and targets["gram_products"] == ["cpu torch.float64"]
