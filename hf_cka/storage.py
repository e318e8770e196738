"""Results on disk: ids, atomic folders and validated JSON/safetensors files.

A saved result is a folder whose *own* files (``result.json`` and ``tensors.safetensors``, or
``drift.json`` and one sub-folder per checkpoint) are written to a temporary sibling first and
then moved into place, so an interrupted save never leaves a half-written result. Files that a
result does not write (notes, figures) are left alone when a result is saved over an earlier one.
Nothing is pickled.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load, save

from hf_cka.errors import InvalidInputError, ResultFormatError
from hf_cka.model_files import FINGERPRINT_FILE
from hf_cka.shards import SHARDS_DIR

SCHEMA_NAME = "hf_cka.CKAResult"
DRIFT_SCHEMA_NAME = "hf_cka.DriftResult"
SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
TENSORS_FILE = "tensors.safetensors"
DRIFT_FILE = "drift.json"
GRID_FILE = "grid.json"  # hf_cka.grid.GridResult
GRID_PLOT_FILE = "grid.png"
FINGERPRINT_TENSORS_FILE = "fingerprint.safetensors"  # hf_cka.fingerprint.Fingerprint
FINGERPRINT_CARD_FILE = "README.md"
DEFAULT_LOCAL_ROOT = Path("cka-results")
OPTIONAL_TENSORS = ("stderr", "null")
RUN_ID = re.compile(r"[A-Za-z]\w{0,63}", re.ASCII)

_RESERVED_RUN_IDS = frozenset({"all"})  # a reserved split name in datasets
_FOLDER_NAME = re.compile(r"\d{2,}-[A-Za-z0-9._-]{0,64}", re.ASCII)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+", re.ASCII)


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
        or not RUN_ID.fullmatch(run_id)
        or run_id.lower() in _RESERVED_RUN_IDS
    ):
        raise InvalidInputError(
            f"invalid run id {run_id!r}: expected 1-64 ASCII letters, digits or underscores"
            " starting with a letter (e.g. 'r20261128T174455Z_3f9a'), and not 'all'"
        )
    return run_id


def checked_run_id(run_id: Any, source: Any) -> str:
    """:func:`validate_run_id` for an id read from ``source`` (a file)."""
    try:
        return validate_run_id(run_id)
    except InvalidInputError as err:
        raise ResultFormatError(f"{source}: {err}") from err


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


def checkpoint_folders(checkpoints: Iterable[str]) -> list[str]:
    """Sub-folder names of a drift's checkpoints: ``01-<spec>``, ``02-<spec>``, ...

    The spec (``org/model@step-100``, ``./out/checkpoint-500``) is reduced to ASCII letters,
    digits, ``. _ -`` (at most 64), and the 1-based index makes each name unique and ordered.
    """
    names = list(checkpoints)
    width = max(2, len(str(len(names))))
    return [
        f"{index:0{width}d}-{_UNSAFE.sub('-', name).strip('-.')[-64:].lstrip('-.')}"
        for index, name in enumerate(names, start=1)
    ]


def checked_folder_name(name: Any, source: Any) -> str:
    """A drift sub-folder name read from ``source``: an index and a sanitized spec, no path."""
    if not isinstance(name, str) or not _FOLDER_NAME.fullmatch(name) or ".." in name:
        raise ResultFormatError(
            f"{source}: invalid checkpoint folder {name!r}; expected e.g. '01-step-100'"
        )
    return name


def utc_now() -> str:
    """The current UTC time, ISO 8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def created_key(created_at: Any) -> datetime:
    """Sort key of a ``created_at`` ISO string (naive means UTC; unparsable sorts first)."""
    try:
        moment = datetime.fromisoformat(str(created_at))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def json_text(value: Any, what: str) -> str:
    """``value`` as JSON text.

    Raises:
        InvalidInputError: ``value`` is not JSON-serialisable.
    """
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(
            f"{what} must be JSON-serialisable (str, numbers, bools, None, lists, dicts): {err}"
        ) from err


# --------------------------------------------------------------------------- atomic folders


def holds_result(folder: Path) -> bool:
    """Whether ``folder`` holds a saved CKAResult, DriftResult, GridResult or Fingerprint (or
    the shards of an unfinished one)."""
    indexes = (RESULT_FILE, DRIFT_FILE, GRID_FILE)
    return any((folder / name).is_file() for name in indexes) or bool(_fingerprint_files(folder))


def _owned_entries(folder: Path) -> set[str]:
    """Names of the entries of ``folder`` written by the result saved there (if any)."""
    for index, extras in ((DRIFT_FILE, ()), (GRID_FILE, (GRID_PLOT_FILE,))):
        if not (folder / index).is_file():
            continue
        try:
            doc = json.loads((folder / index).read_text(encoding="utf-8"))
            subfolders = doc.get("folders") or doc.get("runs") or []
        except (OSError, ValueError, AttributeError):
            subfolders = []
        safe = {name for name in subfolders if isinstance(name, str) and "/" not in name}
        return {index, *extras, *(name for name in safe if name not in {".", ".."})}
    if (folder / RESULT_FILE).is_file():
        return {RESULT_FILE, TENSORS_FILE}
    return _fingerprint_files(folder)


def _fingerprint_files(folder: Path) -> set[str]:
    """Names of the entries of ``folder`` that a fingerprint (and its shards) wrote, if any."""
    if not (folder / FINGERPRINT_FILE).is_file() and not (folder / SHARDS_DIR).is_dir():
        return set()
    return {FINGERPRINT_FILE, FINGERPRINT_TENSORS_FILE, FINGERPRINT_CARD_FILE, SHARDS_DIR}


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder whose entries replace the result saved in ``target``.

    ``target`` may be missing, empty, or hold an earlier result. A missing ``target`` is
    created by renaming the temporary folder. Otherwise the entries of the earlier result are
    first moved aside into a sibling ``.<target>.<hex>.previous`` folder, then the written ones
    are moved in (the ``*.json`` that names the result last), all by rename; every other file
    in ``target`` (notes, figures) stays. An error in between moves the earlier result back; a
    process killed in between leaves it whole in the ``.previous`` folder, which
    :func:`previous_results` finds and a failed load names. On any error before the moves
    ``target`` is untouched.

    Raises:
        InvalidInputError: ``target`` is a file, or a non-empty folder that holds no result.
    """
    if target.exists() and not target.is_dir():
        raise InvalidInputError(
            f"cannot save a result to {target}: it exists and is not a folder; choose a folder"
        )
    if target.is_dir() and any(target.iterdir()) and not holds_result(target):
        raise InvalidInputError(
            f"refusing to save into {target}: it is a non-empty folder that holds no hf_cka"
            " result; choose a new or empty folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        yield staging
        if not target.exists():
            staging.rename(target)
            return
        _swap(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, target: Path) -> None:
    """Move the earlier result of ``target`` aside, the entries of ``staging`` in (JSON last),
    then drop the earlier one; on an error, put the earlier result back."""
    previous = target.parent / f".{target.name}.{secrets.token_hex(4)}.previous"
    previous.mkdir()
    moved: list[str] = []
    written = sorted((p.name for p in staging.iterdir()), key=lambda n: (n.endswith(".json"), n))
    try:
        for name in sorted(_owned_entries(target)):
            if (target / name).exists() or (target / name).is_symlink():
                (target / name).rename(previous / name)
        for name in written:
            (staging / name).rename(target / name)
            moved.append(name)
    except BaseException:
        for name in moved:  # back to the earlier result, as it was
            (target / name).rename(staging / name)
        for entry in previous.iterdir():
            entry.rename(target / entry.name)
        previous.rmdir()
        raise
    shutil.rmtree(previous, ignore_errors=True)


def previous_results(target: Path) -> list[Path]:
    """The earlier results a killed :func:`atomic_folder` save into ``target`` left aside."""
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.*.previous"))


@contextmanager
def naming_previous(folder: Path) -> Iterator[None]:
    """Re-raise a ``ResultFormatError`` of a read of ``folder`` saying where a killed save left
    the earlier result, when one did."""
    try:
        yield
    except ResultFormatError as err:
        if not (left := previous_results(folder)):
            raise
        raise ResultFormatError(
            f"{err} -- a save into {folder} was interrupted: the earlier result is whole in "
            f"{left[-1]}; move its entries back into {folder} to restore it, or save again"
        ) from err


# --------------------------------------------------------------------------- validated reads


def read_json(path: Path, schema: str) -> dict[str, Any]:
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


def field(doc: Mapping[str, Any], key: str, kind: type, source: Any) -> Any:
    """``doc[key]`` checked to be a ``kind`` (lists: of strings)."""
    if key not in doc:
        raise ResultFormatError(f"{source}: missing required key {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ResultFormatError(
            f"{source}: {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise ResultFormatError(f"{source}: {key!r} must be a list of strings")
    return value


def write_result(
    folder: Path, document: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Write ``tensors.safetensors`` and ``result.json`` (``document`` and the tensors' sha256)
    into ``folder`` (created).

    Raises:
        InvalidInputError: ``document`` is not JSON-serialisable (nothing is written).
    """
    json_text(document, "metadata")
    folder.mkdir(exist_ok=True)
    digest = write_tensors(folder / TENSORS_FILE, tensors)
    text = json_text({**document, "tensors_sha256": digest}, "metadata")
    (folder / RESULT_FILE).write_text(text, encoding="utf-8")


def read_result(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The validated ``result.json`` of ``folder`` and its tensors.

    Raises:
        ResultFormatError: a file is missing or malformed (schema, version, key, type, run id,
            tensor dtype, shape or sha256).
    """
    path = folder / RESULT_FILE
    doc = read_json(path, SCHEMA_NAME)
    for key, kind in (("layers_a", list), ("layers_b", list), ("metadata", dict)):
        field(doc, key, kind, path)
    checked_run_id(doc["metadata"].get("run_id"), path)
    digest = doc.get("tensors_sha256")  # absent in results saved before it was recorded
    shape = (len(doc["layers_a"]), len(doc["layers_b"]))
    tensors = read_tensors(
        folder / TENSORS_FILE, shape, digest if isinstance(digest, str) else None
    )
    for key in ("model_a", "model_b"):
        field(doc, key, str, path)
    return doc, tensors


def read_drift(folder: Path) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The validated ``drift.json`` of ``folder`` and its (sub-folder, run id) pairs.

    Drifts saved before sub-folders were named by checkpoint name them by run id.
    """
    path = folder / DRIFT_FILE
    doc = read_json(path, DRIFT_SCHEMA_NAME)
    runs = [checked_run_id(run_id, path) for run_id in field(doc, "runs", list, path)]
    folders = (
        [checked_folder_name(name, path) for name in field(doc, "folders", list, path)]
        if "folders" in doc
        else runs
    )
    if len(folders) != len(runs):
        raise ResultFormatError(f"{path}: {len(folders)} folders for {len(runs)} runs")
    for key, kind in (("base", str), ("checkpoints", list), ("metadata", dict)):
        field(doc, key, kind, path)
    return doc, list(zip(folders, runs, strict=True))


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write ``tensors`` as safetensors (mode ``0o666 & ~umask``, like every file saved).

    Returns:
        The sha256 hex digest of the file's bytes.
    """
    data = save({name: tensor.contiguous() for name, tensor in tensors.items()},
                metadata={"schema": SCHEMA_NAME})  # fmt: skip
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_tensors(
    path: Path, shape: tuple[int, int], sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: float64 ``matrix`` and optional ``stderr``, ``null``.

    Args:
        path: The safetensors file.
        shape: The shape every tensor must have.
        sha256: The digest the file must have (recorded by :func:`write_tensors`), if known.
    """
    if not path.is_file():
        raise ResultFormatError(f"{path}: file not found; expected a folder written by save()")
    data = path.read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as err:
        raise ResultFormatError(f"{path}: not a readable safetensors file ({err})") from err
    if "matrix" not in tensors:
        raise ResultFormatError(f"{path}: missing tensor 'matrix'")
    if unknown := set(tensors) - {"matrix", *OPTIONAL_TENSORS}:
        raise ResultFormatError(f"{path}: unexpected tensors {sorted(unknown)}")
    for name in ("matrix", *OPTIONAL_TENSORS):
        tensor = tensors.get(name)
        if tensor is None:
            continue
        if tensor.dtype != torch.float64 or tuple(tensor.shape) != shape:
            raise ResultFormatError(
                f"{path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected"
                f" torch.float64 {shape} to match the layer lists in {RESULT_FILE}"
            )
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ResultFormatError(
            f"{path}: its sha256 differs from the one in {RESULT_FILE} (a file of another save);"
            " save the result again"
        )
    return tensors
