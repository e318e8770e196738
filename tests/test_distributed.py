"""Data-parallel runs over 2 real CPU processes (gloo) and model-parallel loads on the CPU.

The 2-process tests launch ``tests/dist_worker.py`` with ``torchrun`` (or the CLI with
``accelerate launch --multi_gpu``, which starts 2 gloo processes on a CPU-only machine; ``--cpu``
would start ONE) and compare what every rank wrote with a single-process run in this process.
Each asserts the world size the launcher gave AND the one ``hf_cka`` saw: a run that silently
fell back to one process per rank would reproduce the single-process result and prove nothing.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from dist_worker import SYNC_BATCH_SIZES, SYNC_DIMS_A, SYNC_DIMS_B, sync_features
from helpers import free_port, subprocess_env

from hf_cka import MinibatchCKA, cli
from hf_cka.auto import AutoCKA
from hf_cka.data import probe_corpus
from hf_cka.result import CKAResult

WORKER = Path(__file__).with_name("dist_worker.py")
WORLD = 2
BATCH = 8
NULLS = 2


def _run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=180, **kwargs
    )
    assert done.returncode == 0, f"launch failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 ARGS`` on this interpreter (gloo on a CPU-only machine)."""
    return _run([
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
    ])  # fmt: skip


def _ranks(out: Path) -> list[dict[str, Any]]:
    """The per-rank JSON files, checked to come from 2 distinct ranks of a 2-process run."""
    records = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    assert len(records) == WORLD, f"expected {WORLD} rank files, got {len(records)}"
    for record in records:
        assert record["launcher_world_size"] == WORLD
        assert record["hf_cka_world_size"] == WORLD, (
            f"hf_cka.distributed saw {record['hf_cka_world_size']} process(es) in a "
            f"{WORLD}-process launch"
        )
        assert record["hf_cka_rank"] == record["launcher_rank"]
        assert record["is_main_process"] == (record["launcher_rank"] == 0)
        exit_file = out / f"rank{record['launcher_rank']}.exit"
        assert exit_file.read_text() == "destroyed", "hf_cka left its process group to teardown"
    assert sorted(r["launcher_rank"] for r in records) == list(range(WORLD))
    return records


def _floats(hexes: list[str]) -> torch.Tensor:
    return torch.tensor([float.fromhex(h) for h in hexes], dtype=torch.float64)


def _close(hexes: list[str], expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(
        _floats(hexes), expected.reshape(-1), rtol=0, atol=atol, equal_nan=True
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dist-models")
    return {
        name: str(tiny.save(kind, root / name, seed))
        for name, kind, seed in (("bert0", "bert", 0), ("bert1", "bert", 1), ("gpt2", "gpt2", 2))
    }


# ---------------------------------------------------------------------- data parallel: API


# Slow (~40 s each on 2 busy cores): the default set keeps two real 2-process runs, the
# CLI under accelerate launch and the gloo sync below.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_a", "model_b", "n_texts", "n_batches", "dtype", "atol"),
    [
        # 103 = 12 * 8 + 7: a short (7-sample) last batch; rank 0 runs 7 batches, rank 1 six.
        # float64 weights: equal to the single-process run up to float64 rounding.
        ("bert0", "bert1", 103, 13, "float64", 1e-12),
        # 98 = 12 * 8 + 2: the 2 leftover samples join batch 12 (10 samples); 6 batches each.
        # float32 weights: each process sorts ITS batches by length, so the padded forward
        # sub-batches differ from one process's and the features differ at float32 rounding
        # (the tolerance docs/distributed.md states).
        ("bert0", "gpt2", 98, 12, "float32", 1e-7),
    ],
    ids=["bert-bert-short-last-float64", "bert-gpt2-merged-last-float32"],
)
def test_two_processes_match_one(
    models: dict[str, str], tmp_path: Path, model_a: str, model_b: str, n_texts: int,
    n_batches: int, dtype: str, atol: float,
) -> None:  # fmt: skip
    texts = probe_corpus()[:n_texts]
    spec = {"model_a": models[model_a], "model_b": models[model_b], "dtype": dtype,
            "texts": texts, "batch_size": BATCH, "null_permutations": NULLS}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    _torchrun(str(WORKER), "compare", str(tmp_path / "spec.json"), str(tmp_path))
    records = _ranks(tmp_path)

    single = AutoCKA.from_pretrained(models[model_a], models[model_b], dtype=dtype).compare(
        texts, batch_size=BATCH, progress=False, null_permutations=NULLS
    )
    assert single.metadata["n_samples"] == n_texts
    assert single.metadata["n_batches"] == n_batches
    assert single.stderr is not None and single.null is not None
    for record in records:
        assert record["shape"] == list(single.matrix.shape)
        _close(record["matrix"], single.matrix, atol=atol)
        _close(record["stderr"], single.stderr, atol=atol)
        _close(record["null"], single.null, atol=atol)  # permutations seeded by global batch
        assert record["n_samples"] == n_texts
        assert record["n_batches"] == n_batches
        assert record["num_processes"] == WORLD
        # round-robin: rank r runs global batches r, r + 2, ...
        expected_local = len(range(record["launcher_rank"], n_batches, WORLD))
        assert record["local_batches"] == record["expected_local_batches"] == expected_local
    assert records[0]["matrix"] == records[1]["matrix"]  # bit-identical after the all-reduce


# ---------------------------------------------------------------------- data parallel: CLI


def test_cli_under_accelerate_launch(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``accelerate launch --multi_gpu`` (2 gloo processes here) writes ONE result, printed once."""
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(probe_corpus()[:103]) + "\n")
    options = [models["bert0"], models["gpt2"], "--dataset", str(data), "--batch-size", str(BATCH),
               "--dtype", "float64", "--no-progress"]  # fmt: skip
    work = tmp_path / "launched"
    work.mkdir()
    done = _run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            f"--num_processes={WORLD}", "--num_machines=1", "--mixed_precision=no",
            "--dynamo_backend=no", f"--main_process_port={free_port()}",
            "-m", "hf_cka", "compare", *options,
        ],
        cwd=work,
    )  # fmt: skip
    # no --output: each process that saved would create its own ./cka-results/<run id>/
    assert sorted(p.name for p in work.iterdir()) == ["cka-results"]
    folders = sorted((work / "cka-results").iterdir())
    assert len(folders) == 1, f"expected one result folder (main process), got {folders}"
    assert done.stdout.count("mean CKA") == 1, done.stdout
    assert re.search(rf"^processes +{WORLD} \(batches shared round-robin\)$", done.stdout, re.M)
    launched = CKAResult.load(folders[0])

    assert cli.main(["compare", *options, "--output", str(tmp_path / "single")]) == 0
    assert capsys.readouterr().out.count("mean CKA") == 1
    single = CKAResult.load(tmp_path / "single")
    assert launched.metadata["num_processes"] == WORLD
    assert single.metadata["num_processes"] == 1
    assert launched.metadata["n_samples"] == single.metadata["n_samples"] == 103
    assert launched.metadata["n_batches"] == single.metadata["n_batches"] == 13
    torch.testing.assert_close(launched.matrix, single.matrix, rtol=0, atol=1e-12)
    torch.testing.assert_close(launched.stderr, single.stderr, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- MinibatchCKA.sync


def test_sync_over_gloo_equals_merge(tmp_path: Path) -> None:
    _torchrun(str(WORKER), "sync", str(tmp_path))
    records = _ranks(tmp_path)
    n_global = len(SYNC_BATCH_SIZES)
    shard_of = {rank: list(range(rank, n_global, WORLD)) for rank in range(WORLD)}
    assert {r["launcher_rank"]: r["batches"] for r in records} == shard_of

    shards = []
    for rank in range(WORLD):
        metric = MinibatchCKA(len(SYNC_DIMS_A), len(SYNC_DIMS_B))
        for index in shard_of[rank]:
            metric.update(*sync_features(index))
        record = next(r for r in records if r["launcher_rank"] == rank)
        for key, value in metric.states.items():  # each rank accumulated what we would
            _close(record["local_states"][key], value, atol=0)
        shards.append(metric)
    merged = shards[0].merge(shards[1])
    whole = MinibatchCKA(len(SYNC_DIMS_A), len(SYNC_DIMS_B))
    for index in range(n_global):
        whole.update(*sync_features(index))
    for record in records:
        for key, value in merged.states.items():  # a + b is exact in either order
            _close(record["synced_states"][key], value, atol=0)
        _close(record["matrix"], merged.compute(), atol=0)
        _close(record["matrix"], whole.compute(), atol=1e-12)
    assert int(merged.states["n_samples"]) == sum(SYNC_BATCH_SIZES)


# ---------------------------------------------------------------------- model parallel (CPU)


def _texts() -> list[str]:
    return probe_corpus()[:40]


# One block offloaded to "disk": accelerate dispatches the model with hooks that load that block's
# weights for each forward pass, the CPU-only stand-in for a model spread over several GPUs.
OFFLOAD_MAP = {"embeddings": "cpu", "encoder.layer.0": "cpu", "encoder.layer.1": "disk",
               "encoder.layer.2": "cpu", "pooler": "cpu"}  # fmt: skip


@pytest.mark.parametrize("device_map", ["auto", OFFLOAD_MAP], ids=["auto", "explicit-offload"])
def test_device_map_matches_default_load(models: dict[str, str], device_map: Any) -> None:
    pair = (models["bert0"], models["bert1"])
    reference = AutoCKA.from_pretrained(*pair).compare(_texts(), batch_size=BATCH, progress=False)
    mapped = AutoCKA.from_pretrained(*pair, device_map=device_map)
    if isinstance(device_map, dict):
        assert mapped.model_b.model.hf_device_map == device_map
        assert hasattr(mapped.model_b.model.encoder.layer[1], "_hf_hook")  # really dispatched
    result = mapped.compare(_texts(), batch_size=BATCH, progress=False)
    assert mapped.layers_a == reference.layers_a and mapped.layers_b == reference.layers_b
    assert result.metadata["n_samples"] == len(_texts())
    torch.testing.assert_close(result.matrix, reference.matrix, rtol=0, atol=1e-6)


def test_bfloat16_weights_accumulate_in_float64(models: dict[str, str]) -> None:
    full = AutoCKA.from_pretrained(models["bert0"], models["gpt2"], dtype="float32")
    half = AutoCKA.from_pretrained(models["bert0"], models["gpt2"], dtype="bfloat16")
    assert next(half.model_a.model.parameters()).dtype == torch.bfloat16
    reference = full.compare(_texts(), batch_size=BATCH, progress=False)
    result = half.compare(_texts(), batch_size=BATCH, progress=False)
    assert result.matrix.dtype == torch.float64
    assert result.metadata["dtype"] == "bfloat16"
    assert not torch.equal(result.matrix, reference.matrix)  # the bf16 weights did run
    diff = (result.matrix - reference.matrix).abs().max().item()
    assert math.isfinite(diff) and diff < 1e-2, f"bf16 vs fp32 CKA differ by {diff}"
