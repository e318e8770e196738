"""Model resolution: which files a model spec names, before any weights are read.

A model spec is a Hub repo id, a local folder, or ``"repo@revision"`` (branch, tag or commit
sha). Hub revisions are resolved to a commit sha FIRST (:func:`resolve_commit`) and every file is
then loaded at that sha, so the weights, the tokenizer and the recorded provenance can never
disagree. :func:`check_model_files` refuses, from the file list alone, a folder that is not a
saved model and weights stored only as pickles. :func:`is_fingerprint` tells a per-model store
(:mod:`hf_cka.fingerprint`) that stands in for a model. Loading is :mod:`hf_cka.models`.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

from ._network import NETWORK_ERRORS
from .errors import (
    InvalidInputError,
    ModelNotFoundError,
    UnsafeWeightsError,
    WeightsFileError,
    suggest_paths,
)
from .tokens import HubToken, clean_token

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
CONFIG_FILES = (MODEL_CONFIG, ADAPTER_CONFIG)  # one of them marks a saved model or adapter
FINGERPRINT_FILE = "fingerprint.json"  # marks a per-model store (hf_cka.fingerprint)
PICKLE_WEIGHTS = re.compile(r"(pytorch_model.*\.bin(\.index\.json)?|adapter_model\.bin)")


def parse_model_spec(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split ``"repo@revision"``; an explicit ``revision`` wins only if the spec has none.

    A local path that exists is never split (folder names may contain ``@``).
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise InvalidInputError(f"expected a model id or local folder, got {spec!r}")
    spec = os.fspath(spec)
    check_revision(revision, spec)
    if os.path.exists(spec) or "@" not in spec:
        return spec, revision
    name, _, at_revision = spec.rpartition("@")
    if not name.strip():
        raise InvalidInputError(
            f"expected a model id before '@' in '{spec}', got nothing; write 'org/model@revision'"
        )
    check_revision(at_revision, spec)
    if revision is not None and revision != at_revision:
        raise InvalidInputError(
            f"got revision {revision!r} and '{spec}' naming revision {at_revision!r}; give one"
        )
    return name, at_revision


def check_revision(revision: str | None, spec: str) -> None:
    """Refuse a revision that is empty or not a string (``"repo@"``, ``revision=""``)."""
    if revision is None or (isinstance(revision, str) and revision.strip()):
        return
    raise InvalidInputError(
        f"a revision may not be empty: expected a branch, tag or commit sha (a string), got "
        f"revision {revision!r} for '{spec}'; write e.g. 'org/model@main', or give no revision "
        "for the default branch"
    )


def http_status(err: Exception) -> int | None:
    """HTTP status of a Hub error (``None`` without a response)."""
    return getattr(getattr(err, "response", None), "status_code", None)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def resolve_commit(name: str, revision: str | None, token: HubToken) -> tuple[str | None, set[str]]:
    """Commit sha of ``revision`` of ``name`` and the repo's file names.

    A local folder has no sha (``None``) and lists its own files. When the Hub cannot be
    reached, a cached model gives the sha and the files of its cached snapshot.

    Raises:
        ModelNotFoundError: ``name`` is neither a local folder nor a reachable (or cached) Hub
            repo; the message suggests close local folder names.
        InvalidInputError: a revision was given for a local folder.
    """

    def not_found(message: str) -> ModelNotFoundError:
        return ModelNotFoundError(message, model_id=name, revision=revision)

    if os.path.isdir(name):
        if revision is not None:
            raise InvalidInputError(
                f"'{name}' is a local folder, which has no revisions, got revision "
                f"{revision!r}; drop the revision, or name a Hub repo"
            )
        return None, set(os.listdir(name))
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    if os.path.exists(name):
        raise not_found(
            f"'{name}' is a file; expected a model folder (holding config.json and the weights) "
            "or a Hub repo id: pass the folder that holds it"
        )
    missing = f"no local folder '{name}' (looked for {os.path.abspath(name)})"
    try:
        validate_repo_id(name)
    except HFValidationError as err:  # a path, not an id: never ask the Hub about it
        raise not_found(
            f"{missing}, and '{name}' is not a Hub repo id either; check the path."
            f"{suggest_paths(name, folders_only=True)}"
        ) from err
    try:
        info = HfApi().model_info(name, revision=revision, token=token)
    except RevisionNotFoundError as err:
        raise not_found(
            f"revision {revision!r} not found in model repo '{name}'; pass an existing branch, "
            "tag or commit sha"
        ) from err
    except GatedRepoError as err:
        raise not_found(
            f"model repo '{name}' is gated: accept its conditions on its Hub page, then pass "
            "token=... (--token) of the account that accepted them"
        ) from err
    except (RepositoryNotFoundError, HfHubHTTPError) as err:
        if isinstance(err, RepositoryNotFoundError) or http_status(err) == 404:
            raise not_found(
                f"{missing} and no model repo '{name}' on the Hub (or it is private: pass "
                f"token=...); check the path or the id.{suggest_paths(name, folders_only=True)}"
            ) from err
        raise not_found(
            f"the Hub answered HTTP {http_status(err)} when looking up model repo '{name}' "
            f"({first_line(err)}); check token=... for a private repo, or retry later"
        ) from err
    except NETWORK_ERRORS as err:  # offline: the local cache may still hold the model
        cached = [try_to_load_from_cache(name, f, revision=revision) for f in CONFIG_FILES]
        snapshot = next((os.path.dirname(c) for c in cached if isinstance(c, str)), None)
        if snapshot is None:
            raise not_found(
                f"{missing}, and the Hub could not be reached ({type(err).__name__}) to look for "
                f"a model repo '{name}', which is not in the local cache either; check the path, "
                f"or your network and HF_HUB_OFFLINE.{suggest_paths(name, folders_only=True)}"
            ) from err
        commit = os.path.basename(snapshot)  # the cache names each snapshot by its commit sha
        warnings.warn(
            f"could not reach the Hub to resolve '{name}' ({type(err).__name__}); loading it "
            f"from the local cache, at the cached commit {commit}",
            UserWarning,
            stacklevel=3,
        )
        return commit, set(os.listdir(snapshot))
    return info.sha, {sibling.rfilename for sibling in info.siblings or []}


def check_model_files(name: str, files: set[str], local: bool) -> None:
    """Refuse, before any weights are read, a model whose files cannot be loaded safely.

    Raises:
        ModelNotFoundError: no ``config.json`` (not a saved model).
        UnsafeWeightsError: weights only as pickles (``pytorch_model.bin``): never unpickled.
        WeightsFileError: a local ``*.safetensors`` file is truncated or damaged.
    """
    top = {f for f in files if "/" not in f}
    where = "folder" if local else "model repo"
    if not top & set(CONFIG_FILES):
        raise ModelNotFoundError(
            f"the {where} '{name}' holds no {MODEL_CONFIG}, so it is not a saved model; expected "
            "a folder written by model.save_pretrained(folder) (or a model repo id)",
            model_id=name,
        )
    safetensors = sorted(f for f in top if f.endswith(".safetensors"))
    pickles = sorted(f for f in top if PICKLE_WEIGHTS.fullmatch(f))
    if not safetensors and pickles:
        raise UnsafeWeightsError(
            f"the {where} '{name}' holds its weights only as pickles ({', '.join(pickles)}), "
            "which hf_cka never unpickles (a pickle can run code); expected model.safetensors: "
            "if you trust the file, load the model yourself and save it with "
            "model.save_pretrained(folder, safe_serialization=True), then compare that folder"
        )
    for file in safetensors if local else ():
        _check_safetensors(os.path.join(name, file))


def _check_safetensors(path: str) -> None:
    """Open ``path``'s header (memory-mapped, no tensor read) to catch truncation or damage."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise WeightsFileError(
            f"the weights file '{path}' is damaged or truncated ({first_line(err)}); expected "
            "a complete safetensors file: download or save the model again"
        ) from err


def is_fingerprint(spec: Any, revision: str | None = None, token: HubToken = None) -> bool:
    """Whether ``spec`` names a fingerprint (:mod:`hf_cka.fingerprint`) rather than a model: a
    local folder holding ``fingerprint.json``, or a Hub dataset repo with that file."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        return False
    if os.path.isdir(spec):
        return os.path.isfile(os.path.join(spec, FINGERPRINT_FILE))
    from huggingface_hub import file_exists
    from huggingface_hub.errors import HFValidationError

    unreachable: tuple[type[BaseException], ...] = (HFValidationError, OSError, *NETWORK_ERRORS)
    try:
        return file_exists(
            str(spec), FINGERPRINT_FILE, repo_type="dataset", revision=revision, token=token
        )
    except unreachable:  # not a repo id, or offline
        return False


def names_fingerprint(spec: str | None, revision: str | None, token: HubToken) -> bool:
    """Whether a model spec (``"repo@revision"`` allowed; ``None``: no model) names a
    fingerprint, see :func:`is_fingerprint`."""
    if spec is None:
        return False
    name, revision = parse_model_spec(spec, revision)
    return is_fingerprint(name, revision, clean_token(token))
