"""Worker launched by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node 2``.

Every process writes ``OUT/rank{RANK}.json`` with the world size the LAUNCHER gave it (the
``RANK``/``WORLD_SIZE`` environment variables), the topology ``hf_cka.distributed`` saw, and
its results, floats as ``float.hex`` strings so the test compares them bit for bit.

Usage::

    dist_worker.py compare SPEC.json OUT   # AutoCKA.compare
    dist_worker.py sync OUT                # MinibatchCKA.sync over the round-robin batches below

``SPEC.json`` holds ``model_a``, ``model_b``, ``dtype``, ``texts``, ``batch_size`` and
``null_permutations``.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from hf_cka import MinibatchCKA, distributed

# Batch sizes of the global batches of the ``sync`` check: 5 batches, so the shards are uneven
# (rank 0 takes 3, rank 1 takes 2), and the last batch is shorter than the others.
SYNC_BATCH_SIZES = (8, 8, 8, 8, 5)
SYNC_DIMS_A, SYNC_DIMS_B = (6, 7, 5), (4, 9)


def sync_features(index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Deterministic float64 features of global batch ``index`` (side B correlated with A)."""
    generator = torch.Generator().manual_seed(1000 + index)
    n = SYNC_BATCH_SIZES[index]
    base = torch.randn(n, 3, generator=generator, dtype=torch.float64)

    def layer(dim: int) -> torch.Tensor:
        mix = torch.randn(3, dim, generator=generator, dtype=torch.float64)
        return base @ mix + 0.5 * torch.randn(n, dim, generator=generator, dtype=torch.float64)

    return [layer(d) for d in SYNC_DIMS_A], [layer(d) for d in SYNC_DIMS_B]


def hexes(values: torch.Tensor) -> list[str]:
    """``values`` flattened to ``float.hex`` strings (exact, NaN-safe)."""
    return [float(v).hex() for v in values.reshape(-1).tolist()]


def _compare(spec_path: str) -> dict[str, Any]:
    from hf_cka.auto import AutoCKA

    spec = json.loads(Path(spec_path).read_text())
    local_batches: list[int] = []
    models = AutoCKA.from_pretrained(spec["model_a"], spec["model_b"], dtype=spec["dtype"])
    result = models.compare(
        spec["texts"],
        batch_size=spec["batch_size"],
        progress=False,
        null_permutations=spec["null_permutations"],
        callback=lambda index, total, matrix: local_batches.append(total),
    )
    return {
        "matrix": hexes(result.matrix),
        "stderr": None if result.stderr is None else hexes(result.stderr),
        "null": None if result.null is None else hexes(result.null),
        "shape": list(result.matrix.shape),
        "n_samples": result.metadata["n_samples"],
        "n_batches": result.metadata["n_batches"],
        "num_processes": result.metadata["num_processes"],
        "local_batches": len(local_batches),
        "expected_local_batches": local_batches[0] if local_batches else None,
    }


def _sync() -> dict[str, Any]:
    metric = MinibatchCKA(len(SYNC_DIMS_A), len(SYNC_DIMS_B))
    mine = [i for i in range(len(SYNC_BATCH_SIZES)) if distributed.shard(i)]
    for index in mine:
        metric.update(*sync_features(index))
    local = metric.state_dict()
    metric.sync(distributed.all_reduce_sum)
    return {
        "batches": mine,
        "local_states": {key: hexes(value) for key, value in local.items()},
        "synced_states": {key: hexes(value) for key, value in metric.states.items()},
        "matrix": hexes(metric.compute()),
    }


def _record_teardown(out: Path, rank: int) -> None:
    """At exit, record whether hf_cka destroyed the process group it created.

    Registered before hf_cka creates the group, so it runs after hf_cka's own exit handler
    (atexit is last-in, first-out). A gloo group left to interpreter teardown aborts the process
    about one run in twenty; this makes that cause visible in every run.
    """
    state = "destroyed" if not torch.distributed.is_initialized() else "alive"
    (out / f"rank{rank}.exit").write_text(state)


def main(argv: list[str]) -> None:
    mode, *args = argv
    out = Path(args[-1])
    atexit.register(_record_teardown, out, int(os.environ["RANK"]))
    payload = _compare(args[0]) if mode == "compare" else _sync()
    rank = int(os.environ["RANK"])
    payload.update(
        launcher_rank=rank,
        launcher_world_size=int(os.environ["WORLD_SIZE"]),
        hf_cka_rank=distributed.process_index(),
        hf_cka_world_size=distributed.num_processes(),
        is_main_process=distributed.is_main_process(),
    )
    (out / f"rank{rank}.json").write_text(json.dumps(payload))
    distributed.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
