"""Fine-tuning drift: a base model compared with ``k`` checkpoints, layer by layer.

A :class:`DriftResult` holds one :class:`~hf_cka.result.CKAResult` per checkpoint (base as
model A); :attr:`DriftResult.similarity` is the same-layer CKA, the diagonal of each matrix. On
disk it is ``drift.json`` and one result folder per checkpoint (``01-<checkpoint>/``, ...); on
the Hub its runs record their membership, so it is reassembled from them (:class:`Stored`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from typing_extensions import Unpack

from hf_cka import storage
from hf_cka.errors import InvalidInputError, ResultFormatError, ShapeMismatchError
from hf_cka.hub import HubRead, HubRuns
from hf_cka.result import CKAResult
from hf_cka.storage import DRIFT_FILE, DRIFT_SCHEMA_NAME, SCHEMA_VERSION, json_text
from hf_cka.stored import DRIFT_KEY, Stored, complete_drift_info, drift_run_ids

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(eq=False, repr=False)
class DriftResult(Stored):
    """A base model compared with ``k`` checkpoints, layer by layer.

    Attributes:
        base: The base model.
        checkpoints: Names of the checkpoints (model ids or ``repo@revision``), in order.
        results: One :class:`CKAResult` per checkpoint (base as model A, checkpoint as B).
        metadata: JSON-serialisable provenance; ``drift_id`` and ``created_at`` are filled in.

    Each result records its membership in ``result.metadata["drift"]`` (base, checkpoints, its
    index and this drift's metadata), so that :meth:`from_hub` can reassemble the drift from
    the runs of a Hub dataset. All results must share one layer list on both sides (checkpoints
    of one architecture), so that the same-layer CKA (the diagonal of each matrix) is defined.

    Raises:
        ShapeMismatchError: the number of results differs from the number of checkpoints, or
            a result's layers differ from the first result's.
        InvalidInputError: no checkpoint, or two results share a run id.
    """

    base: str
    checkpoints: list[str]
    results: list[CKAResult]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = str(self.base)
        self.checkpoints = [str(name) for name in self.checkpoints]
        self.results = list(self.results)
        if not self.results:
            raise InvalidInputError("a DriftResult needs at least one checkpoint result")
        if len(self.results) != len(self.checkpoints):
            raise ShapeMismatchError(
                f"{len(self.results)} results for {len(self.checkpoints)} checkpoints;"
                " expected one result per checkpoint"
            )
        layers = self.results[0].layers_a
        for checkpoint, result in zip(self.checkpoints, self.results, strict=True):
            if result.layers_a != layers or result.layers_b != layers:
                raise ShapeMismatchError(
                    f"the result for checkpoint {checkpoint!r} compares layers"
                    f" {len(result.layers_a)} x {len(result.layers_b)} that differ from the"
                    f" {len(layers)} layers of the first result; drift needs the same layer list"
                    " on both sides of every result"
                )
        run_ids = [result.run_id for result in self.results]
        if len(set(run_ids)) != len(run_ids):
            raise InvalidInputError(f"run ids of a drift must be unique; got {run_ids}")
        self._stamp()
        for index, result in enumerate(self.results):
            result.metadata[DRIFT_KEY] = {
                "base": self.base,
                "checkpoints": self.checkpoints,
                "index": index,
                "metadata": self.metadata,
            }

    def _described(self) -> dict[str, Any]:
        return {"base": self.base, "checkpoints": self.checkpoints, "layers": len(self.layers)}

    @property
    def drift_id(self) -> str:
        """The id of this drift analysis, ``metadata["drift_id"]``."""
        return self.metadata["drift_id"]

    @property
    def layers(self) -> list[str]:
        """The shared layer names."""
        return self.results[0].layers_a

    @property
    def similarity(self) -> torch.Tensor:
        """float64 ``(num_layers, k)``: ``similarity[l, c]`` = CKA of layer ``l`` of the base and
        layer ``l`` of checkpoint ``c`` (the diagonal of each result's matrix)."""
        return torch.stack([result.matrix.diagonal() for result in self.results], dim=1)

    @property
    def stderr(self) -> torch.Tensor | None:
        """Standard errors of :attr:`similarity`, or None unless every result has them."""
        stderrs = [result.stderr for result in self.results]
        if any(stderr is None for stderr in stderrs):
            return None
        return torch.stack([stderr.diagonal() for stderr in stderrs if stderr is not None], dim=1)

    def to_pandas(self) -> pd.DataFrame:
        """Long table of :attr:`similarity`, one row per (checkpoint, layer).

        Columns: ``drift_id, base, checkpoint, checkpoint_index, run_id, layer, index, cka,
        stderr`` (NaN when absent).
        """
        k, n = len(self.checkpoints), len(self.layers)
        stderr = self.stderr
        return pd.DataFrame(
            {
                "drift_id": self.drift_id,
                "base": self.base,
                "checkpoint": np.repeat(self.checkpoints, n),
                "checkpoint_index": np.repeat(np.arange(k), n),
                "run_id": np.repeat([result.run_id for result in self.results], n),
                "layer": self.layers * k,
                "index": np.tile(np.arange(n), k),
                "cka": self.similarity.T.reshape(-1).numpy(),
                "stderr": math.nan if stderr is None else stderr.T.reshape(-1).numpy(),
            }
        )

    def plot(self, **kwargs: Any) -> tuple[Figure, Any]:
        """Drift plot via :func:`hf_cka.plotting.plot_drift`, labelled with the measure
        (``metadata["measure"]``); ``kwargs`` override defaults."""
        from hf_cka.measures import measure_label
        from hf_cka.plotting import plot_drift

        options: dict[str, Any] = {
            "base_name": self.base,
            "stderr": self.stderr,
            "measure_label": measure_label(self.results[0].metadata),
        }
        options.update(kwargs)
        return plot_drift(self.similarity, self.layers, self.checkpoints, **options)

    # ----------------------------------------------------------------------- files and Hub

    _ID_KEY = "drift_id"
    _KIND = "drift"

    def _write(self, folder: Path) -> None:
        """``drift.json`` and one result folder per checkpoint, named by the checkpoint."""
        folders = storage.checkpoint_folders(self.checkpoints)
        document = {
            "schema": DRIFT_SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "base": self.base,
            "checkpoints": self.checkpoints,
            "runs": [result.run_id for result in self.results],
            "folders": folders,
            "metadata": self.metadata,
        }
        text = json_text(document, "metadata")
        for name, result in zip(folders, self.results, strict=True):
            result._write(folder / name)
        (folder / DRIFT_FILE).write_text(text, encoding="utf-8")

    @classmethod
    def _read(cls, folder: Path) -> DriftResult:
        doc, members = storage.read_drift(folder)
        results = [CKAResult.load(folder / name) for name, _ in members]
        for (name, run_id), result in zip(members, results, strict=True):
            if result.run_id != run_id:
                raise ResultFormatError(
                    f"{folder / name}: holds run {result.run_id!r}, expected {run_id!r}"
                )
        try:
            return cls(doc["base"], doc["checkpoints"], results, doc["metadata"])
        except (ShapeMismatchError, InvalidInputError) as err:
            raise ResultFormatError(f"{folder / DRIFT_FILE}: {err}") from err

    def _runs(self) -> list[CKAResult]:
        return self.results

    @classmethod
    def from_hub(
        cls, repo_id: str, drift_id: str | None = None, **read: Unpack[HubRead]
    ) -> DriftResult:
        """Reassemble the drift ``drift_id`` (None: the latest by its ``created_at``) pushed to
        the Hub dataset ``repo_id`` with :meth:`push_to_hub`, from its runs; ``revision`` and
        ``token`` as :class:`~hf_cka.hub.HubRead` says.

        Raises:
            HubReadError: no such repository or revision, no access, or the Hub is unreachable.
            ResultFormatError: the repository holds no drift, not the named one (the message
                lists the available ones), an incomplete one, or malformed files.
        """
        return cls._from_hub(repo_id, drift_id, **read)

    @classmethod
    def _select(cls, runs: HubRuns, wanted: str | None) -> DriftResult:
        wanted, run_ids = drift_run_ids(runs, wanted)
        results = [CKAResult._from_hub_run(runs, run_id) for run_id in run_ids]
        info = complete_drift_info(runs.source, wanted, [r.metadata for r in results])
        try:
            return cls(info["base"], info["checkpoints"], results, info["metadata"])
        except (ShapeMismatchError, InvalidInputError) as err:
            raise ResultFormatError(f"{runs.source}: drift {wanted!r}: {err}") from err
