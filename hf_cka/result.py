"""CKA results with provenance: the result classes, their tables and plots.

A :class:`CKAResult` is one *run*: the ``(La, Lb)`` CKA matrix between the layers of model A and
model B, optional per-cell standard errors and permutation-null values, and free-form JSON
metadata (revisions, commit shas, data, estimator, versions, ``run_id``, ``created_at``). Runs
make up a :class:`~hf_cka.drift.DriftResult` (a base model against ``k`` checkpoints) and a
:class:`~hf_cka.grid.GridResult` (every pair of N models).

On disk a result is a folder with ``result.json`` (schema name and version, model names, layer
names, metadata, sha256 of the tensors) and ``tensors.safetensors`` (``matrix`` and, when
present, ``stderr`` and ``null``, all float64); a drift is ``drift.json`` and one such folder per
checkpoint (``01-<checkpoint>/``, ...). See :mod:`hf_cka.storage` for the atomic writes and
:mod:`hf_cka.hub` for the layout of a Hub dataset of runs. Both classes share one save, load,
push and pull path (:class:`Stored`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import torch
from typing_extensions import Unpack

from hf_cka import storage
from hf_cka.errors import ShapeMismatchError
from hf_cka.hub import HubRead, HubRun, HubRuns
from hf_cka.provenance import Provenance
from hf_cka.storage import (
    DEFAULT_LOCAL_ROOT,
    DRIFT_FILE,
    OPTIONAL_TENSORS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    new_run_id,
    validate_repo_id,
    validate_run_id,
)
from hf_cka.stored import (
    Stored,
    as_float64,
    figure_png,
    pick_run,
    run_record,
    scores_table,
    tensors_of,
)

if TYPE_CHECKING:
    import datasets
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["DRIFT_FILE", "DEFAULT_LOCAL_ROOT", "CKAResult", "new_run_id",
           "validate_repo_id", "validate_run_id"]  # fmt: skip


@dataclass(eq=False, repr=False)
class CKAResult(Stored):
    """One CKA run: the matrix between two models' layers, with provenance.

    Attributes:
        matrix: float64 ``(La, Lb)``; ``matrix[i, j]`` is the CKA of layer ``layers_a[i]`` of
            model A and layer ``layers_b[j]`` of model B. NaN marks an undefined cell.
        layers_a: Names of model A's layers (rows).
        layers_b: Names of model B's layers (columns).
        model_a: Model A (Hub id or local name).
        model_b: Model B.
        metadata: JSON-serialisable provenance. ``run_id`` (see :func:`new_run_id`) and
            ``created_at`` (UTC ISO 8601) are filled in when absent.
        stderr: float64 ``(La, Lb)`` standard error of each cell, or None.
        null: float64 ``(La, Lb)`` mean CKA under permutations of the examples, or None.

    Raises:
        ShapeMismatchError: the matrix is not 2-D, or a shape disagrees with the layer counts.
        InvalidInputError: ``metadata["run_id"]`` is not a valid run id.
    """

    matrix: torch.Tensor
    layers_a: list[str]
    layers_b: list[str]
    model_a: str
    model_b: str
    metadata: dict[str, Any] = field(default_factory=dict)
    stderr: torch.Tensor | None = None
    null: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.matrix = as_float64(self.matrix, "matrix")
        self.layers_a = [str(name) for name in self.layers_a]
        self.layers_b = [str(name) for name in self.layers_b]
        self.model_a, self.model_b = str(self.model_a), str(self.model_b)
        if self.matrix.ndim != 2:
            raise ShapeMismatchError(
                f"matrix must be 2-D (layers_a, layers_b); got shape {tuple(self.matrix.shape)}"
            )
        for name in ("matrix", *OPTIONAL_TENSORS):
            value = getattr(self, name)
            if value is None:
                continue
            value = as_float64(value, name)
            if tuple(value.shape) != self.shape:
                raise ShapeMismatchError(
                    f"{name} has shape {tuple(value.shape)}, expected {self.shape} ="
                    f" ({len(self.layers_a)} layers of {self.model_a},"
                    f" {len(self.layers_b)} layers of {self.model_b})"
                )
            setattr(self, name, value)
        self._stamp()

    def _described(self) -> dict[str, Any]:
        present = {name: True for name in OPTIONAL_TENSORS if getattr(self, name) is not None}
        return {"model_a": self.model_a, "model_b": self.model_b, "shape": self.shape, **present}

    @property
    def run_id(self) -> str:
        """The run id, ``metadata["run_id"]``."""
        return self.metadata["run_id"]

    @property
    def shape(self) -> tuple[int, int]:
        """``(len(layers_a), len(layers_b))``."""
        return len(self.layers_a), len(self.layers_b)

    @property
    def is_self_comparison(self) -> bool:
        """Whether both sides are the same model, revision, layers, tower and data column (a
        symmetric matrix)."""
        provenance = Provenance.from_dict(self.metadata)
        same_revision = provenance.model_a.same_weights(provenance.model_b)
        same_column = provenance.data.same_column()
        return (
            self.model_a == self.model_b
            and self.layers_a == self.layers_b
            and same_revision
            and same_column
        )

    # ----------------------------------------------------------------------- files

    _ID_KEY = "run_id"
    _KIND = "run"

    def _write(self, folder: Path) -> None:
        document = {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "layers_a": self.layers_a,
            "layers_b": self.layers_b,
            "metadata": self.metadata,
        }
        storage.write_result(folder, document, self._tensors())

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("matrix", *OPTIONAL_TENSORS)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @classmethod
    def _read(cls, folder: Path) -> CKAResult:
        doc, tensors = storage.read_result(folder)
        return cls(
            tensors["matrix"],
            doc["layers_a"],
            doc["layers_b"],
            doc["model_a"],
            doc["model_b"],
            doc["metadata"],
            tensors.get("stderr"),
            tensors.get("null"),
        )

    # ----------------------------------------------------------------------- tables and plots

    def to_pandas(self) -> pd.DataFrame:
        """Long table, one row per layer pair (row-major: all of ``layers_b`` per ``layer_a``).

        Columns: ``run_id, model_a, model_b, layer_a, layer_b, index_a, index_b, cka, stderr,
        null`` (``stderr``/``null`` are NaN when the result has none; the ``cka`` column holds
        the result's measure, ``metadata["measure"]``, which a non-CKA measure has no
        ``stderr`` for).
        """
        return self._scores_table().to_pandas()

    def to_dataset(self) -> datasets.Dataset:
        """The rows of :meth:`to_pandas` as a :class:`datasets.Dataset`."""
        import datasets

        return datasets.Dataset(self._scores_table())

    def _scores_table(self) -> pa.Table:
        return scores_table(self.run_id, self.model_a, self.model_b, self.layers_a,
                            self.layers_b, self._tensors())  # fmt: skip

    def plot(self, **kwargs: Any) -> tuple[Figure, Axes]:
        """Heatmap via :func:`hf_cka.plotting.plot_cka_heatmap`; ``kwargs`` override defaults.

        Defaults: layer and model names of this result, its ``stderr``, ``mask_upper`` when
        :attr:`is_self_comparison`, and a colour bar naming the measure
        (``metadata["measure"]``; a range from -1 for RSA, a correlation).
        """
        from hf_cka.measures import measure_label
        from hf_cka.plotting import plot_cka_heatmap

        options: dict[str, Any] = {
            "colorbar_label": measure_label(self.metadata),
            "vmin": -1.0 if self.metadata.get("measure") == "rsa" else 0.0,
            "layers1": self.layers_a,
            "layers2": self.layers_b,
            "model1_name": self.model_a,
            "model2_name": self.model_b,
            "mask_upper": self.is_self_comparison,
            "stderr": self.stderr,
        }
        options.update(kwargs)
        return plot_cka_heatmap(self.matrix, **options)

    # ----------------------------------------------------------------------- Hub

    def _runs(self) -> list[CKAResult]:
        return [self]

    def _hub_run(self) -> HubRun:
        return HubRun(self._run_record(), self._scores_table(), figure_png(self.plot()[0]))

    def _run_record(self) -> dict[str, Any]:
        """The row of this run in the ``runs`` table, plus its ``metadata``."""
        present = set(self._tensors())
        return run_record(self.run_id, self.model_a, self.model_b, self.layers_a, self.layers_b,
                          self.metadata, present)  # fmt: skip

    @classmethod
    def from_hub(
        cls, repo_id: str, run_id: str | None = None, **read: Unpack[HubRead]
    ) -> CKAResult:
        """Download the run ``run_id`` (None: the latest by ``created_at``) of the Hub dataset
        ``repo_id`` written by :meth:`push_to_hub`, at ``revision`` with ``token`` (see
        :class:`~hf_cka.hub.HubRead`); its matrix is bit-identical to the one pushed.

        Raises:
            HubReadError: no such repository or revision, no access, or the Hub is unreachable.
            ResultFormatError: the repository holds no run, not the named run (the message lists
                the available ones), or malformed files.
        """
        return cls._from_hub(repo_id, run_id, **read)

    @classmethod
    def _select(cls, runs: HubRuns, wanted: str | None) -> CKAResult:
        return cls._from_hub_run(runs, pick_run(runs, wanted))

    @classmethod
    def _from_hub_run(cls, runs: HubRuns, run_id: str) -> CKAResult:
        """Rebuild the run ``run_id`` from its validated ``runs`` record and ``scores`` table."""
        record = runs.record(run_id)
        grids = tensors_of(record, *runs.scores(run_id))
        return cls(grids["cka"], record["layers_a"], record["layers_b"], record["model_a"],
                   record["model_b"], record["metadata"], grids.get("stderr"),
                   grids.get("null"))  # fmt: skip
