"""Extraction shards: a real 2-process torchrun extraction equals the single-process one (with a
shards folder and in memory), a killed extraction resumes at its last complete shard, and a
damaged or foreign shard is refused with an error naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny
import torch
from helpers import free_port, subprocess_env

from hf_cka import cli
from hf_cka.auto import AutoCKA
from hf_cka.capture import Extractor
from hf_cka.errors import FingerprintMismatchError, ShardDamagedError
from hf_cka.fingerprint import Fingerprint
from hf_cka.shards import SHARDS_DIR, ShardFolder

WORKER = Path(__file__).with_name("dist_fingerprint_worker.py")
TEXTS = tiny.varied_texts(45, seed=1)  # batch_size 6: 7 CKA batches, the last of 9 (6 + 3)
OPTIONS = {"batch_size": 6, "chunk_batches": 2, "progress": False, "dtype": "float64"}


class Killed(Exception):
    """Stands in for the process being killed after some shards were written."""


@pytest.fixture
def forwards(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts the forward passes of the extraction and the samples they hold."""
    counts: Counter = Counter()
    original = Extractor._forward

    def forward(self: Extractor, encodings: object, indices: list[int]) -> dict:
        counts["calls"] += 1
        counts["rows"] += len(indices)
        return original(self, encodings, indices)

    monkeypatch.setattr(Extractor, "_forward", forward)
    yield counts


def test_two_processes_equal_one(saved, tmp_path: Path) -> None:
    spec = {"model": saved("bert"), "model_b": saved("bert", 1), "texts": TEXTS, "batch_size": 6}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER),
         str(tmp_path / "spec.json"), str(tmp_path)],
        env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, f"launch failed:\n{done.stdout}\n{done.stderr}"
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert [(r["launcher_world_size"], r["hf_cka_world_size"]) for r in records] == [(2, 2)] * 2
    assert sorted(r["hf_cka_rank"] for r in records) == [0, 1]
    # rank 0 took batches 0 2 4 6 in windows of 2, rank 1 batches 1 3 5
    expected_shards = ["shard-000000-r0.json", "shard-000001-r1.json",
                       "shard-000004-r0.json", "shard-000005-r1.json"]  # fmt: skip
    single = AutoCKA.fingerprint(saved("bert"), TEXTS, **OPTIONS)
    scale = single.distances.abs().max()
    for record in records:
        assert record["shard_files"] == expected_shards
        assert record["batch_digests"] == single.batch_digests
        assert record["samples_digest"] == single.samples_digest
        for key in ("with_shards", "in_memory"):
            values = torch.tensor([float.fromhex(h) for h in record[key]], dtype=torch.float64)
            assert values.shape == single.distances.reshape(-1).shape
            assert (values - single.distances.reshape(-1)).abs().max() <= 1e-12 * scale
    pair = AutoCKA.from_pretrained(saved("bert"), saved("bert", 1), dtype="float64")
    truth = pair.compare(TEXTS, batch_size=6, progress=False, measure="procrustes").matrix
    for record in records:  # a full-data measure over 2 processes equals the single stream
        values = torch.tensor(
            [float.fromhex(h) for h in record["grid_procrustes"]], dtype=torch.float64
        )
        torch.testing.assert_close(values.reshape(truth.shape), truth, atol=1e-12, rtol=0)
    saved_store = Fingerprint.load(tmp_path)  # saved by the main process, shards removed
    assert saved_store.batch_digests == single.batch_digests
    assert not (tmp_path / SHARDS_DIR).exists()


def _kill_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    original = ShardFolder.write
    count = {"n": 0}

    def write(self: ShardFolder, rank: int, batches: dict) -> Path:
        if count["n"] == writes:
            raise Killed
        count["n"] += 1
        return original(self, rank, batches)

    monkeypatch.setattr(ShardFolder, "write", write)


def test_killed_extraction_resumes_at_the_last_complete_shard(
    saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forwards: Counter
) -> None:
    shards = tmp_path / SHARDS_DIR
    whole = AutoCKA.fingerprint(saved("bert"), TEXTS, **OPTIONS)
    with monkeypatch.context() as patch:
        _kill_after(patch, 1)  # the first window (batches 0-1) is written, then killed
        with pytest.raises(Killed):
            AutoCKA.fingerprint(saved("bert"), TEXTS, shards_dir=shards, **OPTIONS)
    assert [p.name for p in shards.glob("*.json")] == ["shard-000000-r0.json"]
    forwards.clear()
    resumed = AutoCKA.fingerprint(saved("bert"), TEXTS, shards_dir=shards, **OPTIONS)
    assert forwards["rows"] == 45 - 12  # only the batches after the complete shard
    assert sorted(p.name for p in shards.glob("*.json")) == [
        "shard-000000-r0.json",
        "shard-000002-r0.json",  # the rerun's first window (2 batches) measures a sample again
        "shard-000004-r0.json",
    ]
    torch.testing.assert_close(resumed.distances, whole.distances, atol=1e-12, rtol=0)
    forwards.clear()  # everything is there: a rerun runs no forward pass
    again = AutoCKA.fingerprint(saved("bert"), TEXTS, shards_dir=shards, **OPTIONS)
    assert forwards["calls"] == 0
    torch.testing.assert_close(again.distances, resumed.distances, atol=0, rtol=0)
    resumed.save(tmp_path)  # the saved store supersedes its shards
    assert not shards.exists() and Fingerprint.load(tmp_path).n_samples == 45


def test_damaged_or_foreign_shards_are_refused(saved, tmp_path: Path) -> None:
    shards = tmp_path / SHARDS_DIR
    AutoCKA.fingerprint(saved("bert"), TEXTS, shards_dir=shards, **OPTIONS)
    tensors = shards / "shard-000002-r0.safetensors"
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(ShardDamagedError, match="shard-000002-r0.safetensors.*sha256"):
        AutoCKA.fingerprint(saved("bert"), TEXTS, shards_dir=shards, **OPTIONS)
    (shards / "shard-000002-r0.json").write_text("{not json")
    with pytest.raises(ShardDamagedError, match="shard-000002-r0.json"):
        AutoCKA.fingerprint(saved("bert"), TEXTS, shards_dir=shards, **OPTIONS)
    (shards / "shard-000002-r0.json").unlink()  # an incomplete shard is computed again
    with pytest.raises(FingerprintMismatchError, match="shard-000000-r0.json.*another"):
        AutoCKA.fingerprint(saved("bert"), TEXTS, shards_dir=shards, layers=[0], **OPTIONS)


def test_cli_resumes_into_its_output_folder(
    saved, tmp_path: Path, capsys, forwards: Counter
) -> None:
    out = tmp_path / "fp"
    fast = ["--batch-size", "6", "--no-progress", "--dtype", "float64"]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS))
    # the shards of an unfinished run: the folder is accepted and they are used
    AutoCKA.fingerprint(saved("bert"), str(texts), shards_dir=out / SHARDS_DIR, **OPTIONS)
    forwards.clear()
    assert cli.main(["fingerprint", saved("bert"), "--dataset", str(texts), "-o", str(out),
                     "--chunk-batches", "2", *fast]) == 0  # fmt: skip
    capsys.readouterr()
    assert forwards["calls"] == 0  # every batch came from the shards
    assert not (out / SHARDS_DIR).exists() and Fingerprint.load(out).n_samples == 45
