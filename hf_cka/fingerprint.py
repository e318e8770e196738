"""Per-model stores ("fingerprints"): what minibatch CKA needs of ONE model, without the model.

A :class:`Fingerprint` holds, for every selected layer and every CKA batch ``b`` of ``n_b``
samples, the float64 squared distances ``D_ij = ||x_i - x_j||^2`` of the pooled (column-centred)
features -- the strict upper triangle, ``n_b (n_b - 1) / 2`` values. Both kernels follow from
``D`` exactly: the linear Gram of the centred features is ``-H D H / 2`` and the RBF Gram is
``exp(-D / (2 threshold^2 median(D)))`` (see :meth:`hf_cka.MinibatchCKA.update_from_distances`).
Optionally it also holds the pooled features themselves, for the exact estimators.

It records what makes two stores comparable: the batch composition (sizes and a sha256 digest
of each batch's samples), a digest of the sample list, the optional shuffle seed, pooling,
``max_length`` and the data's provenance; and the model's provenance (id, revision, commit sha,
dtype). Two stores whose records differ are refused by :func:`check_compatible`.

On disk (and in a Hub dataset repo) a fingerprint is ``fingerprint.json``,
``fingerprint.safetensors`` and a ``README.md`` card. Nothing is pickled; :meth:`Fingerprint.load`
validates the schema, the tensor shapes against the batch sizes and the sha256 of the tensors
file recorded in the JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from . import storage
from .errors import FingerprintMismatchError, InvalidInputError, ResultFormatError
from .model_files import FINGERPRINT_FILE
from .publishing import Publishable
from .storage import FINGERPRINT_CARD_FILE as CARD_FILE
from .storage import FINGERPRINT_TENSORS_FILE as TENSORS_FILE
from .tokens import HubToken, clean_token

if TYPE_CHECKING:
    from .hub import Operations

SCHEMA_NAME = "hf_cka.Fingerprint"
SCHEMA_VERSION = 1
# settings that must agree for two stores to describe the same CKA batches
_SAME_SETTINGS = ("pooling", "max_length", "shuffle_seed")


def triangle_size(n: int) -> int:
    """Number of strict upper-triangle entries of an ``n x n`` matrix."""
    return n * (n - 1) // 2


def upper_triangle(distances: torch.Tensor) -> torch.Tensor:
    """``(L, n, n)`` symmetric matrices -> their strict upper triangles ``(L, n (n - 1) / 2)``."""
    n = distances.shape[-1]
    rows, cols = torch.triu_indices(n, n, offset=1, device=distances.device)
    return distances[:, rows, cols]


def full_matrix(triangle: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`upper_triangle`: symmetric ``(L, n, n)`` with a zero diagonal."""
    out = triangle.new_zeros((triangle.shape[0], n, n))
    rows, cols = torch.triu_indices(n, n, offset=1, device=triangle.device)
    out[:, rows, cols] = triangle
    out[:, cols, rows] = triangle
    return out


@dataclass(eq=False, repr=False)
class Fingerprint(Publishable):
    """One model's per-batch squared distances (and optionally pooled features) on some data.

    Attributes:
        layers: the stored layers, in order.
        distances: float64 ``(L, sum_b n_b (n_b - 1) / 2)``: batch ``b``'s strict upper
            triangles, batch after batch.
        batch_sizes: samples per CKA batch, in order.
        batch_digests: hex sha256 of each batch's samples (:func:`hf_cka.checkpoint.batch_digest`).
        samples_digest: hex sha256 of the sample list in data order (before any shuffle).
        settings: ``pooling``, ``max_length``, ``batch_size``, ``shuffle_seed``,
            ``sort_by_length``.
        data: provenance of the data (``dataset``, ``dataset_config``, ``split``,
            ``data_revision`` ...).
        model: provenance of the model (``model``, ``revision``, ``commit_sha``, ``dtype`` ...).
        features: optional pooled features ``{layer: (n, d)}`` in data (batch) order.
        metadata: anything else (versions, ``created_at``, ``wall_time_s``).
    """

    layers: list[str]
    distances: torch.Tensor
    batch_sizes: list[int]
    batch_digests: list[str]
    samples_digest: str
    settings: dict[str, Any]
    data: dict[str, Any]
    model: dict[str, Any]
    features: dict[str, torch.Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_shapes(self.layers)

    def __repr__(self) -> str:
        return (
            f"Fingerprint(model={self.name!r}, layers={len(self.layers)}, "
            f"samples={self.n_samples}, batches={len(self.batch_sizes)}, "
            f"pooling={self.settings.get('pooling')!r}, features={self.features is not None})"
        )

    @property
    def name(self) -> str:
        """The model's name (Hub id or folder)."""
        return str(self.model.get("model"))

    @property
    def n_samples(self) -> int:
        return sum(self.batch_sizes)

    def _check_shapes(self, source: Any) -> None:
        """Tensor shapes must agree with the layers and the batch sizes."""
        expected = (len(self.layers), sum(triangle_size(n) for n in self.batch_sizes))
        if tuple(self.distances.shape) != expected or self.distances.dtype != torch.float64:
            raise ResultFormatError(
                f"{source}: distances are {self.distances.dtype} {tuple(self.distances.shape)}, "
                f"expected torch.float64 {expected} for {len(self.layers)} layers and batches "
                f"of {self.batch_sizes}"
            )
        if len(self.batch_digests) != len(self.batch_sizes) or min(self.batch_sizes) < 4:
            raise ResultFormatError(
                f"{source}: expected one digest per batch and batches of >= 4 samples, got "
                f"{len(self.batch_digests)} digests for batch sizes {self.batch_sizes}"
            )
        for layer, tensor in (self.features or {}).items():
            if layer not in self.layers or tensor.dim() != 2 or tensor.shape[0] != self.n_samples:
                raise ResultFormatError(
                    f"{source}: features of {layer!r} have shape {tuple(tensor.shape)}, expected "
                    f"({self.n_samples}, d) for one of the stored layers"
                )

    def batches(self, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Per CKA batch, the full ``(L, n_b, n_b)`` squared distances of ``layers`` (indices;
        default all)."""
        rows = self.distances if layers is None else self.distances[layers]
        out, offset = [], 0
        for n in self.batch_sizes:
            size = triangle_size(n)
            out.append(full_matrix(rows[:, offset : offset + size], n))
            offset += size
        return out

    def batch_features(self, layers: list[int]) -> list[list[torch.Tensor]]:
        """Per CKA batch, the stored features of ``layers`` (indices) for that batch's rows.

        Raises:
            InvalidInputError: the fingerprint was made without ``features=True``.
        """
        if self.features is None:
            raise InvalidInputError(
                f"the fingerprint of '{self.name}' holds no pooled features, which the exact "
                "estimators and the measures other than CKA need; make it with features=True "
                "(--features), or use estimator='minibatch' and measure='cka'"
            )
        columns = [self.features[self.layers[i]] for i in layers]
        out, start = [], 0
        for n in self.batch_sizes:
            out.append([f[start : start + n] for f in columns])
            start += n
        return out

    def layer_features(self, layers: str | Sequence[Any] = "auto") -> dict[str, torch.Tensor]:
        """The stored ``(n, d)`` features of ``layers`` over all samples, in batch order.

        Raises:
            InvalidInputError: the fingerprint was made without ``features=True``.
        """
        indices = self.layer_indices(layers)
        rows = self.batch_features(indices)
        return {self.layers[i]: torch.cat([b[k] for b in rows]) for k, i in enumerate(indices)}

    def layer_indices(self, layers: str | Sequence[Any] = "auto") -> list[int]:
        """Indices of ``layers`` (``"auto"``: all; else stored names or integer indices).

        Raises:
            InvalidInputError: a layer is not stored in this fingerprint.
        """
        if isinstance(layers, str) and layers == "auto":
            return list(range(len(self.layers)))
        indices = []
        for layer in [layers] if isinstance(layers, (str, int)) else layers:
            if isinstance(layer, int) and -len(self.layers) <= layer < len(self.layers):
                indices.append(layer % len(self.layers))
            elif layer in self.layers:
                indices.append(self.layers.index(layer))
            else:
                raise InvalidInputError(
                    f"layer {layer!r} is not stored in the fingerprint of '{self.name}', which "
                    f"holds {self.layers}; pick among them (or make a new fingerprint)"
                )
        return indices

    # ----------------------------------------------------------------------- files
    def _document(self, tensors_sha256: str) -> dict[str, Any]:
        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "layers": self.layers,
            "batch_sizes": self.batch_sizes,
            "batch_digests": self.batch_digests,
            "samples_digest": self.samples_digest,
            "settings": self.settings,
            "data": self.data,
            "model": self.model,
            "has_features": self.features is not None,
            "tensors_sha256": tensors_sha256,
            "metadata": self.metadata,
        }

    def _files(self) -> dict[str, bytes]:
        """The files of a saved fingerprint, by name."""
        from .cards import render_fingerprint_card

        tensors = {"distances": self.distances.contiguous()}
        for index, layer in enumerate(self.layers):
            if self.features is not None and layer in self.features:
                tensors[f"features.{index}"] = self.features[layer].contiguous().cpu()
        blob = save(tensors, metadata={"schema": SCHEMA_NAME})
        document = self._document(hashlib.sha256(blob).hexdigest())
        return {
            FINGERPRINT_FILE: json.dumps(document, indent=1).encode("utf-8"),
            TENSORS_FILE: blob,
            CARD_FILE: render_fingerprint_card(self).encode("utf-8"),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the fingerprint to ``directory`` atomically and return it.

        As :meth:`hf_cka.CKAResult.save` (:func:`hf_cka.storage.atomic_folder`): a folder that
        holds an earlier fingerprint, or the extraction shards of this one (``shards/``), is
        replaced -- the shards are removed -- and other files there stay; every process that
        calls it writes.

        Raises:
            InvalidInputError: ``directory`` is a file, or a non-empty folder without a result.
        """
        folder = Path(directory)
        files = self._files()
        with storage.atomic_folder(folder) as staging:
            for name in (TENSORS_FILE, CARD_FILE, FINGERPRINT_FILE):
                (staging / name).write_bytes(files[name])
        return folder

    @classmethod
    def load(cls, directory: str | Path) -> Fingerprint:
        """Load and validate a fingerprint written by :meth:`save`.

        Raises:
            ResultFormatError: a file is missing or malformed, of another schema, or the tensors
                file does not have the sha256 recorded in the JSON (naming where a killed save
                left the earlier fingerprint, if one did).
        """
        folder = Path(directory)
        with storage.naming_previous(folder):
            try:
                document = (folder / FINGERPRINT_FILE).read_bytes()
                blob = (folder / TENSORS_FILE).read_bytes()
            except OSError as err:
                raise ResultFormatError(
                    f"{folder}: not a fingerprint folder ({err}); expected {FINGERPRINT_FILE} "
                    f"and {TENSORS_FILE} written by Fingerprint.save"
                ) from err
            return cls._from_bytes(document, blob, folder)

    @classmethod
    def _from_bytes(cls, document: bytes, blob: bytes, source: Any) -> Fingerprint:
        try:
            doc = json.loads(document.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ResultFormatError(f"{source}: {FINGERPRINT_FILE} is not JSON ({err})") from err
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
            raise ResultFormatError(
                f"{source}: expected schema {SCHEMA_NAME!r}, got "
                f"{doc.get('schema') if isinstance(doc, dict) else type(doc).__name__!r}"
            )
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise ResultFormatError(
                f"{source}: unsupported schema_version {doc.get('schema_version')!r}; this "
                f"hf_cka reads version {SCHEMA_VERSION} (upgrade hf_cka for newer ones)"
            )
        if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
            raise ResultFormatError(
                f"{source}: {TENSORS_FILE} does not have the sha256 recorded in "
                f"{FINGERPRINT_FILE} (damaged or replaced); download or extract it again"
            )
        try:
            tensors = load(blob)
            layers = [str(layer) for layer in doc["layers"]]
            features = {
                layer: tensors[f"features.{i}"]
                for i, layer in enumerate(layers)
                if f"features.{i}" in tensors
            }
            fingerprint = cls(
                layers=layers,
                distances=tensors["distances"],
                batch_sizes=[int(n) for n in doc["batch_sizes"]],
                batch_digests=[str(d) for d in doc["batch_digests"]],
                samples_digest=str(doc["samples_digest"]),
                settings=dict(doc["settings"]),
                data=dict(doc["data"]),
                model=dict(doc["model"]),
                features=features if doc.get("has_features") else None,
                metadata=dict(doc.get("metadata") or {}),
            )
        except (SafetensorError, KeyError, TypeError, ValueError) as err:
            raise ResultFormatError(f"{source}: malformed fingerprint ({err!r})") from err
        fingerprint._check_shapes(source)
        return fingerprint

    # ----------------------------------------------------------------------- Hub
    def _holds_this(self, folder: Path) -> bool:
        """Whether ``folder`` holds this fingerprint: the same records and tensors (compared in
        memory; nothing is serialised)."""
        if not (folder / FINGERPRINT_FILE).is_file():
            return False
        try:
            saved = Fingerprint.load(folder)
        except ResultFormatError:
            return False
        mine, theirs = self.features or {}, saved.features or {}
        return (
            json.loads(json.dumps(self._document(""))) == saved._document("")  # tuples as lists
            and torch.equal(saved.distances, self.distances)
            and mine.keys() == theirs.keys()
            and all(torch.equal(theirs[layer], mine[layer].cpu()) for layer in mine)
        )

    def _default_folder(self) -> Path:
        return default_folder(self.name)

    def _commit(self, repo_id: str, token: HubToken) -> Operations:
        from .hub import operations

        files = self._files()
        return lambda api: (operations(files), None)

    def _commit_message(self) -> str:
        return f"Add the hf_cka fingerprint of {self.name}"

    def _pushed_what(self) -> str:
        return f"the fingerprint of {self.name!r}"

    @classmethod
    def from_hub(
        cls, repo_id: str, *, revision: str | None = None, token: HubToken = None
    ) -> Fingerprint:
        """Download and validate the fingerprint of the Hub dataset ``repo_id``."""
        from huggingface_hub import hf_hub_download

        paths = {
            name: hf_hub_download(
                repo_id, name, repo_type="dataset", revision=revision, token=clean_token(token)
            )
            for name in (FINGERPRINT_FILE, TENSORS_FILE)
        }
        fingerprint = cls._from_bytes(
            Path(paths[FINGERPRINT_FILE]).read_bytes(),
            Path(paths[TENSORS_FILE]).read_bytes(),
            f"Hub dataset '{repo_id}'",
        )
        fingerprint.metadata["source"] = repo_id
        return fingerprint


def default_folder(model: str) -> Path:
    """Where a fingerprint of ``model`` is saved by default: ``./cka-fingerprints/<model>/``,
    every run of characters other than letters, digits, ``.`` and ``-`` made ``--`` and leading
    or trailing dots and dashes dropped (``org/bert`` -> ``org--bert``, ``./bert`` -> ``bert``,
    never a hidden folder)."""
    return Path("cka-fingerprints") / (re.sub(r"[^\w.-]+", "--", model).strip(".-") or "model")


def load_fingerprint(
    source: str | Path, revision: str | None = None, token: HubToken = None
) -> Fingerprint:
    """A fingerprint from a local folder, else from the Hub dataset repo ``source``."""
    if Path(source, FINGERPRINT_FILE).is_file():
        return Fingerprint.load(source)
    return Fingerprint.from_hub(str(source), revision=revision, token=token)


def check_settings(reference: Fingerprint, settings: Mapping[str, Any], other: str) -> None:
    """Refuse to pair ``reference`` with a store of ``other`` made with other ``settings``.

    Raises:
        FingerprintMismatchError: ``pooling``, ``max_length`` or ``shuffle_seed`` differ.
    """
    for key in _SAME_SETTINGS:
        if key in settings and reference.settings.get(key) != settings[key]:
            raise FingerprintMismatchError(
                f"the fingerprint of '{reference.name}' was extracted with "
                f"{key}={reference.settings.get(key)!r} and '{other}' with {settings[key]!r}; "
                f"use {key}={reference.settings.get(key)!r} for both"
            )


def check_compatible(a: Fingerprint, b: Fingerprint) -> None:
    """Refuse two stores that do not describe the same CKA batches.

    Raises:
        FingerprintMismatchError: naming the first difference (pooling, ``max_length``,
            shuffle seed, data revision, sample list, batch composition, a batch's samples).
    """
    names = f"'{a.name}' and '{b.name}'"
    check_settings(a, b.settings, b.name)
    revisions = a.data.get("data_revision"), b.data.get("data_revision")
    if None not in revisions and revisions[0] != revisions[1]:
        raise FingerprintMismatchError(
            f"{names} were extracted from other revisions of the data "
            f"({a.data.get('dataset')!r} at {revisions[0]!r} and {b.data.get('dataset')!r} at "
            f"{revisions[1]!r}); extract both from the same revision"
        )
    if a.samples_digest != b.samples_digest:
        raise FingerprintMismatchError(
            f"{names} were extracted from other samples ({a.n_samples} samples of "
            f"{a.data.get('dataset')!r} and {b.n_samples} of {b.data.get('dataset')!r}, "
            "different contents); pass the same data and num_samples to both"
        )
    if a.batch_sizes != b.batch_sizes:
        raise FingerprintMismatchError(
            f"{names} have other batch compositions ({len(a.batch_sizes)} batches of "
            f"{a.settings.get('batch_size')} and {len(b.batch_sizes)} of "
            f"{b.settings.get('batch_size')}); extract both with the same batch_size"
        )
    for index, (left, right) in enumerate(zip(a.batch_digests, b.batch_digests, strict=True)):
        if left != right:
            raise FingerprintMismatchError(
                f"{names} hold other samples in CKA batch {index}; extract both with the same "
                "data order and shuffle_seed"
            )
