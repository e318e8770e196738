"""Checkpoints of a running comparison: accumulator states + progress, never pickled.

A checkpoint folder holds, per process ``r``, ``rank{r}.safetensors`` (every accumulator's
summable float64 states) and ``rank{r}.json`` (how many of this process's CKA batches are done,
a fingerprint of the run settings and a sha256 digest of the samples of those batches). Resuming
with the same settings skips the finished batches -- after checking that they hold the same
samples -- and continues from the saved sums, so the result equals an uninterrupted run. Files
are written to a temporary name and renamed, so an interruption leaves the previous checkpoint
intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ResultFormatError
from .metric import Accumulator

SCHEMA = "hf_cka.checkpoint/1"


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
    data_digest: str = "",
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
        "data_digest": data_digest,
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
) -> tuple[int, str]:
    """Restore the accumulators from this process's checkpoint.

    Returns the number of batches done and the digest of their samples; a folder without a
    checkpoint for this rank resumes nothing (``(0, "")``).

    Raises:
        ResultFormatError: the checkpoint is malformed or belongs to a different run.
    """
    tensors_path, info_path = _paths(Path(folder), rank)
    if not info_path.exists():
        return 0, ""
    try:
        info = json.loads(info_path.read_text())
        tensors = load_file(str(tensors_path))
    except (OSError, ValueError, SafetensorError) as err:
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
    return int(info["batches_done"]), str(info.get("data_digest", ""))


def batch_digest(batch: Sequence[Any]) -> bytes:
    """sha256 of a batch's samples (texts, or the bytes of images and tensors)."""
    hasher = hashlib.sha256()
    for sample in batch:
        if isinstance(sample, str):
            data = sample.encode("utf-8")
        elif isinstance(sample, torch.Tensor):
            data = sample.detach().cpu().numpy().tobytes()
        elif callable(getattr(sample, "tobytes", None)):  # PIL images, numpy arrays
            data = sample.tobytes()
        else:
            data = repr(sample).encode("utf-8")
        hasher.update(len(data).to_bytes(8, "little") + data)
    return hasher.digest()


class RunCheckpoint:
    """Checkpoints of one process's accumulators during a run (inactive without a folder).

    Args:
        folder: where ``rank{r}.*`` files live; ``None`` turns checkpointing off.
        rank: this process's rank.
        accumulators: everything whose states must survive (metric and nulls).
        run_fingerprint: :func:`fingerprint` of the settings.
        every: save after every ``every`` batches of this process.
    """

    def __init__(
        self,
        folder: str | os.PathLike | None,
        rank: int,
        accumulators: Sequence[Accumulator],
        run_fingerprint: str,
        every: int,
    ) -> None:
        self.folder, self.rank, self.accumulators = folder, rank, accumulators
        self.fingerprint, self.every = run_fingerprint, every
        self.digests: list[bytes] = []  # one per batch of this process, in order
        self.resumed, self._expected = 0, ""

    def resume(self) -> int:
        """Load the saved sums (if any); returns how many batches to skip."""
        if self.folder is not None:
            self.resumed, self._expected = load_checkpoint(
                self.folder, self.rank, self.accumulators, self.fingerprint
            )
        return self.resumed

    def record(self, batch: Sequence[Any]) -> None:
        """Note the next batch of this process (skipped or not), in order."""
        if self.folder is not None:
            self.digests.append(batch_digest(batch))
            if len(self.digests) == self.resumed:
                self.verify()

    def verify(self) -> None:
        """Check that the skipped batches hold the samples the checkpoint was made from."""
        if self.resumed and self._digest(self.resumed) != self._expected:
            raise ResultFormatError(
                f"checkpoint '{self.folder}' was made from other data (its first {self.resumed} "
                "batches differ); resume with the same data, or use a new checkpoint folder"
            )

    def _digest(self, count: int) -> str:
        return hashlib.sha256(b"".join(self.digests[:count])).hexdigest()

    def step(self, done: int) -> None:
        """Save when ``done`` batches make a multiple of ``every``."""
        if done % self.every == 0:
            self.save(done)

    def save(self, done: int) -> None:
        """Save the sums of the first ``done`` batches of this process (no-op without folder)."""
        if self.folder is not None:
            digest = self._digest(done)
            accumulators = self.accumulators
            save_checkpoint(self.folder, self.rank, accumulators, done, self.fingerprint, digest)
