"""N-model grids: every model extracted ONCE (one in memory at a time), every pair combined.

:func:`run_grid` costs N models' forward passes in total; a :class:`GridResult` holds the
``CKAResult`` of every pair ``i <= j`` (``pair(j, i)`` is the transpose of ``pair(i, j)``) and an
N x N model-level summary (see ``docs/statistics.md``):

    S[i, j] = mean over the layers l of model i of  max over the layers m of model j  CKA(l, m),

the average best-match similarity of model i's layers in model j (asymmetric; ``S[i, i] = 1``).
The clustered plot uses the symmetric distance ``1 - (S + S^T) / 2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import Unpack

from . import storage
from .combine import combine, reference_data
from .errors import InvalidInputError, ResultFormatError, ShapeMismatchError
from .extract import ExtractOptions, ModelSource, fingerprint_model
from .fingerprint import Fingerprint
from .hub import HubRead, HubRuns
from .model_files import names_fingerprint
from .options import RunOptions
from .result import CKAResult
from .storage import GRID_FILE, GRID_PLOT_FILE, SCHEMA_VERSION
from .stored import Stored, figure_png
from .tokens import HubToken

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GRID_SCHEMA_NAME = "hf_cka.GridResult"
GRID_KEY = "grid"  # metadata key recording a result's membership of a GridResult


def _swap_sides(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` with every ``*_a`` key exchanged with its ``*_b`` twin (and ``dtype`` "x/y")."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if key.endswith("_a"):
            out[key[:-2] + "_b"] = value
        elif key.endswith("_b"):
            out[key[:-2] + "_a"] = value
        elif key == "dtype" and isinstance(value, str) and "/" in value:
            out[key] = "/".join(reversed(value.split("/")))
        elif key not in ("run_id", GRID_KEY):
            out[key] = value
    return out


def model_summary(matrix: torch.Tensor) -> float:
    """Mean over the rows of the row-wise maximum of a CKA matrix (NaN cells ignored)."""
    finite = torch.nan_to_num(matrix, nan=-torch.inf)
    best = finite.max(dim=1).values
    best = best[torch.isfinite(best)]
    return float(best.mean()) if best.numel() else float("nan")


@dataclass(eq=False, repr=False)
class GridResult(Stored):
    """CKA between every pair of N models.

    Attributes:
        models: the N model names (as given: Hub ids, folders, ``repo@revision``).
        results: ``{(i, j): CKAResult}`` for every ``i <= j`` (model i as A, model j as B).
        metadata: JSON-serialisable provenance; ``grid_id`` and ``created_at`` are filled in.
    """

    models: list[str]
    results: dict[tuple[int, int], CKAResult]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.models = [str(model) for model in self.models]
        n = len(self.models)
        expected = {(i, j) for i in range(n) for j in range(i, n)}
        if n < 2 or set(self.results) != expected:
            raise ShapeMismatchError(
                f"a GridResult of {n} models needs the results of every pair i <= j "
                f"({len(expected)}), got {sorted(self.results)}"
            )
        self._stamp()
        for (i, j), result in self.results.items():
            result.metadata[GRID_KEY] = {
                "models": self.models,
                "i": i,
                "j": j,
                "metadata": self.metadata,
            }

    def _described(self) -> dict[str, Any]:
        return {"models": self.models}

    @property
    def grid_id(self) -> str:
        return self.metadata["grid_id"]

    def pair(self, i: int, j: int) -> CKAResult:
        """The ``CKAResult`` of model ``i`` (rows) against model ``j`` (columns), with stderr."""
        n = len(self.models)
        if not (-n <= i < n and -n <= j < n):
            raise InvalidInputError(f"expected model indices in [-{n}, {n}), got ({i}, {j})")
        i, j = i % n, j % n
        if i <= j:
            return self.results[i, j]
        result = self.results[j, i]
        return CKAResult(
            matrix=result.matrix.T,
            layers_a=result.layers_b,
            layers_b=result.layers_a,
            model_a=result.model_b,
            model_b=result.model_a,
            metadata={**_swap_sides(result.metadata), "run_id": f"{result.run_id}T"},
            stderr=None if result.stderr is None else result.stderr.T,
            null=None if result.null is None else result.null.T,
        )

    @property
    def summary(self) -> torch.Tensor:
        """float64 ``(N, N)``: ``summary[i, j]`` = mean over model i's layers of their best CKA
        with any layer of model j (asymmetric; see the module docstring)."""
        n = len(self.models)
        return torch.tensor(
            [[model_summary(self.pair(i, j).matrix) for j in range(n)] for i in range(n)],
            dtype=torch.float64,
        )

    @property
    def measure_label(self) -> str:
        """How plots name the grid's measure (``"CKA"``, ``"mutual k-NN"`` ...)."""
        from .measures import measure_label

        return measure_label(self.metadata)

    def order(self) -> list[int]:
        """The models in the leaf order of average-linkage clustering of ``1 - sym(summary)``."""
        from scipy.cluster.hierarchy import leaves_list

        return [int(i) for i in leaves_list(self._linkage())]

    def _linkage(self) -> Any:
        from scipy.cluster.hierarchy import linkage
        from scipy.spatial.distance import squareform

        summary = self.summary.nan_to_num(nan=0.0)
        distance = (1.0 - (summary + summary.T) / 2).clamp_min(0.0)
        distance.fill_diagonal_(0.0)
        return linkage(squareform(distance.numpy(), checks=False), method="average")

    def plot(self, *, cmap: str = "magma", annot: bool = True) -> tuple[Figure, Any]:
        """Clustered N x N heatmap of :attr:`summary` with its dendrogram on top.

        Returns ``(figure, (dendrogram_axes, heatmap_axes))``; the figure is not shown.
        """
        import matplotlib.pyplot as plt
        from scipy.cluster.hierarchy import dendrogram

        n = len(self.models)
        size = max(4.0, 0.7 * n + 2.5)
        fig = plt.figure(figsize=(size + 1.0, size + 1.5))
        grid = fig.add_gridspec(2, 2, height_ratios=[1, 4], width_ratios=[20, 1], hspace=0.02)
        top, ax, bar = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), None
        tree = dendrogram(self._linkage(), ax=top, no_labels=True, color_threshold=0)
        top.set_axis_off()
        order = [int(i) for i in tree["leaves"]]
        matrix = self.summary[order][:, order].numpy()
        measure = self.measure_label
        vmin = -1.0 if self.metadata.get("measure") == "rsa" else 0.0  # RSA is a correlation
        image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=1.0, aspect="auto")
        labels = [self.models[i] for i in order]
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("model j (best match of each layer of i)")
        ax.set_ylabel("model i")
        if annot:
            for r in range(n):
                for c in range(n):
                    value = matrix[r, c]
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if value > 0.6 else "white")  # fmt: skip
        bar = fig.add_subplot(grid[1, 1])
        fig.colorbar(image, cax=bar, label=f"mean best-layer {measure}")
        top.set_title(f"models clustered by mean best-layer {measure}")
        return fig, (top, ax)

    # ----------------------------------------------------------------------- files and Hub

    _ID_KEY = "grid_id"
    _KIND = "grid"

    def _write(self, folder: Path) -> None:
        """``grid.json``, ``grid.png`` and one result folder per pair, named by its run id."""
        pairs = sorted(self.results.items())
        document = storage.json_text(
            {
                "schema": GRID_SCHEMA_NAME,
                "schema_version": SCHEMA_VERSION,
                "models": self.models,
                "pairs": [[i, j, result.run_id] for (i, j), result in pairs],
                "folders": [result.run_id for _, result in pairs],
                "metadata": self.metadata,
            },
            "metadata",
        )
        for _, result in pairs:
            result._write(folder / result.run_id)
        (folder / GRID_PLOT_FILE).write_bytes(figure_png(self.plot()[0], bbox_inches="tight"))
        (folder / GRID_FILE).write_text(document, encoding="utf-8")

    @classmethod
    def _read(cls, folder: Path) -> GridResult:
        path = folder / GRID_FILE
        doc = storage.read_json(path, GRID_SCHEMA_NAME)
        pairs = doc.get("pairs")
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 3 and all(isinstance(v, int) for v in p[:2])
            for p in pairs
        ):
            raise ResultFormatError(f"{path}: 'pairs' must be a list of [i, j, run_id]")
        results = {}
        for i, j, run_id in pairs:
            result = CKAResult.load(folder / storage.checked_run_id(run_id, path))
            if result.run_id != run_id:
                raise ResultFormatError(f"{folder / run_id}: holds run {result.run_id!r}")
            results[i, j] = result
        try:
            models = storage.field(doc, "models", list, path)
            return cls(models, results, storage.field(doc, "metadata", dict, path))
        except (ShapeMismatchError, InvalidInputError) as err:
            raise ResultFormatError(f"{path}: {err}") from err

    def _runs(self) -> list[CKAResult]:
        return [self.results[key] for key in sorted(self.results)]

    def _hub_extras(self) -> dict[str, bytes]:
        """The clustered heatmap, pushed in the grid's commit as ``plots/<grid_id>.png``."""
        return {f"plots/{self._id}.png": figure_png(self.plot()[0], bbox_inches="tight")}

    @classmethod
    def from_hub(
        cls, repo_id: str, grid_id: str | None = None, **read: Unpack[HubRead]
    ) -> GridResult:
        """Reassemble the grid ``grid_id`` (None: the latest) pushed to the Hub dataset ``repo_id``
        with :meth:`push_to_hub`; ``revision`` and ``token`` as :class:`~hf_cka.hub.HubRead` says.

        Raises:
            HubReadError: no such repository or revision, no access, or the Hub unreachable.
            ResultFormatError: the repository holds no grid, not the named one, an incomplete
                one, or malformed files.
        """
        return cls._from_hub(repo_id, grid_id, **read)

    @classmethod
    def _select(cls, runs: HubRuns, wanted: str | None) -> GridResult:
        members: dict[str, list[tuple[dict[str, Any], str]]] = {}
        for entry in runs.summaries():
            info = entry["metadata"].get(GRID_KEY)
            if isinstance(info, dict) and isinstance(info.get("metadata"), dict):
                grid_id = str(info["metadata"].get("grid_id"))
                members.setdefault(grid_id, []).append((info, entry["run_id"]))
        if not members or (wanted is not None and wanted not in members):
            raise ResultFormatError(
                f"{runs.source}: no grid {wanted!r}; available grids: {sorted(members) or 'none'}"
            )
        if wanted is None:
            wanted = max(
                members,
                key=lambda g: (
                    storage.created_key(members[g][0][0]["metadata"].get("created_at")),
                    g,
                ),
            )
        try:
            results = {
                (info["i"], info["j"]): CKAResult._from_hub_run(runs, run_id)
                for info, run_id in members[wanted]
            }
            return cls(members[wanted][0][0]["models"], results, members[wanted][0][0]["metadata"])
        except (ShapeMismatchError, InvalidInputError, KeyError, TypeError) as err:
            raise ResultFormatError(f"{runs.source}: grid {wanted!r}: {err!r}") from err


def run_grid(
    sources: Sequence[ModelSource],
    data: Any,
    options: RunOptions,
    extraction: ExtractOptions,
    *,
    token: HubToken = None,
) -> GridResult:
    """Extract each model once with ``extraction`` (one in memory at a time; fingerprints are
    loaded) and combine every pair ``i <= j`` with ``options``."""
    from dataclasses import replace

    if len(sources) < 2:
        raise InvalidInputError(f"a grid needs at least 2 models, got {len(sources)}")
    pooling, opts = options.pooling, extraction
    # stored fingerprints first: they fix the batches, so a mismatch costs no forward pass
    stored = [names_fingerprint(s.spec, s.revision, token) for s in sources]
    order = sorted(range(len(sources)), key=lambda index: not stored[index])
    by_index: dict[int, Fingerprint] = {}
    for index in order:
        reference = by_index[order[0]] if by_index else None
        store = fingerprint_model(
            sources[index], data, pooling, opts, reference=reference, token=token
        )
        if reference is None:
            data = reference_data(store, data)
            opts = replace(opts, shuffle_seed=store.settings.get("shuffle_seed"))
        by_index[index] = store
    stores = [by_index[index] for index in range(len(sources))]
    n = len(stores)
    layers = [source.layers for source in sources]
    results = {
        (i, j): combine(
            stores[i], stores[j], layers_a=layers[i], layers_b=layers[j], options=options
        )
        for i in range(n)
        for j in range(i, n)
    }
    first = results[0, 1].metadata
    keep = ("pooling", "estimator", "measure", "measure_params", "dataset", "dataset_config",
            "split", "n_samples", "n_batches", "batch_size", "max_length", "shuffle_seed",
            "samples_digest", "versions")  # fmt: skip
    return GridResult(
        models=[source.spec for source in sources],
        results=results,
        metadata={key: first.get(key) for key in keep},
    )
