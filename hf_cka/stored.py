"""The one save/load/push/pull path of results, and their conversion to and from Hub tables.

:class:`Stored` is the base of :class:`~hf_cka.result.CKAResult`,
:class:`~hf_cka.drift.DriftResult` and :class:`~hf_cka.grid.GridResult`: all save, load, push and
pull through its methods (the push through :class:`~hf_cka.publishing.Publishable`, as
fingerprints do) and only say how to write, read and select themselves. The functions
convert a run's tensors to its ``scores`` table and back.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import torch

from hf_cka import hub, storage
from hf_cka.errors import InvalidInputError, ResultFormatError, suggest
from hf_cka.hub import SCORES_SCHEMA, HubRuns
from hf_cka.publishing import Publishable
from hf_cka.storage import (
    DEFAULT_LOCAL_ROOT,
    new_run_id,
    utc_now,
    validate_repo_id,
    validate_run_id,
)
from hf_cka.tokens import HubToken, clean_token

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_Result = TypeVar("_Result", bound="Stored")


def as_float64(value: Any, name: str) -> torch.Tensor:
    """A detached float64 CPU copy of ``value`` (tensor, array or nested list)."""
    try:
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        return tensor.to(device="cpu", dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidInputError(f"{name} must be a numeric tensor or array; got {value!r}") from err


def figure_png(figure: Figure, **savefig: Any) -> bytes:
    """``figure`` rendered as PNG bytes at 110 dpi (``savefig`` adds options), then closed."""
    import matplotlib.pyplot as plt

    try:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, **savefig)
        return buffer.getvalue()
    finally:
        plt.close(figure)


class Run(Protocol):
    """One run of a result, as the Hub stores it."""

    def _hub_run(self) -> hub.HubRun: ...


DRIFT_KEY = "drift"  # metadata key recording a result's membership of a DriftResult


class Stored(Publishable):
    """Saving, loading, pushing and pulling, shared by every result class.

    A subclass names its id (:attr:`_id`), writes and reads its own files (:meth:`_write`,
    :meth:`_read`), lists its runs (:meth:`_runs`) and picks itself out of a Hub dataset
    (:meth:`_select`).
    """

    _ID_KEY: ClassVar[str]  # the metadata key of the id
    _KIND: ClassVar[str]  # "run", "drift" or "grid"

    metadata: dict[str, Any]  # a dataclass field of every subclass

    @property
    def _id(self) -> str:
        return str(self.metadata[self._ID_KEY])

    def __repr__(self) -> str:
        """``<class>(<id key>=<id>, ...)`` with :meth:`_described` (never the tensors)."""
        fields = {self._ID_KEY: self._id, **self._described()}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    def _described(self) -> dict[str, Any]:
        """What ``repr`` shows besides the id."""
        raise NotImplementedError

    def _stamp(self) -> None:
        """Copy ``metadata`` and fill in its id (a fresh ``<k><UTC time>_<hex>``, ``k`` the
        kind's first letter, unless one is given) and ``created_at``."""
        self.metadata = dict(self.metadata)
        given = self.metadata.get(self._ID_KEY)
        self.metadata[self._ID_KEY] = validate_run_id(given or new_run_id(self._KIND[0]))
        self.metadata.setdefault("created_at", utc_now())

    def _write(self, folder: Path) -> None:
        raise NotImplementedError

    @classmethod
    def _read(cls: type[_Result], folder: Path) -> _Result:
        raise NotImplementedError

    def _runs(self) -> Sequence[Run]:
        raise NotImplementedError

    @classmethod
    def _select(cls: type[_Result], runs: HubRuns, wanted: str | None) -> _Result:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write the result to ``directory`` atomically and return its path.

        The files are written to a temporary sibling folder, then moved into ``directory``
        (created if missing). Saving over an earlier result replaces only the files a result
        writes: other files there (notes, figures) stay. Every process that calls it writes.

        Raises:
            InvalidInputError: ``directory`` is a file or a non-empty folder without a result,
                or the metadata is not JSON-serialisable.
        """
        target = Path(directory)
        with storage.atomic_folder(target) as staging:
            self._write(staging)
        return target

    @classmethod
    def load(cls: type[_Result], directory: str | Path) -> _Result:
        """Load a result written by :meth:`save`, validating everything it reads.

        Raises:
            ResultFormatError: a file is missing or malformed; the message names the file and
                what is wrong (schema, version, key, type, tensor dtype, shape or digest), and
                where a killed save into the folder left the earlier result, if one did.
        """
        with storage.naming_previous(Path(directory)):
            return cls._read(Path(directory))

    def _holds_this(self, folder: Path) -> bool:
        try:
            saved = type(self).load(folder) if storage.holds_result(folder) else None
        except ResultFormatError:
            return False
        return saved is not None and saved._id == self._id

    def _default_folder(self) -> Path:
        return DEFAULT_LOCAL_ROOT / self._id

    def _commit(self, repo_id: str, token: HubToken) -> hub.Operations:
        runs = [run._hub_run() for run in self._runs()]
        return hub.run_commit(runs, repo_id, token, self._hub_extras())

    def _commit_message(self) -> str:
        return f"Add CKA {self._KIND} {self._id} ({len(self._runs())} run(s))"

    def _pushed_what(self) -> str:
        return f"{len(self._runs())} run(s)"

    def _hub_extras(self) -> dict[str, bytes]:
        """Files pushed with the runs besides theirs, by repo path (none by default)."""
        return {}

    @classmethod
    def _from_hub(
        cls: type[_Result],
        repo_id: str,
        wanted: str | None,
        revision: str | None = None,
        token: HubToken = None,
    ) -> _Result:
        """The result ``wanted`` (None: the latest) of the Hub dataset ``repo_id``."""
        validate_repo_id(repo_id)
        if wanted is not None:
            validate_run_id(wanted)
        cleaned = clean_token(token)
        with hub.reading(repo_id, revision, cleaned) as api:
            return cls._select(HubRuns.pin(api, repo_id, revision, cleaned), wanted)


def scores_table(
    run_id: str,
    model_a: str,
    model_b: str,
    layers_a: list[str],
    layers_b: list[str],
    tensors: Mapping[str, torch.Tensor],
) -> pa.Table:
    """The ``scores`` table of a run: one row per layer pair, row-major.

    ``tensors`` holds ``matrix`` (column ``cka``) and optionally ``stderr`` and ``null``
    (NaN columns when absent).
    """
    rows, cols = len(layers_a), len(layers_b)
    index_a = np.repeat(np.arange(rows, dtype=np.int64), cols)
    index_b = np.tile(np.arange(cols, dtype=np.int64), rows)
    missing = np.full(rows * cols, np.nan)

    def flat(name: str) -> np.ndarray:
        tensor = tensors.get(name)
        return missing if tensor is None else tensor.numpy().reshape(-1)

    columns = {
        "run_id": [run_id] * (rows * cols),
        "model_a": [model_a] * (rows * cols),
        "model_b": [model_b] * (rows * cols),
        "layer_a": [layers_a[i] for i in index_a],
        "layer_b": [layers_b[j] for j in index_b],
        "index_a": index_a,
        "index_b": index_b,
        "cka": flat("matrix"),
        "stderr": flat("stderr"),
        "null": flat("null"),
    }
    return pa.table(columns, schema=SCORES_SCHEMA)


def tensors_of(record: Mapping[str, Any], scores: pa.Table, source: str) -> dict[str, torch.Tensor]:
    """The ``cka`` grid (and ``stderr``, ``null`` when the record has them) of a ``scores`` table.

    Raises:
        ResultFormatError: a column is missing or of the wrong type, or the rows do not cover
            each layer pair of the record exactly once.
    """
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
    names = ["cka"] + [name for name in ("stderr", "null") if record[f"has_{name}"]]
    grids = {}
    for name in names:
        values = np.full(shape, np.nan)
        values[index_a, index_b] = scores.column(name).to_numpy(zero_copy_only=False)
        grids[name] = torch.from_numpy(values)
    return grids


def drift_info(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """The well-formed ``metadata["drift"]`` of a run, or None."""
    info = metadata.get(DRIFT_KEY)
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


def drift_run_ids(runs: HubRuns, wanted: str | None) -> tuple[str, list[str]]:
    """The drift ``wanted`` (None: the latest by ``created_at``) and its run ids, in order.

    Raises:
        ResultFormatError: the repository holds no drift, or not ``wanted`` (the message lists
            the available ones).
    """
    members: dict[str, list[tuple[int, str]]] = {}
    created: dict[str, Any] = {}
    for entry in runs.summaries():
        if (info := drift_info(entry["metadata"])) is not None:
            drift_id = info["metadata"]["drift_id"]
            members.setdefault(drift_id, []).append((info["index"], entry["run_id"]))
            created[drift_id] = info["metadata"].get("created_at")
    if not members:
        raise ResultFormatError(f"{runs.source}: holds no drift (no run records one)")
    if wanted is None:
        wanted = max(members, key=lambda d: (storage.created_key(created[d]), d))
    elif wanted not in members:
        raise ResultFormatError(
            f"{runs.source}: no drift {wanted!r}; available drifts: {', '.join(members)}."
            + suggest(wanted, members)
        )
    return wanted, [run_id for _, run_id in sorted(members[wanted])]


def complete_drift_info(
    source: str, drift_id: str, metadata: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The drift membership shared by the runs of drift ``drift_id``, read in order.

    Raises:
        ResultFormatError: a run lacks its membership, or runs of the drift are missing.
    """
    infos = [drift_info(meta) for meta in metadata]
    info = infos[0]
    if info is None or [i["index"] if i else None for i in infos] != list(
        range(len(info["checkpoints"]))
    ):
        raise ResultFormatError(
            f"{source}: drift {drift_id!r} is incomplete: it has {len(metadata)} of its"
            f" {len(info['checkpoints']) if info else '?'} checkpoint runs"
        )
    return info


def run_record(
    run_id: str,
    model_a: str,
    model_b: str,
    layers_a: list[str],
    layers_b: list[str],
    metadata: Mapping[str, Any],
    tensors: set[str],
) -> dict[str, Any]:
    """The row of a run in the ``runs`` table (``tensors``: which of ``stderr``, ``null`` it
    has), plus its ``metadata``."""
    return {
        "run_id": run_id,
        "model_a": model_a,
        "model_b": model_b,
        "created_at": str(metadata.get("created_at", "")),
        "num_layers_a": len(layers_a),
        "num_layers_b": len(layers_b),
        "has_stderr": "stderr" in tensors,
        "has_null": "null" in tensors,
        "schema_version": storage.SCHEMA_VERSION,
        "layers_a_json": storage.json_text(layers_a, "layers_a"),
        "layers_b_json": storage.json_text(layers_b, "layers_b"),
        "metadata_json": storage.json_text(metadata, "metadata"),
        "metadata": metadata,
    }


def pick_run(runs: HubRuns, wanted: str | None) -> str:
    """The run ``wanted``, or the latest by ``created_at`` when None.

    Raises:
        ResultFormatError: the repository holds no run, or not ``wanted`` (the message lists
            the available ones).
    """
    if wanted is None:
        return str(hub.newest(runs.summaries())["run_id"])
    if wanted not in (available := runs.checked_run_ids()):
        raise ResultFormatError(
            f"{runs.source}: no run {wanted!r}; available runs: {', '.join(available)}."
            + suggest(wanted, available)
        )
    return wanted
