"""CKA results with provenance: save/load, tables, plots and Hub datasets.

A :class:`CKAResult` is one *run*: the ``(La, Lb)`` CKA matrix between the layers of model A and
model B, optional per-cell standard errors and permutation-null values, and free-form JSON
metadata (revisions, commit shas, data, estimator, versions, ``run_id``, ``created_at``).

On disk a result is a folder with ``result.json`` (schema name and version, model names, layer
names, metadata) and ``tensors.safetensors`` (``matrix`` and, when present, ``stderr`` and
``null``, all float64). Nothing is pickled. Folders are written to a temporary sibling and
renamed into place, so an interrupted save never leaves a half-written result.

On the Hub a repository of type ``dataset`` collects runs:

- ``data/scores/<run_id>.parquet``: one row per layer pair (config ``scores``),
- ``data/runs/<run_id>.parquet``: one row per run, layers and metadata as JSON (config ``runs``),
- ``plots/<run_id>.png``: the heatmap,
- ``README.md``: the dataset card listing every run.

Both configs have one split, ``train``, holding the rows of every run, so that a second push
adds a run and ``datasets.load_dataset(repo_id, "scores")`` returns all of them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from huggingface_hub import CommitOperationAdd, HfApi, get_token, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hf_cka import distributed
from hf_cka._network import NETWORK_ERRORS
from hf_cka.errors import (
    HubPushError,
    InvalidInputError,
    ResultFormatError,
    ShapeMismatchError,
    suggest,
)

if TYPE_CHECKING:
    import datasets
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

SCHEMA_NAME = "hf_cka.CKAResult"
DRIFT_SCHEMA_NAME = "hf_cka.DriftResult"
SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
TENSORS_FILE = "tensors.safetensors"
DRIFT_FILE = "drift.json"
DEFAULT_LOCAL_ROOT = Path("cka-results")
DRIFT_KEY = "drift"  # metadata key recording a result's membership of a DriftResult

_RUN_ID = re.compile(r"[A-Za-z]\w{0,63}", re.ASCII)
_RESERVED_RUN_IDS = frozenset({"all"})  # a reserved split name in datasets
_OPTIONAL_TENSORS = ("stderr", "null")
_RUNS_FILE = re.compile(r"data/runs/([^/]+)\.parquet")
_CONFLICT_STATUS = frozenset({409, 412})
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

SCORES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_a", pa.string()),
        ("model_b", pa.string()),
        ("layer_a", pa.string()),
        ("layer_b", pa.string()),
        ("index_a", pa.int64()),
        ("index_b", pa.int64()),
        ("cka", pa.float64()),
        ("stderr", pa.float64()),
        ("null", pa.float64()),
    ]
)
RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_a", pa.string()),
        ("model_b", pa.string()),
        ("created_at", pa.string()),
        ("num_layers_a", pa.int64()),
        ("num_layers_b", pa.int64()),
        ("has_stderr", pa.bool_()),
        ("has_null", pa.bool_()),
        ("schema_version", pa.int64()),
        ("layers_a_json", pa.string()),
        ("layers_b_json", pa.string()),
        ("metadata_json", pa.string()),
    ]
)


# --------------------------------------------------------------------------- identifiers


def new_run_id(prefix: str = "r") -> str:
    """A fresh run id: ``prefix`` + UTC timestamp + random suffix, e.g. ``r20261128T174455Z_3f9a``.

    The id is a valid ``datasets`` split name and file name (``[A-Za-z]\\w*``).
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return validate_run_id(f"{prefix}{stamp}_{secrets.token_hex(2)}")


def validate_run_id(run_id: Any) -> str:
    """Return ``run_id`` if it is a safe identifier, else raise.

    A run id names files on disk and in Hub repositories, so it must match
    ``^[A-Za-z]\\w{0,63}$`` (ASCII letters, digits, underscore; no path separators or dots)
    and must not be ``all`` (reserved by ``datasets``).

    Raises:
        InvalidInputError: the id is not a string or does not match.
    """
    if (
        not isinstance(run_id, str)
        or not _RUN_ID.fullmatch(run_id)
        or run_id.lower() in _RESERVED_RUN_IDS
    ):
        raise InvalidInputError(
            f"invalid run id {run_id!r}: expected 1-64 ASCII letters, digits or underscores"
            " starting with a letter (e.g. 'r20261128T174455Z_3f9a'), and not 'all'"
        )
    return run_id


def validate_repo_id(repo_id: Any) -> str:
    """Return ``repo_id`` if it is a valid Hub repository id (``name`` or ``namespace/name``).

    Raises:
        InvalidInputError: it is not.
    """
    if not isinstance(repo_id, str):
        raise InvalidInputError(f"invalid repository id {repo_id!r}: expected a string")
    try:
        hf_validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InvalidInputError(f"invalid repository id {repo_id!r}: {err}") from err
    return repo_id


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _created_key(created_at: Any) -> datetime:
    """Sort key of a ``created_at`` ISO string (naive means UTC; unparsable sorts first)."""
    try:
        moment = datetime.fromisoformat(str(created_at))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------- small helpers


def _as_float64(value: Any, name: str) -> torch.Tensor:
    """A detached float64 CPU copy of ``value`` (tensor, array or nested list)."""
    try:
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        return tensor.to(device="cpu", dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidInputError(f"{name} must be a numeric tensor or array; got {value!r}") from err


def _json_text(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(
            f"{what} must be JSON-serialisable (str, numbers, bools, None, lists, dicts): {err}"
        ) from err


def _scrub(text: str, token: str | bool | None) -> str:
    """``text`` with any known token replaced by ``***``."""
    for secret in {token if isinstance(token, str) else None, get_token()}:
        if secret:
            text = text.replace(secret, "***")
    return text


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- atomic folders


def _holds_result(folder: Path) -> bool:
    return (folder / RESULT_FILE).is_file() or (folder / DRIFT_FILE).is_file()


def _local_copy(
    result: CKAResult | DriftResult, local_dir: str | Path | None, default: Path
) -> Path:
    """The folder holding ``result`` before a push: ``local_dir`` as it is when it already holds
    this very result (files saved beside it, such as a plot, stay), else a fresh save."""
    if local_dir is not None:
        folder = Path(local_dir)
        try:
            saved = type(result).load(folder) if _holds_result(folder) else None
        except ResultFormatError:
            saved = None
        same = saved is not None and (
            saved.run_id == result.run_id
            if isinstance(result, CKAResult)
            else saved.drift_id == result.drift_id
        )
        if same:
            return folder
    return result.save(local_dir if local_dir is not None else default)


@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target`` that replaces ``target`` on success.

    ``target`` may be missing, an empty folder, or a folder holding an earlier result (which
    is replaced). On any error the temporary folder is removed and ``target`` is untouched.

    Raises:
        InvalidInputError: ``target`` is a file, or a non-empty folder that holds no result.
    """
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"cannot save a result to {target}: it exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not _holds_result(target):
        raise InvalidInputError(
            f"refusing to save into {target}: it is a non-empty folder that holds no hf_cka"
            " result; choose a new or empty folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        yield staging
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
            target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            if old is not None:
                old.rename(target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_json(path: Path, schema: str) -> dict[str, Any]:
    """The document in ``path``, checked to be an object of ``schema`` at a known version."""
    if not path.is_file():
        raise ResultFormatError(f"{path}: file not found; expected a folder written by save()")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise ResultFormatError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != schema:
        raise ResultFormatError(f"{path}: expected schema {schema!r}, got {doc.get('schema')!r}")
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != SCHEMA_VERSION:
        hint = (
            " (written by a newer hf_cka: upgrade it)"
            if isinstance(version, int) and (version > SCHEMA_VERSION)
            else ""
        )
        raise ResultFormatError(
            f"{path}: unsupported schema_version {version!r}; this hf_cka reads version"
            f" {SCHEMA_VERSION}{hint}"
        )
    return doc


def _field(doc: Mapping[str, Any], key: str, kind: type, source: Any) -> Any:
    """``doc[key]`` checked to be a ``kind`` (lists: of strings)."""
    if key not in doc:
        raise ResultFormatError(f"{source}: missing required key {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ResultFormatError(
            f"{source}: {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    if kind is list and not all(isinstance(item, str) for item in value):
        raise ResultFormatError(f"{source}: {key!r} must be a list of strings")
    return value


def _checked_run_id(run_id: Any, source: Any) -> str:
    try:
        return validate_run_id(run_id)
    except InvalidInputError as err:
        raise ResultFormatError(f"{source}: {err}") from err


# --------------------------------------------------------------------------- CKAResult


@dataclass(eq=False, repr=False)
class CKAResult:
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
        self.matrix = _as_float64(self.matrix, "matrix")
        self.layers_a = [str(name) for name in self.layers_a]
        self.layers_b = [str(name) for name in self.layers_b]
        self.model_a, self.model_b = str(self.model_a), str(self.model_b)
        if self.matrix.ndim != 2:
            raise ShapeMismatchError(
                f"matrix must be 2-D (layers_a, layers_b); got shape {tuple(self.matrix.shape)}"
            )
        for name in ("matrix", *_OPTIONAL_TENSORS):
            value = getattr(self, name)
            if value is None:
                continue
            value = _as_float64(value, name)
            if tuple(value.shape) != self.shape:
                raise ShapeMismatchError(
                    f"{name} has shape {tuple(value.shape)}, expected {self.shape} ="
                    f" ({len(self.layers_a)} layers of {self.model_a},"
                    f" {len(self.layers_b)} layers of {self.model_b})"
                )
            setattr(self, name, value)
        self.metadata = dict(self.metadata)
        self.metadata["run_id"] = validate_run_id(self.metadata.get("run_id") or new_run_id())
        self.metadata.setdefault("created_at", _utc_now())

    def __repr__(self) -> str:
        extras = "".join(
            f", {name}=True" for name in _OPTIONAL_TENSORS if getattr(self, name) is not None
        )
        return (
            f"CKAResult(run_id={self.run_id!r}, model_a={self.model_a!r},"
            f" model_b={self.model_b!r}, shape={self.shape}{extras})"
        )

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
        """Whether both sides are the same model, revision and layers (a symmetric matrix)."""
        same_revision = all(
            self.metadata.get(f"{key}_a") == self.metadata.get(f"{key}_b")
            for key in ("revision", "commit_sha")
        )
        return self.model_a == self.model_b and self.layers_a == self.layers_b and same_revision

    # ----------------------------------------------------------------------- files

    def save(self, directory: str | Path) -> Path:
        """Write the result to ``directory`` atomically and return its path.

        ``directory`` is created (or replaced, if it holds an earlier result) by renaming a
        fully written temporary sibling folder.

        Raises:
            InvalidInputError: ``directory`` is a file or a non-empty folder without a result,
                or the metadata is not JSON-serialisable.
        """
        target = Path(directory)
        if not distributed.is_main_process():  # every process holds the same result
            return target
        document = _json_text(self._document(), "metadata")
        with _atomic_directory(target) as staging:
            self._write(staging, document)
        return target

    def _document(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "layers_a": self.layers_a,
            "layers_b": self.layers_b,
            "metadata": self.metadata,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("matrix", *_OPTIONAL_TENSORS)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _write(self, folder: Path, document: str) -> None:
        (folder / RESULT_FILE).write_text(document, encoding="utf-8")
        tensors = {name: tensor.contiguous() for name, tensor in self._tensors().items()}
        save_file(tensors, folder / TENSORS_FILE, metadata={"schema": SCHEMA_NAME})

    @classmethod
    def load(cls, directory: str | Path) -> CKAResult:
        """Load a result written by :meth:`save`, validating everything it reads.

        Raises:
            ResultFormatError: a file is missing or malformed; the message names the file and
                what is wrong (schema, version, key, type, tensor dtype or shape).
        """
        folder = Path(directory)
        path = folder / RESULT_FILE
        doc = _read_json(path, SCHEMA_NAME)
        layers_a = _field(doc, "layers_a", list, path)
        layers_b = _field(doc, "layers_b", list, path)
        metadata = _field(doc, "metadata", dict, path)
        _checked_run_id(metadata.get("run_id"), path)
        tensors = _read_tensors(folder / TENSORS_FILE, (len(layers_a), len(layers_b)))
        return cls(
            tensors["matrix"],
            layers_a,
            layers_b,
            _field(doc, "model_a", str, path),
            _field(doc, "model_b", str, path),
            metadata,
            tensors.get("stderr"),
            tensors.get("null"),
        )

    # ----------------------------------------------------------------------- tables and plots

    def to_pandas(self) -> pd.DataFrame:
        """Long table, one row per layer pair (row-major: all of ``layers_b`` per ``layer_a``).

        Columns: ``run_id, model_a, model_b, layer_a, layer_b, index_a, index_b, cka, stderr,
        null`` (``stderr``/``null`` are NaN when the result has none).
        """
        return self._scores_table().to_pandas()

    def to_dataset(self) -> datasets.Dataset:
        """The rows of :meth:`to_pandas` as a :class:`datasets.Dataset`."""
        import datasets

        return datasets.Dataset(self._scores_table())

    def _scores_table(self) -> pa.Table:
        rows, cols = self.shape
        index_a = np.repeat(np.arange(rows, dtype=np.int64), cols)
        index_b = np.tile(np.arange(cols, dtype=np.int64), rows)
        missing = np.full(rows * cols, np.nan)

        def flat(tensor: torch.Tensor | None) -> np.ndarray:
            return missing if tensor is None else tensor.numpy().reshape(-1)

        columns = {
            "run_id": [self.run_id] * (rows * cols),
            "model_a": [self.model_a] * (rows * cols),
            "model_b": [self.model_b] * (rows * cols),
            "layer_a": [self.layers_a[i] for i in index_a],
            "layer_b": [self.layers_b[j] for j in index_b],
            "index_a": index_a,
            "index_b": index_b,
            "cka": flat(self.matrix),
            "stderr": flat(self.stderr),
            "null": flat(self.null),
        }
        return pa.table(columns, schema=SCORES_SCHEMA)

    def _run_record(self) -> dict[str, Any]:
        """The row of this run in the ``runs`` table."""
        return {
            "run_id": self.run_id,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "created_at": str(self.metadata.get("created_at", "")),
            "num_layers_a": len(self.layers_a),
            "num_layers_b": len(self.layers_b),
            "has_stderr": self.stderr is not None,
            "has_null": self.null is not None,
            "schema_version": SCHEMA_VERSION,
            "layers_a_json": _json_text(self.layers_a, "layers_a"),
            "layers_b_json": _json_text(self.layers_b, "layers_b"),
            "metadata_json": _json_text(self.metadata, "metadata"),
        }

    def plot(self, **kwargs: Any) -> tuple[Figure, Axes]:
        """Heatmap via :func:`hf_cka.plotting.plot_cka_heatmap`; ``kwargs`` override defaults.

        Defaults: layer and model names of this result, its ``stderr``, and ``mask_upper``
        when :attr:`is_self_comparison`.
        """
        from hf_cka.plotting import plot_cka_heatmap

        options: dict[str, Any] = {
            "layers1": self.layers_a,
            "layers2": self.layers_b,
            "model1_name": self.model_a,
            "model2_name": self.model_b,
            "mask_upper": self.is_self_comparison,
            "stderr": self.stderr,
        }
        options.update(kwargs)
        return plot_cka_heatmap(self.matrix, **options)

    def _heatmap_png(self) -> bytes:
        import matplotlib.pyplot as plt

        fig, _ = self.plot()
        try:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110)
            return buffer.getvalue()
        finally:
            plt.close(fig)

    # ----------------------------------------------------------------------- Hub

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        local_dir: str | Path | None = None,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
    ) -> str:
        """Publish this run to the Hub dataset ``repo_id``, keeping the runs already there.

        The result is first saved to ``local_dir`` (default ``./cka-results/<run_id>/``). Then
        one commit adds ``data/scores/<run_id>.parquet``, ``data/runs/<run_id>.parquet``,
        ``plots/<run_id>.png`` and a ``README.md`` listing every run of the repository. The
        commit names the revision it was built on as its parent, so a concurrent push makes it
        fail with a conflict; it is then rebuilt on the new head. Conflicts, HTTP 408/429/5xx
        and network errors are retried up to ``max_attempts`` times, waiting
        ``backoff_s * 2**k`` seconds (with jitter) before retry ``k + 1``.

        Args:
            repo_id: Dataset repository, created if missing.
            private: Visibility of a newly created repository (None: the Hub default).
            token: Hub token; None uses the saved login or ``HF_TOKEN``. Never written anywhere.
            commit_message: Defaults to ``"Add CKA run <run_id>"``.
            local_dir: Where to save the local copy.
            max_attempts: Attempts before giving up.
            backoff_s: Base wait between attempts, in seconds.

        Returns:
            The URL of the commit.

        Raises:
            InvalidInputError: ``repo_id`` is not a valid repository id (nothing is saved).
            HubPushError: the push failed for good; the message names the local copy.
        """
        validate_repo_id(repo_id)
        local = _local_copy(self, local_dir, DEFAULT_LOCAL_ROOT / self.run_id)
        return _push_runs(
            [self],
            repo_id,
            local_copy=local,
            private=private,
            token=token,
            commit_message=commit_message or f"Add CKA run {self.run_id}",
            max_attempts=max_attempts,
            backoff_s=backoff_s,
        )

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        run_id: str | None = None,
        *,
        revision: str | None = None,
        token: str | None = None,
    ) -> CKAResult:
        """Download one run of a Hub dataset written by :meth:`push_to_hub`.

        Args:
            repo_id: Dataset repository.
            run_id: The run; None takes the latest by ``created_at``.
            revision: Branch, tag or commit of the repository (default branch if None).
            token: Hub token.

        Returns:
            The result, its matrix bit-identical to the one pushed.

        Raises:
            ResultFormatError: the repository holds no run, not the named run (the message lists
                the available ones), or malformed files.
        """
        runs = _HubRuns.pin(HfApi(), repo_id, revision, token)
        available = runs.checked_run_ids()
        if run_id is None:
            return runs.result(max(runs.records(), key=_newest))
        validate_run_id(run_id)
        if run_id not in available:
            raise ResultFormatError(
                f"{runs.source}: no run {run_id!r}; available runs: {', '.join(available)}."
                + suggest(run_id, available)
            )
        return runs.result(runs.record(run_id))


def _read_tensors(path: Path, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: float64 ``matrix`` and optional ``stderr``, ``null``."""
    if not path.is_file():
        raise ResultFormatError(f"{path}: file not found; expected a folder written by save()")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ResultFormatError(f"{path}: not a readable safetensors file ({err})") from err
    if "matrix" not in tensors:
        raise ResultFormatError(f"{path}: missing tensor 'matrix'")
    if unknown := set(tensors) - {"matrix", *_OPTIONAL_TENSORS}:
        raise ResultFormatError(f"{path}: unexpected tensors {sorted(unknown)}")
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float64 or tuple(tensor.shape) != shape:
            raise ResultFormatError(
                f"{path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected"
                f" torch.float64 {shape} to match the layer lists in {RESULT_FILE}"
            )
    return tensors


# --------------------------------------------------------------------------- Hub tables


@dataclass
class _HubRuns:
    """The hf_cka runs of a Hub dataset at one pinned revision (reads only)."""

    api: HfApi
    repo_id: str
    revision: str | None
    token: str | bool | None

    @classmethod
    def pin(
        cls, api: HfApi, repo_id: str, revision: str | None, token: str | bool | None
    ) -> _HubRuns:
        """Resolve ``revision`` (default branch if None) to its commit so all reads agree."""
        sha = api.dataset_info(repo_id, revision=revision, token=token).sha
        return cls(api, repo_id, sha or revision, token)

    @property
    def source(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}"

    def run_ids(self) -> list[str]:
        """Ids of the runs (names of ``data/runs/<run_id>.parquet``), sorted."""
        paths = self.api.list_repo_files(
            self.repo_id, repo_type="dataset", revision=self.revision, token=self.token
        )
        found = (_RUNS_FILE.fullmatch(path) for path in paths)
        return sorted(m.group(1) for m in found if m and _RUN_ID.fullmatch(m.group(1)))

    def checked_run_ids(self) -> list[str]:
        """:meth:`run_ids`, raising when there is none."""
        if not (run_ids := self.run_ids()):
            raise ResultFormatError(f"{self.source}: holds no hf_cka run (no data/runs/*.parquet)")
        return run_ids

    def table(self, path: str) -> pa.Table:
        local = hf_hub_download(
            self.repo_id, path, repo_type="dataset", revision=self.revision, token=self.token
        )
        try:
            return pq.read_table(local)
        except (pa.ArrowException, OSError) as err:
            raise ResultFormatError(
                f"{self.source}/{path}: not a readable parquet file ({err})"
            ) from err

    def record(self, run_id: str) -> dict[str, Any]:
        """The validated ``runs`` row of ``run_id``, plus its decoded ``layers_a``,
        ``layers_b`` and ``metadata``."""
        path = f"data/runs/{run_id}.parquet"
        table = self.table(path)
        source = f"{self.source}/{path}"
        if table.num_rows != 1:
            raise ResultFormatError(f"{source}: expected one row, got {table.num_rows}")
        record = table.to_pylist()[0]
        for column in RUNS_SCHEMA:
            kind = (
                bool
                if pa.types.is_boolean(column.type)
                else int
                if pa.types.is_integer(column.type)
                else str
            )
            _field(record, column.name, kind, source)
        if record["run_id"] != run_id:
            raise ResultFormatError(
                f"{source}: holds run {record['run_id']!r}, expected {run_id!r}"
            )
        if record["schema_version"] != SCHEMA_VERSION:
            raise ResultFormatError(
                f"{source}: unsupported schema_version {record['schema_version']}; this hf_cka"
                f" reads version {SCHEMA_VERSION}"
            )
        record["layers_a"] = _decode_json(record, "layers_a_json", list, source)
        record["layers_b"] = _decode_json(record, "layers_b_json", list, source)
        record["metadata"] = _decode_json(record, "metadata_json", dict, source)
        shape = (len(record["layers_a"]), len(record["layers_b"]))
        if shape != (record["num_layers_a"], record["num_layers_b"]):
            raise ResultFormatError(
                f"{source}: layer lists of lengths {shape} disagree with num_layers_a/num_layers_b"
            )
        return record

    def records(self) -> list[dict[str, Any]]:
        """The records of every run."""
        return [self.record(run_id) for run_id in self.run_ids()]

    def result(self, record: Mapping[str, Any]) -> CKAResult:
        """The result of a record, rebuilt from its ``scores`` file."""
        path = f"data/scores/{record['run_id']}.parquet"
        return _result_from_tables(record, self.table(path), f"{self.source}/{path}")


def _newest(record: Mapping[str, Any]) -> tuple[datetime, str]:
    """Sort key of runs records: ``created_at``, then ``run_id``."""
    return _created_key(record["created_at"]), record["run_id"]


def _decode_json(record: Mapping[str, Any], key: str, kind: type, source: str) -> Any:
    try:
        value = json.loads(record[key])
    except json.JSONDecodeError as err:
        raise ResultFormatError(f"{source}: column {key!r} is not valid JSON ({err})") from err
    return _field({key: value}, key, kind, source)


def _result_from_tables(record: Mapping[str, Any], scores: pa.Table, source: str) -> CKAResult:
    """Rebuild a result from its decoded ``runs`` record and its ``scores`` table."""
    shape = (record["num_layers_a"], record["num_layers_b"])
    if missing := set(SCORES_SCHEMA.names) - set(scores.column_names):
        raise ResultFormatError(f"{source}: missing columns {sorted(missing)}")
    if scores.num_rows != shape[0] * shape[1]:
        raise ResultFormatError(
            f"{source}: {scores.num_rows} rows, expected {shape[0]} x {shape[1]} layer pairs"
        )
    try:
        scores = scores.select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA)
    except pa.ArrowException as err:
        raise ResultFormatError(f"{source}: columns of the wrong type ({err})") from err
    index_a = scores.column("index_a").to_numpy()
    index_b = scores.column("index_b").to_numpy()
    in_range = (index_a >= 0) & (index_a < shape[0]) & (index_b >= 0) & (index_b < shape[1])
    pairs = set(zip(index_a.tolist(), index_b.tolist(), strict=True))
    if not in_range.all() or len(pairs) != scores.num_rows:
        raise ResultFormatError(f"{source}: index_a/index_b do not cover each layer pair once")

    def grid(column: str) -> torch.Tensor:
        values = np.full(shape, np.nan)
        values[index_a, index_b] = scores.column(column).to_numpy(zero_copy_only=False)
        return torch.from_numpy(values)

    return CKAResult(
        grid("cka"),
        record["layers_a"],
        record["layers_b"],
        record["model_a"],
        record["model_b"],
        record["metadata"],
        grid("stderr") if record["has_stderr"] else None,
        grid("null") if record["has_null"] else None,
    )


# --------------------------------------------------------------------------- pushing


def _retry_reason(err: BaseException) -> str | None:
    """Why ``err`` is worth retrying (a conflict or a transient failure), or None."""
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", None)
        if status in _CONFLICT_STATUS:
            return f"conflict with a concurrent push (HTTP {status})"
        return f"HTTP {status}" if status in _TRANSIENT_STATUS else None
    if isinstance(err, NETWORK_ERRORS):
        return f"network error ({type(err).__name__})"
    return None


def _push_runs(
    results: Sequence[CKAResult],
    repo_id: str,
    *,
    local_copy: Path,
    private: bool | None,
    token: str | None,
    commit_message: str,
    max_attempts: int,
    backoff_s: float,
) -> str:
    """Add ``results`` to the Hub dataset ``repo_id`` in one commit (see ``push_to_hub``).

    Only the main process pushes (the others return ``""``): every process holds the result.
    """
    from hf_cka.cards import render_dataset_card

    if not distributed.is_main_process():
        return ""
    if max_attempts < 1:
        raise InvalidInputError(f"max_attempts must be >= 1; got {max_attempts}")
    files: dict[str, bytes] = {}
    new_records: dict[str, dict[str, Any]] = {}
    for result in results:
        record = result._run_record()
        files[f"data/scores/{result.run_id}.parquet"] = _parquet_bytes(result._scores_table())
        files[f"data/runs/{result.run_id}.parquet"] = _parquet_bytes(
            pa.Table.from_pylist([record], schema=RUNS_SCHEMA)
        )
        files[f"plots/{result.run_id}.png"] = result._heatmap_png()
        new_records[result.run_id] = {**record, "metadata": result.metadata}
    api = HfApi()
    attempt = 0
    while True:
        attempt += 1
        try:
            api.create_repo(
                repo_id, repo_type="dataset", private=private, exist_ok=True, token=token
            )
            existing = _HubRuns.pin(api, repo_id, None, token)
            records = {record["run_id"]: record for record in existing.records()}
            records.update(new_records)
            card = render_dataset_card(repo_id, list(records.values()))
            operations = [CommitOperationAdd(path, data) for path, data in files.items()]
            operations.append(CommitOperationAdd("README.md", str(card).encode("utf-8")))
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message,
                repo_type="dataset",
                parent_commit=existing.revision,
                token=token,
            )
            return info.commit_url
        except (OSError, *NETWORK_ERRORS, ResultFormatError) as err:
            failure = _scrub(f"{type(err).__name__}: {err}", token)
            reason = _retry_reason(err)
            if reason is None or attempt == max_attempts:
                raise HubPushError(
                    f"pushing {len(results)} run(s) to the Hub dataset {repo_id!r} failed after"
                    f" {attempt} attempt(s): {failure}. The result is saved locally in"
                    f" {local_copy.resolve()}; push it again later with"
                    f" `hf-cka push {local_copy.resolve()} {repo_id}`."
                ) from None
            delay = min(backoff_s * 2 ** (attempt - 1), 60.0) * random.uniform(0.5, 1.5)
            logger.warning(
                "push to %s failed (%s); retrying in %.1fs (attempt %d/%d)",
                repo_id,
                reason,
                delay,
                attempt + 1,
                max_attempts,
            )
            time.sleep(delay)


# --------------------------------------------------------------------------- DriftResult


@dataclass(eq=False, repr=False)
class DriftResult:
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
        self.metadata = dict(self.metadata)
        self.metadata["drift_id"] = validate_run_id(
            self.metadata.get("drift_id") or new_run_id("d")
        )
        self.metadata.setdefault("created_at", _utc_now())
        for index, result in enumerate(self.results):
            result.metadata[DRIFT_KEY] = {
                "base": self.base,
                "checkpoints": self.checkpoints,
                "index": index,
                "metadata": self.metadata,
            }

    def __repr__(self) -> str:
        return (
            f"DriftResult(drift_id={self.drift_id!r}, base={self.base!r},"
            f" checkpoints={self.checkpoints!r}, layers={len(self.layers)})"
        )

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
        if any(result.stderr is None for result in self.results):
            return None
        return torch.stack([result.stderr.diagonal() for result in self.results], dim=1)

    def to_pandas(self) -> pd.DataFrame:
        """Long table of :attr:`similarity`, one row per (checkpoint, layer).

        Columns: ``drift_id, base, checkpoint, checkpoint_index, run_id, layer, index, cka,
        stderr`` (NaN when absent).
        """
        similarity = self.similarity.numpy()
        stderr = self.stderr
        rows = [
            {
                "drift_id": self.drift_id,
                "base": self.base,
                "checkpoint": checkpoint,
                "checkpoint_index": c,
                "run_id": result.run_id,
                "layer": layer,
                "index": i,
                "cka": similarity[i, c],
                "stderr": math.nan if stderr is None else stderr[i, c].item(),
            }
            for c, (checkpoint, result) in enumerate(
                zip(self.checkpoints, self.results, strict=True)
            )
            for i, layer in enumerate(self.layers)
        ]
        return pd.DataFrame(rows)

    def plot(self, **kwargs: Any) -> tuple[Figure, Any]:
        """Drift plot via :func:`hf_cka.plotting.plot_drift`; ``kwargs`` override defaults."""
        from hf_cka.plotting import plot_drift

        options: dict[str, Any] = {"base_name": self.base, "stderr": self.stderr}
        options.update(kwargs)
        return plot_drift(self.similarity, self.layers, self.checkpoints, **options)

    def save(self, directory: str | Path) -> Path:
        """Write ``drift.json`` and one result folder per checkpoint (``<run_id>/``) atomically.

        Raises:
            InvalidInputError: as :meth:`CKAResult.save`.
        """
        target = Path(directory)
        if not distributed.is_main_process():
            return target
        document = _json_text(
            {
                "schema": DRIFT_SCHEMA_NAME,
                "schema_version": SCHEMA_VERSION,
                "base": self.base,
                "checkpoints": self.checkpoints,
                "runs": [result.run_id for result in self.results],
                "metadata": self.metadata,
            },
            "metadata",
        )
        with _atomic_directory(target) as staging:
            for result in self.results:
                result.save(staging / result.run_id)
            (staging / DRIFT_FILE).write_text(document, encoding="utf-8")
        return target

    @classmethod
    def load(cls, directory: str | Path) -> DriftResult:
        """Load a drift written by :meth:`save`.

        Raises:
            ResultFormatError: ``drift.json`` or a result folder is missing or malformed.
        """
        folder = Path(directory)
        path = folder / DRIFT_FILE
        doc = _read_json(path, DRIFT_SCHEMA_NAME)
        runs = [_checked_run_id(run_id, path) for run_id in _field(doc, "runs", list, path)]
        results = [CKAResult.load(folder / run_id) for run_id in runs]
        for run_id, result in zip(runs, results, strict=True):
            if result.run_id != run_id:
                raise ResultFormatError(
                    f"{folder / run_id}: holds run {result.run_id!r}, expected {run_id!r}"
                )
        try:
            return cls(
                _field(doc, "base", str, path),
                _field(doc, "checkpoints", list, path),
                results,
                _field(doc, "metadata", dict, path),
            )
        except (ShapeMismatchError, InvalidInputError) as err:
            raise ResultFormatError(f"{path}: {err}") from err

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        local_dir: str | Path | None = None,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
    ) -> str:
        """Publish every checkpoint's run in one commit; see :meth:`CKAResult.push_to_hub`.

        The local copy defaults to ``./cka-results/<drift_id>/``.
        """
        validate_repo_id(repo_id)
        local = _local_copy(self, local_dir, DEFAULT_LOCAL_ROOT / self.drift_id)
        return _push_runs(
            self.results,
            repo_id,
            local_copy=local,
            private=private,
            token=token,
            commit_message=commit_message
            or f"Add CKA drift {self.drift_id} ({len(self.results)} runs)",
            max_attempts=max_attempts,
            backoff_s=backoff_s,
        )

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        drift_id: str | None = None,
        *,
        revision: str | None = None,
        token: str | None = None,
    ) -> DriftResult:
        """Reassemble a drift pushed with :meth:`push_to_hub` from its runs.

        Args:
            repo_id: Dataset repository.
            drift_id: The drift; None takes the latest by its ``created_at``.
            revision: Branch, tag or commit of the repository (default branch if None).
            token: Hub token.

        Raises:
            ResultFormatError: the repository holds no drift, not the named one (the message
                lists the available ones), an incomplete one, or malformed files.
        """
        runs = _HubRuns.pin(HfApi(), repo_id, revision, token)
        runs.checked_run_ids()
        members: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        for record in runs.records():
            if (info := _drift_info(record)) is not None:
                members.setdefault(info["metadata"]["drift_id"], []).append((info, record))
        if not members:
            raise ResultFormatError(f"{runs.source}: holds no drift (no run records one)")
        if drift_id is None:
            drift_id = max(
                members,
                key=lambda d: (_created_key(members[d][0][0]["metadata"].get("created_at")), d),
            )
        elif drift_id not in members:
            raise ResultFormatError(
                f"{runs.source}: no drift {drift_id!r}; available drifts: {', '.join(members)}."
                + suggest(drift_id, members)
            )
        pairs = sorted(members[drift_id], key=lambda pair: pair[0]["index"])
        info = pairs[0][0]
        if [i["index"] for i, _ in pairs] != list(range(len(info["checkpoints"]))):
            raise ResultFormatError(
                f"{runs.source}: drift {drift_id!r} is incomplete: it has {len(pairs)} of its"
                f" {len(info['checkpoints'])} checkpoint runs"
            )
        try:
            return cls(
                info["base"],
                info["checkpoints"],
                [runs.result(record) for _, record in pairs],
                info["metadata"],
            )
        except (ShapeMismatchError, InvalidInputError) as err:
            raise ResultFormatError(f"{runs.source}: drift {drift_id!r}: {err}") from err


def _drift_info(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The well-formed ``metadata["drift"]`` of a runs record, or None."""
    info = record["metadata"].get(DRIFT_KEY)
    if not isinstance(info, dict):
        return None
    meta = info.get("metadata")
    well_formed = (
        isinstance(info.get("base"), str)
        and isinstance(info.get("checkpoints"), list)
        and isinstance(info.get("index"), int)
        and isinstance(meta, dict)
        and isinstance(meta.get("drift_id"), str)
    )
    return info if well_formed else None
