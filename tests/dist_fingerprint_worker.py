"""Worker launched by ``tests/test_shards.py`` under ``torchrun --nproc_per_node 2``.

Every process extracts the fingerprint of ``SPEC.json``'s model twice: with a shards folder
(each process writes its shards there; all read them back) and without one (the batches are
exchanged in memory), then the grid of it and ``SPEC.json``'s ``model_b`` with
``measure="procrustes"`` (a full-data measure: the features are extracted over both processes
and gathered). It writes ``OUT/rank{RANK}.json`` with the world size the launcher gave
and the one ``hf_cka`` saw, the shard files present after the extraction, both stores'
distances and the grid pair's matrix as ``float.hex`` strings (exact). The main process saves
the first store to ``OUT`` (which removes ``OUT/shards``).

Usage::

    dist_fingerprint_worker.py SPEC.json OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hf_cka import distributed
from hf_cka.auto import AutoCKA


def main(spec_path: str, out: Path) -> None:
    spec = json.loads(Path(spec_path).read_text())
    options = {"batch_size": spec["batch_size"], "chunk_batches": 2, "progress": False}
    shards = out / "shards"
    with_shards = AutoCKA.fingerprint(
        spec["model"], spec["texts"], dtype="float64", shards_dir=shards, **options
    )
    shard_files = sorted(path.name for path in shards.glob("shard-*.json"))
    distributed.wait_for_everyone()
    if distributed.is_main_process():  # one process saves (and removes the shards)
        with_shards.save(out)
    in_memory = AutoCKA.fingerprint(spec["model"], spec["texts"], dtype="float64", **options)
    models = [spec["model"], spec["model_b"]]  # a full-data measure, one model at a time
    grid = AutoCKA.grid(models, spec["texts"], dtype="float64", measure="procrustes", **options)
    rank = int(os.environ["RANK"])
    payload = {
        "launcher_rank": rank,
        "launcher_world_size": int(os.environ["WORLD_SIZE"]),
        "hf_cka_rank": distributed.process_index(),
        "hf_cka_world_size": distributed.num_processes(),
        "shard_files": shard_files,
        "with_shards": [float(v).hex() for v in with_shards.distances.reshape(-1).tolist()],
        "in_memory": [float(v).hex() for v in in_memory.distances.reshape(-1).tolist()],
        "grid_procrustes": [float(v).hex() for v in grid.pair(0, 1).matrix.reshape(-1).tolist()],
        "batch_digests": with_shards.batch_digests,
        "samples_digest": with_shards.samples_digest,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(payload))
    distributed.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
