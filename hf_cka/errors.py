"""Typed exceptions and warnings of hf_cka.

Every exception derives from :class:`HfCkaError` and from the builtin a caller would already
catch (``KeyError`` for an unknown name, ``ValueError`` for bad input, ...). Messages say what
was expected, what was got and what to do about it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence


class HfCkaError(Exception):
    """Base class of every error raised by hf_cka."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(HfCkaError, OSError):
    """A model id, local folder or revision could not be resolved.

    Attributes:
        model_id: The Hub repo id or local folder asked for.
        revision: The revision asked for (None: the default branch, or a local folder).
    """

    def __init__(self, message: str, *, model_id: str = "", revision: str | None = None) -> None:
        super().__init__(message)
        self.model_id, self.revision = model_id, revision


class RemoteCodeError(HfCkaError, ValueError):
    """A checkpoint needs ``trust_remote_code=True`` and the user did not opt in."""


class MissingDependencyError(HfCkaError, ImportError):
    """An optional dependency (for instance ``peft``) is not installed."""


class LayerNotFoundError(HfCkaError, KeyError):
    """A requested layer name or index does not exist in the model.

    Attributes:
        layer: The layer name or index asked for (None: no list of blocks was found).
        available: What could have been asked for instead: the model's module names, its
            default layers (for an index), or its top-level modules.
    """

    def __init__(
        self, message: str, *, layer: str | int | None = None, available: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.layer, self.available = layer, list(available)


class LayerNotFiredError(HfCkaError, RuntimeError):
    """A selected layer produced no output during the forward pass."""


class ShapeMismatchError(HfCkaError, ValueError):
    """Tensors that must describe the same samples disagree in shape."""


class BatchTooSmallError(HfCkaError, ValueError):
    """A batch has fewer samples than the unbiased HSIC estimator needs (n >= 4)."""


class EmptyDataError(HfCkaError, ValueError):
    """The data source yielded no usable sample."""


class ColumnNotFoundError(HfCkaError, KeyError):
    """The requested text or image column is missing from a dataset."""


class InvalidInputError(HfCkaError, ValueError):
    """An argument or data item has the wrong type or value."""


class TokenizerMismatchError(HfCkaError, ValueError):
    """``pooling="tokens"`` was asked for models whose tokenizers differ."""


class NonFiniteActivationError(HfCkaError, FloatingPointError):
    """A layer produced NaN or Inf activations."""


class DeviceMismatchError(HfCkaError, RuntimeError):
    """Inputs, models or features are on devices that cannot be combined."""


class MemoryBudgetError(HfCkaError, MemoryError):
    """The requested estimator would need more memory than allowed."""


class ResultFormatError(HfCkaError, ValueError):
    """A saved or downloaded result is malformed or from an unknown schema."""


class HubPushError(HfCkaError, OSError):
    """Publishing a result to the Hub failed; the local copy is kept and named in the message.

    Attributes:
        repo_id: The dataset repository of the push.
        local_path: The folder holding the saved result.
    """

    def __init__(self, message: str, *, repo_id: str = "", local_path: str = "") -> None:
        super().__init__(message)
        self.repo_id, self.local_path = repo_id, local_path


class ConstantLayerWarning(UserWarning):
    """A layer has (numerically) zero variance on the data: its CKA cells are undefined (NaN)."""


class EstimatorWarning(UserWarning):
    """The chosen estimator is known to be biased for this data shape (e.g. biased CKA, n < d)."""


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean 'a' or 'b'?"`` for close matches of ``name``, or ``""``."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=n, cutoff=0.6)
    if not matches:
        return ""
    quoted = [f"'{m}'" for m in matches]
    return " Did you mean " + (" or ".join(quoted) if len(quoted) < 3 else ", ".join(quoted)) + "?"


def byte_size(n_bytes: float) -> str:
    """``n_bytes`` in the largest binary unit it fills: ``"512 B"``, ``"10.24 MiB"``, ``"3.05 GiB"``
    (a budget message must not read "needs 0.00 GiB, allows 0.00 GiB")."""
    size, unit = float(n_bytes), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, larger
    return f"{size:.0f} B" if unit == "B" else f"{size:.2f} {unit}"


# --- full-data similarity measures (hf_cka.measures) ---
class FullDataMemoryError(MemoryBudgetError):
    """A full-data measure would hold more pooled features than ``max_bytes`` allows."""


# --- reading results from the Hub (hf_cka.hub)


class HubReadError(HfCkaError, OSError):
    """A Hub dataset of results could not be read: unknown repo or revision, no access, offline.

    Attributes:
        repo_id: The dataset repository.
        revision: The revision asked for (None: the default branch).
    """

    def __init__(self, message: str, *, repo_id: str = "", revision: str | None = None) -> None:
        super().__init__(message)
        self.repo_id, self.revision = repo_id, revision


# --- models and data: weights, devices, data files and dataset parts (issue 13, item 4) ---


class WeightsFileError(HfCkaError, OSError):
    """A model's safetensors weights are damaged or truncated."""


class UnsafeWeightsError(HfCkaError, ValueError):
    """A model ships its weights only as pickles (``pytorch_model.bin``), which hf_cka never
    unpickles."""


class DeviceNotAvailableError(HfCkaError, RuntimeError):
    """The requested device is not a torch device, or is not available on this machine."""


class DataNotFoundError(HfCkaError, FileNotFoundError):
    """A data string names no existing file or folder and no reachable Hub dataset."""


class DataFormatError(HfCkaError, ValueError):
    """A data file or dataset exists but cannot be read (empty, malformed, wrong format)."""


class SplitNotFoundError(HfCkaError, KeyError):
    """A dataset has no split or config of the requested name; the message lists those it has."""


def suggest_paths(path: str, folders_only: bool = False) -> str:
    """``" Did you mean './minilm'?"`` for entries beside ``path`` with a close name, or ``""``.

    Only the last component is compared, so a long shared parent does not make every entry
    look close.
    """
    path = os.path.normpath(path)
    parent, base = os.path.split(path)
    try:
        entries = [
            e.name for e in os.scandir(parent or os.curdir) if not folders_only or e.is_dir()
        ]
    except OSError:
        return ""
    matches = difflib.get_close_matches(base, entries, n=3, cutoff=0.6)
    if not matches:
        return ""
    shown = [f"'{os.path.join(parent or os.curdir, m)}'" for m in matches]
    return f" Did you mean {' or '.join(shown)}?"


class ModelFormatError(HfCkaError, ValueError):
    """A model's files were found but do not describe a model transformers can build (e.g. a
    ``config.json`` without ``model_type``)."""


# ------------------------------------------------------------ fingerprints (issue 15, helper F)


class FingerprintMismatchError(HfCkaError, ValueError):
    """Two per-model stores (fingerprints) describe other samples, batches or settings."""


# --- paired columns and audio (issue 17) ---


class ColumnTypeError(HfCkaError, TypeError):
    """A data column holds values the model reading it cannot take (images into a text model,
    texts into a vision model); the message names the column and the model's input."""


# ------------------------------------------------------- extraction shards (issue 15, helper I)


class ShardDamagedError(ResultFormatError):
    """A shard of a (distributed or resumable) extraction does not match the sha256 its manifest
    records, or its manifest is malformed; the message names the shard."""
