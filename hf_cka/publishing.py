"""``push_to_hub``, one path for every result and for fingerprints: a local copy, then one commit.

A :class:`Publishable` first saves itself (unless the folder given already holds it), so a push
that fails for good loses nothing; then :func:`hf_cka.hub.commit` creates the dataset repo if
missing and commits, retrying conflicts and transient failures. Nothing heavy is imported until
a push: :mod:`hf_cka.hub` (pyarrow, huggingface_hub) is imported by :meth:`push_to_hub`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .storage import validate_repo_id
from .tokens import HubToken, clean_token

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .hub import Operations


class Publishable:
    """Something saved to a folder and pushed to a Hub dataset in one commit.

    A subclass saves itself (:meth:`save`), recognises a folder that already holds it
    (:meth:`_holds_this`), names its default folder (:meth:`_default_folder`) and builds its
    commit (:meth:`_commit`, :meth:`_commit_message`, :meth:`_pushed_what`).
    """

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def _holds_this(self, folder: Path) -> bool:
        raise NotImplementedError

    def _default_folder(self) -> Path:
        raise NotImplementedError

    def _commit(self, repo_id: str, token: HubToken) -> Operations:
        """The commit to ``repo_id``: its files are serialised once, here; the function returned
        is called at each attempt."""
        raise NotImplementedError

    def _commit_message(self) -> str:
        raise NotImplementedError

    def _pushed_what(self) -> str:
        """What a push publishes, for its error message (``"3 run(s)"``)."""
        raise NotImplementedError

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: HubToken = None,
        commit_message: str | None = None,
        local_dir: str | Path | None = None,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
    ) -> CommitInfo:
        """Save a local copy, then publish to the Hub dataset ``repo_id`` in one commit.

        A result adds its run(s) and keeps the runs already there: per run
        ``data/scores/<run_id>.parquet``, ``data/runs/<run_id>.parquet`` and
        ``plots/<run_id>.png``, and it rewrites ``README.md`` and the index of runs
        (:func:`hf_cka.hub.run_commit`); a concurrent push is detected and the commit
        rebuilt. A fingerprint writes ``fingerprint.json``, ``fingerprint.safetensors`` and its
        ``README.md``, replacing an earlier fingerprint in that repo. Conflicts, HTTP
        408/429/5xx and network errors are retried up to ``max_attempts`` times, waiting
        ``backoff_s * 2**k`` seconds (with jitter) before retry ``k + 1``
        (:func:`hf_cka.hub.commit`).

        Args:
            repo_id: Dataset repository, created if missing.
            private: Visibility of a newly created repository (None: the Hub default).
            token: Hub token (surrounding whitespace is ignored); None uses the saved login or
                ``HF_TOKEN``. Never written anywhere.
            commit_message: Defaults to ``"Add CKA run <run_id>"`` (or drift, grid,
                fingerprint).
            local_dir: Where to save the local copy first (default ``./cka-results/<id>/``,
                for a fingerprint ``./cka-fingerprints/<model>/``); a folder that already holds
                this very result is kept as it is.
            max_attempts: Attempts before giving up.
            backoff_s: Base wait between attempts, in seconds.

        Returns:
            The commit (a ``str``: its URL).

        Raises:
            InvalidInputError: ``repo_id`` is not a valid repository id (nothing is saved).
            HubPushError: the push failed for good; ``local_path`` names the local copy.
        """
        from . import hub

        validate_repo_id(repo_id)
        local = self._local_copy(local_dir)
        cleaned = clean_token(token)
        return hub.commit(
            repo_id,
            self._commit(repo_id, cleaned),
            what=self._pushed_what(),
            local_copy=local,
            private=private,
            token=cleaned,
            commit_message=commit_message or self._commit_message(),
            max_attempts=max_attempts,
            backoff_s=backoff_s,
        )

    def _local_copy(self, local_dir: str | Path | None) -> Path:
        """``local_dir`` as it is when it already holds this very object, else a fresh save."""
        if local_dir is not None and self._holds_this(Path(local_dir)):
            return Path(local_dir)
        return self.save(local_dir if local_dir is not None else self._default_folder())
