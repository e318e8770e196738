"""Checkpoints of a running comparison: accumulator states + progress, never pickled.

A checkpoint folder holds, per process ``r``, one file ``rank{r}.safetensors``: every
accumulator's summable float64 states, and in its header a manifest (how many of this process's
CKA batches are done, each accumulator's batch count, a fingerprint of the run settings and of
the models' weights, a sha256 digest of the samples of those batches and one of the states). The
file is written under a temporary name and renamed: a checkpoint is one atomic commit, so an
interruption leaves the previous one intact. Resuming with the same settings checks the
manifest against the states it carries, skips the finished batches -- after checking that they
hold the same samples -- and continues from the saved sums, so the result equals an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import InvalidInputError, ResultFormatError
from .metric import Accumulator

SCHEMA = "hf_cka.checkpoint/2"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_START_OVER = "delete the folder to start over"
_weights_digests: dict[tuple[Any, ...], str] = {}


def fingerprint(config: Mapping[str, Any]) -> str:
    """Stable hash of the run settings that must match for a resume to be valid."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_digest(folder: str | os.PathLike) -> str:
    """sha256 over the names and bytes of a local folder's weight files (``*.safetensors``,
    ``*.bin``), streamed; cached per process by each file's (path, size, mtime)."""
    files = sorted(
        p for p in Path(folder).rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()
    )
    key = tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    if key not in _weights_digests:
        hasher = hashlib.sha256()
        for path in files:
            hasher.update(str(path.relative_to(folder)).encode() + b"\0")
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    hasher.update(chunk)
        _weights_digests[key] = hasher.hexdigest()
    return _weights_digests[key]


class _Model(Protocol):
    name: str
    commit_sha: str | None

    @property
    def dtype(self) -> str: ...


def model_identity(model: _Model) -> list[str]:
    """What a resume must find unchanged about a loaded model: its weights (the commit sha of a
    Hub model, the :func:`weights_digest` of a local folder) and the dtype it runs in."""
    name = model.name
    weights = model.commit_sha or (weights_digest(name) if Path(name).is_dir() else name)
    return [weights, model.dtype]


def _path(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.safetensors"


def _states_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for key in sorted(tensors):
        data = tensors[key].contiguous().numpy().tobytes()
        hasher.update(f"{key}:{tensors[key].dtype}:{tuple(tensors[key].shape)}:".encode() + data)
    return hasher.hexdigest()


def _batch_counts(tensors: Mapping[str, torch.Tensor], count: int) -> list[int]:
    """Each accumulator's own ``n_batches`` state (-1 where it keeps none)."""
    key = "{}.n_batches"
    return [int(tensors[key.format(i)]) if key.format(i) in tensors else -1 for i in range(count)]


def _folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(
            f"checkpoint_dir {str(path)!r} is an existing file; pass a folder (new or one"
            " written by an earlier run)"
        )
    return path


def save_checkpoint(
    folder: str | os.PathLike,
    rank: int,
    accumulators: Sequence[Accumulator],
    batches_done: int,
    run_fingerprint: str,
    data_digest: str = "",
) -> None:
    """Write this process's checkpoint as one file, renamed into place (one atomic commit)."""
    path = _path(_folder(folder), rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{index}.{key}": value.contiguous()
        for index, accumulator in enumerate(accumulators)
        for key, value in accumulator.state_dict().items()
    }
    manifest = {
        "schema": SCHEMA,
        "batches_done": batches_done,
        "fingerprint": run_fingerprint,
        "data_digest": data_digest,
        "accumulators": len(accumulators),
        "n_batches": _batch_counts(tensors, len(accumulators)),
        "states_sha256": _states_digest(tensors),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(save(tensors, metadata={"manifest": json.dumps(manifest)}))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the states of a checkpoint file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            manifest = json.loads((handle.metadata() or {}).get("manifest", "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (OSError, ValueError, SafetensorError) as err:
        raise ResultFormatError(
            f"checkpoint '{path}' is unreadable ({err}); {_START_OVER}"
        ) from err
    if not isinstance(manifest, dict):
        raise ResultFormatError(f"checkpoint '{path}' has no manifest; {_START_OVER}")
    return manifest, tensors


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
        InvalidInputError: ``folder`` is a file.
        ResultFormatError: the checkpoint is malformed, disagrees with its own states (counts
            or digest), or belongs to a different run, models, weights or dtype.
    """
    directory = _folder(folder)
    path = _path(directory, rank)
    if not path.exists():
        if (directory / f"rank{rank}.json").exists():
            raise ResultFormatError(
                f"checkpoint '{directory}' was written by an older hf_cka; {_START_OVER}"
            )
        return 0, ""
    info, tensors = _read(path)
    if info.get("schema") != SCHEMA or info.get("accumulators") != len(accumulators):
        raise ResultFormatError(
            f"checkpoint '{path}' has schema {info.get('schema')!r} for "
            f"{info.get('accumulators')} accumulator(s); expected {SCHEMA!r} for "
            f"{len(accumulators)}: {_START_OVER}"
        )
    if info.get("fingerprint") != run_fingerprint:
        raise ResultFormatError(
            f"checkpoint '{directory}' was written by a run with other models, weights, dtype,"
            " layers, data or settings; resume with the same arguments, or use a new"
            " checkpoint folder"
        )
    done = info.get("batches_done")
    if (
        not isinstance(done, int)
        or info.get("n_batches") != _batch_counts(tensors, len(accumulators))
        or info.get("states_sha256") != _states_digest(tensors)
    ):
        raise ResultFormatError(
            f"checkpoint '{path}': its manifest disagrees with the states it holds (batch"
            f" counts or sha256); {_START_OVER}"
        )
    for index, accumulator in enumerate(accumulators):
        prefix = f"{index}."
        accumulator.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    return done, str(info.get("data_digest", ""))


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
