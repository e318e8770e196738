"""Checkpoints of a running comparison: accumulator states + progress, never pickled.

A checkpoint folder holds, per process ``r``, ``rank{r}.safetensors`` (every accumulator's
summable float64 states) and ``rank{r}.json`` (how many of this process's CKA batches are done
and a fingerprint of the run). Resuming with the same fingerprint skips the finished batches and
continues from the saved sums, so the result equals an uninterrupted run. Files are written to a
temporary name and renamed, so an interruption leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from .errors import ResultFormatError

SCHEMA = "hf_cka.checkpoint/1"


class Accumulator(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None: ...


def fingerprint(config: Mapping[str, Any]) -> str:
    """Stable hash of the run settings that must match for a resume to be valid."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _paths(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rank{rank}.safetensors", folder / f"rank{rank}.json"


def save_checkpoint(
    folder: str | os.PathLike,
    rank: int,
    accumulators: Sequence[Accumulator],
    batches_done: int,
    run_fingerprint: str,
) -> None:
    """Write this process's checkpoint atomically (tensors first, then the JSON that commits)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors_path, info_path = _paths(folder, rank)
    tensors = {
        f"{index}.{key}": value.contiguous()
        for index, accumulator in enumerate(accumulators)
        for key, value in accumulator.state_dict().items()
    }
    tmp = tensors_path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, tensors_path)
    info = {
        "schema": SCHEMA,
        "batches_done": batches_done,
        "fingerprint": run_fingerprint,
        "accumulators": len(accumulators),
    }
    tmp = info_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, info_path)


def load_checkpoint(
    folder: str | os.PathLike,
    rank: int,
    accumulators: Sequence[Accumulator],
    run_fingerprint: str,
) -> int:
    """Restore the accumulators from this process's checkpoint; returns the batches done.

    A folder without a checkpoint for this rank resumes nothing (returns 0).

    Raises:
        ResultFormatError: the checkpoint is malformed or belongs to a different run.
    """
    tensors_path, info_path = _paths(Path(folder), rank)
    if not info_path.exists():
        return 0
    try:
        info = json.loads(info_path.read_text())
        tensors = load_file(str(tensors_path))
    except (OSError, ValueError) as err:
        raise ResultFormatError(f"checkpoint '{info_path}' is unreadable ({err})") from err
    if info.get("schema") != SCHEMA or info.get("accumulators") != len(accumulators):
        raise ResultFormatError(
            f"checkpoint '{info_path}' has schema {info.get('schema')!r} for "
            f"{info.get('accumulators')} accumulator(s); expected {SCHEMA!r} for "
            f"{len(accumulators)}: delete the folder to start over"
        )
    if info.get("fingerprint") != run_fingerprint:
        raise ResultFormatError(
            f"checkpoint '{folder}' was written by a run with other models, layers, data or "
            "settings; resume with the same arguments, or use a new checkpoint folder"
        )
    for index, accumulator in enumerate(accumulators):
        prefix = f"{index}."
        accumulator.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    return int(info["batches_done"])
