"""Shards of an extraction: what each process wrote, so that a multi-process extraction assembles
one fingerprint and a killed one resumes where it stopped.

A shard holds the CKA batches one process finished in one window (see
:func:`hf_cka.extract.extract`): ``<stem>.safetensors`` with, per global batch ``b``,
``distances.<b>`` (the ``(L, n_b (n_b - 1) / 2)`` float64 triangle) and, when features are
kept, ``features.<b>.<layer index>``; and ``<stem>.json``, its manifest: the batch indices,
sizes and sample digests, the run key (model, layers and settings) and the sha256 of the
tensors file. The manifest is written last, by rename, so a shard without one is incomplete
and ignored (its batches are computed again); a manifest whose tensors file does not have the
recorded sha256 raises :class:`~hf_cka.errors.ShardDamagedError` naming the shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import FingerprintMismatchError, ShardDamagedError

SHARDS_DIR = "shards"
MANIFEST_SCHEMA = "hf_cka.FingerprintShard"


@dataclass
class BatchStore:
    """What the fingerprint keeps of one CKA batch: its sample digest, the squared-distance
    triangle of every layer and, optionally, each layer's pooled features (on the CPU)."""

    digest: str
    distances: torch.Tensor
    features: list[torch.Tensor] | None = None


def run_key(settings: Mapping[str, Any]) -> str:
    """sha256 of ``settings`` (model, layers, pooling ...): shards of other runs are refused."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class ShardFolder:
    """The shards of one extraction in ``folder`` (created on the first write)."""

    def __init__(self, folder: str | Path, key: str) -> None:
        self.folder, self.key = Path(folder), key

    def write(self, rank: int, batches: Mapping[int, BatchStore]) -> Path:
        """Write one shard of ``batches`` (by global index); returns its manifest's path."""
        first = min(batches)
        stem = f"shard-{first:06d}-r{rank}"
        tensors: dict[str, torch.Tensor] = {}
        for index, batch in batches.items():
            tensors[f"distances.{index}"] = batch.distances.contiguous()
            for layer, rows in enumerate(batch.features or []):
                tensors[f"features.{index}.{layer}"] = rows.contiguous()
        blob = save(tensors)
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "run_key": self.key,
            "batches": sorted(batches),
            "digests": [batches[i].digest for i in sorted(batches)],
            "features": any(b.features is not None for b in batches.values()),
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.folder / f"{stem}.safetensors", blob)
        path = self.folder / f"{stem}.json"
        _atomic_write(path, json.dumps(manifest).encode("utf-8"))  # the manifest commits, last
        return path

    def read(self) -> dict[int, BatchStore]:
        """Every batch of the complete shards, by global index.

        Raises:
            ShardDamagedError: a manifest is malformed, or its tensors file is missing or does
                not have the recorded sha256 (the message names the shard).
            FingerprintMismatchError: a shard belongs to another extraction (other model,
                layers or settings).
        """
        out: dict[int, BatchStore] = {}
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.glob("shard-*.json")):
            out.update(self._read_one(path))
        return out

    def _read_one(self, path: Path) -> dict[int, BatchStore]:
        tensors_path = path.with_suffix(".safetensors")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            blob = tensors_path.read_bytes()
            if manifest.get("schema") != MANIFEST_SCHEMA:
                raise ValueError(f"schema {manifest.get('schema')!r}")
        except (OSError, ValueError, AttributeError) as err:
            raise ShardDamagedError(
                f"shard {path} is unreadable or malformed ({err}); delete {path} and "
                f"{tensors_path.name} and rerun to extract its batches again"
            ) from err
        if manifest.get("run_key") != self.key:
            raise FingerprintMismatchError(
                f"shard {path} belongs to another extraction (other model, layers or "
                "settings); use another output folder or delete its shards"
            )
        if hashlib.sha256(blob).hexdigest() != manifest.get("tensors_sha256"):
            raise ShardDamagedError(
                f"shard {tensors_path} does not have the sha256 recorded in {path.name} "
                f"(damaged or replaced); delete both files and rerun to extract its batches "
                "again"
            )
        try:
            tensors = load(blob)
            out = {}
            for index, digest in zip(manifest["batches"], manifest["digests"], strict=True):
                features = None
                if manifest["features"]:
                    count = sum(1 for name in tensors if name.startswith(f"features.{index}."))
                    features = [tensors[f"features.{index}.{j}"] for j in range(count)]
                out[int(index)] = BatchStore(str(digest), tensors[f"distances.{index}"], features)
        except (SafetensorError, KeyError, TypeError, ValueError) as err:
            raise ShardDamagedError(f"shard {path}: malformed ({err!r})") from err
        return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
