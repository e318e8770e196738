"""Runs in a Hub dataset repository: the table schemas, the index, reads, and the retrying commit
(:func:`commit`) that every push goes through, fingerprints' too.

A repository of type ``dataset`` collects runs:

- ``data/scores/<run_id>.parquet``: one row per layer pair (config ``scores``),
- ``data/runs/<run_id>.parquet``: one row per run, layers and metadata as JSON (config ``runs``),
- ``plots/<run_id>.png``: the heatmap,
- ``hf_cka_index.json``: one small entry per run (ids, models, ``created_at``, metadata), so
  that a push (which rewrites the card) and picking the latest run read one file instead of
  every run's parquet; repositories written without it are read run by run,
- ``README.md``: the dataset card listing every run.

Both configs have one split, ``train``, holding the rows of every run, so that a second push
adds a run and ``datasets.load_dataset(repo_id, "scores")`` returns all of them. This module
knows tables and records, not result classes: :mod:`hf_cka.result` converts.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_cka._network import NETWORK_ERRORS, advice, retry_reason
from hf_cka.cards import render_dataset_card
from hf_cka.errors import HubPushError, HubReadError, InvalidInputError, ResultFormatError
from hf_cka.storage import RUN_ID, SCHEMA_VERSION, created_key, field
from hf_cka.tokens import HubToken, scrub

logger = logging.getLogger(__name__)


class HubRead(TypedDict, total=False):
    """Which state of a Hub dataset ``from_hub`` reads, and with which token.

    Attributes:
        revision: a branch, tag or commit sha of the repository (unset or None: the default
            branch).
        token: a :data:`~hf_cka.tokens.HubToken` (unset or None: the saved login or
            ``HF_TOKEN``).
    """

    revision: str | None
    token: HubToken


INDEX_FILE = "hf_cka_index.json"
INDEX_SCHEMA = "hf_cka.HubIndex"
_RUNS_FILE = re.compile(r"data/runs/([^/]+)\.parquet")
_PUSH_ERRORS: tuple[type[BaseException], ...] = (OSError, ResultFormatError, *NETWORK_ERRORS)
_SUMMARY_KEYS = ("run_id", "model_a", "model_b", "created_at", "num_layers_a", "num_layers_b")


def _columns(kind: pa.DataType, *names: str) -> list[tuple[str, pa.DataType]]:
    """Schema columns ``names``, all of type ``kind`` (in this order)."""
    return [(name, kind) for name in names]


SCORES_SCHEMA = pa.schema(
    _columns(pa.string(), "run_id", "model_a", "model_b", "layer_a", "layer_b")
    + _columns(pa.int64(), "index_a", "index_b")
    + _columns(pa.float64(), "cka", "stderr", "null")
)
RUNS_SCHEMA = pa.schema(
    _columns(pa.string(), "run_id", "model_a", "model_b", "created_at")
    + _columns(pa.int64(), "num_layers_a", "num_layers_b")
    + _columns(pa.bool_(), "has_stderr", "has_null")
    + _columns(pa.int64(), "schema_version")
    + _columns(pa.string(), "layers_a_json", "layers_b_json", "metadata_json")
)


@dataclass(frozen=True)
class HubRun:
    """One run as it is pushed.

    Attributes:
        record: Its row of the ``runs`` table (:data:`RUNS_SCHEMA`) plus the decoded
            ``metadata``.
        scores: Its ``scores`` table (:data:`SCORES_SCHEMA`).
        png: Its heatmap.
    """

    record: Mapping[str, Any]
    scores: pa.Table
    png: bytes

    @property
    def run_id(self) -> str:
        return str(self.record["run_id"])


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The index entry of a run record: what the card and run selection need."""
    return {**{key: record[key] for key in _SUMMARY_KEYS}, "metadata": record["metadata"]}


def newest(summaries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The latest run, by ``created_at`` then ``run_id``."""
    return max(summaries, key=lambda s: (created_key(s["created_at"]), s["run_id"]))


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- reading


@dataclass
class HubRuns:
    """The hf_cka runs of a Hub dataset at one pinned revision (reads only)."""

    api: HfApi
    repo_id: str
    revision: str | None
    token: HubToken

    @classmethod
    def pin(cls, api: HfApi, repo_id: str, revision: str | None, token: HubToken) -> HubRuns:
        """Resolve ``revision`` (default branch if None) to its commit so all reads agree."""
        sha = api.dataset_info(repo_id, revision=revision, token=token).sha
        return cls(api, repo_id, sha or revision, token)

    @property
    def source(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}"

    def _paths(self) -> list[str]:
        return self.api.list_repo_files(
            self.repo_id, repo_type="dataset", revision=self.revision, token=self.token
        )

    def run_ids(self, paths: Sequence[str] | None = None) -> list[str]:
        """Ids of the runs (names of ``data/runs/<run_id>.parquet``), sorted."""
        found = (_RUNS_FILE.fullmatch(path) for path in (paths or self._paths()))
        return sorted(m.group(1) for m in found if m and RUN_ID.fullmatch(m.group(1)))

    def checked_run_ids(self, paths: Sequence[str] | None = None) -> list[str]:
        """:meth:`run_ids`, raising when there is none."""
        if not (run_ids := self.run_ids(paths)):
            raise ResultFormatError(
                f"{self.source}: holds no hf_cka run (no data/runs/*.parquet); push a result"
                " there first, or check the repository id and revision"
            )
        return run_ids

    def _download(self, path: str) -> str:
        return hf_hub_download(
            self.repo_id, path, repo_type="dataset", revision=self.revision, token=self.token
        )

    def table(self, path: str) -> pa.Table:
        local = self._download(path)
        try:
            return pq.read_table(local)
        except (pa.ArrowException, OSError) as err:
            raise ResultFormatError(
                f"{self.source}/{path}: not a readable parquet file ({err})"
            ) from err

    def summaries(self, *, required: bool = True) -> list[dict[str, Any]]:
        """The index entry of every run, oldest id first.

        Reads the index and only the runs it lacks (all of them in a repository pushed by an
        older hf_cka), so the cost does not grow with the number of runs.
        """
        paths = self._paths()
        run_ids = self.checked_run_ids(paths) if required else self.run_ids(paths)
        index = self._index() if INDEX_FILE in paths else {}
        return [index.get(run_id) or summary(self.record(run_id)) for run_id in run_ids]

    def _index(self) -> dict[str, dict[str, Any]]:
        """The well-formed entries of the index file (a malformed file counts as empty)."""
        try:
            with open(self._download(INDEX_FILE), encoding="utf-8") as handle:
                doc = json.load(handle)
        except (ValueError, UnicodeDecodeError):
            logger.warning("%s/%s is not valid JSON; reading every run", self.source, INDEX_FILE)
            return {}
        runs = doc.get("runs") if isinstance(doc, dict) else None
        if not isinstance(runs, dict) or doc.get("schema") != INDEX_SCHEMA:
            return {}
        return {
            run_id: entry
            for run_id, entry in runs.items()
            if isinstance(entry, dict)
            and entry.get("run_id") == run_id
            and all(key in entry for key in _SUMMARY_KEYS)
            and isinstance(entry.get("metadata"), dict)
        }

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
            field(record, column.name, kind, source)
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

    def scores(self, run_id: str) -> tuple[pa.Table, str]:
        """The ``scores`` table of ``run_id`` and where it came from."""
        path = f"data/scores/{run_id}.parquet"
        return self.table(path), f"{self.source}/{path}"


def _decode_json(record: Mapping[str, Any], key: str, kind: type, source: str) -> Any:
    try:
        value = json.loads(record[key])
    except json.JSONDecodeError as err:
        raise ResultFormatError(f"{source}: column {key!r} is not valid JSON ({err})") from err
    return field({key: value}, key, kind, source)


@contextmanager
def reading(repo_id: str, revision: str | None, token: HubToken) -> Iterator[HfApi]:
    """Turn the Hub's errors while reading ``repo_id`` into one-line :class:`HubReadError`."""
    where = f"dataset repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        yield HfApi()
    except RevisionNotFoundError:
        raise HubReadError(
            f"revision {revision!r} not found in the dataset repo {repo_id!r}; pass an existing"
            " branch, tag or commit sha",
            repo_id=repo_id,
            revision=revision,
        ) from None
    except RepositoryNotFoundError:
        raise HubReadError(
            f"no dataset repo {repo_id!r} on the Hub (or it is private: pass token=... or log in"
            " with `hf auth login`); check the id",
            repo_id=repo_id,
            revision=revision,
        ) from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        what_to_do = (
            "check the token (token=..., HF_TOKEN or `hf auth login`) and your access to the repo"
            if status in (401, 403)
            else "try again later"
        )
        raise HubReadError(
            f"reading the {where} failed (HTTP {status}); {what_to_do}",
            repo_id=repo_id,
            revision=revision,
        ) from None
    except NETWORK_ERRORS as err:
        raise HubReadError(
            f"could not reach the Hub to read the {where}"
            f" ({scrub(f'{type(err).__name__}: {err}', token)}); {advice(err) or 'retry'}",
            repo_id=repo_id,
            revision=revision,
        ) from None


# --------------------------------------------------------------------------- pushing


Operations = Callable[[HfApi], tuple[list[CommitOperationAdd], str | None]]
"""One attempt's commit: its files, and the revision they were built on (None: any)."""


def run_commit(
    runs: Sequence[HubRun], repo_id: str, token: HubToken, extra_files: Mapping[str, bytes]
) -> Operations:
    """The commit that adds ``runs`` to ``repo_id``: per run ``data/scores/<run_id>.parquet``,
    ``data/runs/<run_id>.parquet`` and ``plots/<run_id>.png``, then ``extra_files`` (by repo
    path, such as a grid's clustered heatmap) -- serialised once, here -- and, at each attempt,
    ``README.md`` and the index rewritten over the runs the repo holds then."""
    files: dict[str, bytes] = {}
    for run in runs:
        row = {name: run.record[name] for name in RUNS_SCHEMA.names}
        files[f"data/scores/{run.run_id}.parquet"] = _parquet_bytes(run.scores)
        files[f"data/runs/{run.run_id}.parquet"] = _parquet_bytes(
            pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
        )
        files[f"plots/{run.run_id}.png"] = run.png
    files |= extra_files

    def attempt(api: HfApi) -> tuple[list[CommitOperationAdd], str | None]:
        existing = HubRuns.pin(api, repo_id, None, token)
        index = {entry["run_id"]: entry for entry in existing.summaries(required=False)}
        index.update((run.run_id, summary(run.record)) for run in runs)
        document = {"schema": INDEX_SCHEMA, "schema_version": SCHEMA_VERSION, "runs": index}
        card = str(render_dataset_card(repo_id, list(index.values()))).encode("utf-8")
        rewritten = {"README.md": card, INDEX_FILE: json.dumps(document).encode("utf-8")}
        return operations(files | rewritten), existing.revision

    return attempt


def operations(files: Mapping[str, bytes]) -> list[CommitOperationAdd]:
    """One ``CommitOperationAdd`` per file, by repo path."""
    return [CommitOperationAdd(path, data) for path, data in files.items()]


def commit(
    repo_id: str,
    build: Operations,
    *,
    what: str,
    local_copy: Path,
    private: bool | None,
    token: HubToken,
    commit_message: str,
    max_attempts: int,
    backoff_s: float,
) -> CommitInfo:
    """Create the dataset repo ``repo_id`` if missing and commit ``build(api)`` to it.

    ``build`` returns the files and the revision they were built on (None: any); the
    commit names that revision as its parent, so a concurrent push makes it fail with a
    conflict, and it is then rebuilt on the new head. Conflicts, HTTP 408/429/5xx and network
    errors are retried up to ``max_attempts`` times, waiting ``backoff_s * 2**k`` seconds (with
    jitter, at most 60 s) before retry ``k + 1``; other errors are not.

    Raises:
        InvalidInputError: ``max_attempts`` < 1.
        HubPushError: the push (of ``what``, as the message says) failed for good; it names
            ``local_copy`` and what to do.
    """
    if max_attempts < 1:
        raise InvalidInputError(f"max_attempts must be >= 1; got {max_attempts}")
    api = HfApi()
    attempt = 0
    while True:
        attempt += 1
        try:
            api.create_repo(
                repo_id, repo_type="dataset", private=private, exist_ok=True, token=token
            )
            files, parent = build(api)
            return api.create_commit(
                repo_id,
                files,
                commit_message=commit_message,
                repo_type="dataset",
                parent_commit=parent,
                token=token,
            )
        except _PUSH_ERRORS as err:
            reason = retry_reason(err)
            if reason is None or attempt == max_attempts:
                raise _push_error(err, what, repo_id, local_copy, attempt, token) from None
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


def _push_error(
    err: BaseException,
    what: str,
    repo_id: str,
    local_copy: Path,
    attempts: int,
    token: HubToken,
) -> HubPushError:
    """The one-line error of a failed push: the cause, the local copy and the fix."""
    local = local_copy.resolve()
    failure = scrub(f"{type(err).__name__}: {err}", token).replace("\n", " ")
    what_to_do = advice(err) or (
        f"once the Hub answers again, push the saved copy with `hf-cka push {local} {repo_id}`"
    )
    return HubPushError(
        f"pushing {what} to the Hub dataset {repo_id!r} failed after {attempts}"
        f" attempt(s): {failure}. It is saved locally in {local}; {what_to_do}.",
        repo_id=repo_id,
        local_path=str(local),
    )
