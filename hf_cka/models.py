"""Model resolution: Hub ids or local folders, revisions pinned to commit shas, dtype, placement.

A model spec is a Hub repo id, a local folder, or ``"repo@revision"`` (branch, tag or commit
sha). Hub revisions are resolved to a commit sha FIRST and every file is then loaded at that sha,
so the weights, the tokenizer and the recorded provenance can never disagree.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed
from ._network import NETWORK_ERRORS
from .errors import (
    DeviceMismatchError,
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    RemoteCodeError,
)

ADAPTER_CONFIG = "adapter_config.json"
FINGERPRINT_FILE = "fingerprint.json"  # marks a per-model store (hf_cka.fingerprint)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class LoadedModel:
    """A model ready for feature extraction, with its preprocessor and provenance.

    A PEFT adapter shares its base model's module (one copy of the weights): the adapter side
    runs with its adapter active, the base side with every adapter disabled.
    """

    name: str
    revision: str | None
    commit_sha: str | None
    model: nn.Module
    processor: Any
    modality: str  # "text" or "image"
    peft: Any = None  # the PeftModel wrapping ``model``, once an adapter was loaded onto it
    adapter_name: str | None = None  # set on the adapter side only
    base: LoadedModel | None = None  # the base model of an adapter

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def feature_widths(self, layers: Sequence[str]) -> list[int] | None:
        """Width of each layer's pooled features: the hidden size of a transformer (``None``
        when the config does not say, e.g. a plain ``nn.Module``)."""
        width = getattr(getattr(self.model, "config", None), "hidden_size", None)
        return [int(width)] * len(layers) if isinstance(width, int) else None

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context for a forward pass of this side: its adapter on, or all adapters off."""
        if self.adapter_name is not None:
            self.base.peft.set_adapter(self.adapter_name)
            return contextlib.nullcontext()
        if self.peft is not None:
            return self.peft.disable_adapter()
        return contextlib.nullcontext()

    def provenance(self, suffix: str) -> dict[str, Any]:
        """Metadata entries (``model_a``, ``revision_a``, ``commit_sha_a`` ... for ``"a"``)."""
        info = {
            f"model_{suffix}": self.name,
            f"revision_{suffix}": self.revision,
            f"commit_sha_{suffix}": self.commit_sha,
        }
        if self.base is not None:
            info[f"adapter_{suffix}"] = self.name
            info[f"base_model_{suffix}"] = self.base.name
            info[f"base_commit_sha_{suffix}"] = self.base.commit_sha
        return info


def parse_model_spec(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split ``"repo@revision"``; an explicit ``revision`` wins only if the spec has none.

    A local path that exists is never split (folder names may contain ``@``).
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise InvalidInputError(f"expected a model id or local folder, got {spec!r}")
    spec = os.fspath(spec)
    if os.path.exists(spec) or "@" not in spec:
        return spec, revision
    name, _, at_revision = spec.rpartition("@")
    if revision is not None and revision != at_revision:
        raise InvalidInputError(
            f"got revision {revision!r} and '{spec}' naming revision {at_revision!r}; give one"
        )
    return name, at_revision


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """``None``/``"auto"`` -> ``"auto"`` (the checkpoint's dtype); names -> ``torch.dtype``."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise InvalidInputError(f"expected dtype in {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[key]


def resolve_commit(
    name: str, revision: str | None, token: str | bool | None
) -> tuple[str | None, set[str]]:
    """Commit sha of ``revision`` of ``name`` and the repo's file names.

    A local folder has no sha (``None``) and lists its own files.
    """
    if os.path.isdir(name):
        return None, set(os.listdir(name))
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(name, revision=revision, token=token)
    except RevisionNotFoundError as err:
        raise ModelNotFoundError(
            f"revision {revision!r} not found in model repo '{name}'; pass an existing branch, "
            "tag or commit sha"
        ) from err
    except (RepositoryNotFoundError, HFValidationError) as err:
        raise ModelNotFoundError(
            f"'{name}' is neither a local folder nor a model repo on the Hub (or it is private: "
            "pass token=...); check the id or the path"
        ) from err
    except NETWORK_ERRORS as err:  # offline: the local cache may still hold the model
        warnings.warn(
            f"could not reach the Hub to resolve '{name}' ({type(err).__name__}); loading it "
            "from the local cache, without a commit sha in the provenance",
            UserWarning,
            stacklevel=3,
        )
        cached = try_to_load_from_cache(name, ADAPTER_CONFIG, revision=revision)
        return None, {ADAPTER_CONFIG} if isinstance(cached, str) else set()
    return info.sha, {sibling.rfilename for sibling in info.siblings or []}


class ModelLoader:
    """Loads models for one comparison, each distinct (id, commit) once.

    The same id and revision asked twice returns the same :class:`LoadedModel` (so a model
    compared with itself runs once per batch); an adapter whose base is already loaded is put on
    that base's module instead of loading a second copy of the weights.

    Args:
        dtype: ``None``/``"auto"`` keeps the checkpoint dtype; e.g. ``"bfloat16"``.
        device: a single device to move models to.
        device_map: accelerate placement (``"auto"`` or an explicit map) for big models;
            exclusive with ``device``.
        trust_remote_code: allow code from a repo to run (off by default).
        token: Hub token; used for downloads, never stored in results.
    """

    def __init__(
        self,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        trust_remote_code: bool = False,
        token: str | bool | None = None,
    ) -> None:
        if device is not None and device_map is not None:
            raise DeviceMismatchError(
                f"got device={device!r} and device_map={device_map!r}; use device for one device "
                "or device_map to spread the model over several"
            )
        self.dtype = resolve_dtype(dtype)
        if device is None and device_map is None:  # under a launcher: this process's own GPU
            device = distributed.local_device()
        self.device, self.device_map = device, device_map
        self.trust_remote_code, self.token = trust_remote_code, token
        self._loaded: dict[tuple[str, str | None], LoadedModel] = {}

    def load(self, spec: str, revision: str | None = None) -> LoadedModel:
        """Load ``spec`` (Hub id, local folder or ``"repo@revision"``), adapters included."""
        name, revision = parse_model_spec(spec, revision)
        commit, files = resolve_commit(name, revision, self.token)
        key = (os.path.abspath(name) if os.path.isdir(name) else name, commit or revision)
        if key not in self._loaded:
            if ADAPTER_CONFIG in files:
                self._loaded[key] = self._load_adapter(name, revision, commit)
            else:
                self._loaded[key] = self._load_full(name, revision, commit)
        return self._loaded[key]

    def _common(self, revision: str | None) -> dict[str, Any]:
        return {
            "revision": revision,
            "token": self.token,
            "trust_remote_code": self.trust_remote_code,
        }

    def _load_full(self, name: str, revision: str | None, commit: str | None) -> LoadedModel:
        from transformers import AutoModel

        common = self._common(commit or revision)
        try:
            model = AutoModel.from_pretrained(
                name, dtype=self.dtype, device_map=self.device_map, **common
            )
        except ValueError as err:
            if "trust_remote_code" in str(err):
                raise RemoteCodeError(
                    f"'{name}' ships its own modelling code, which hf_cka does not run unless "
                    "asked: review the repo, then pass trust_remote_code=True "
                    "(--trust-remote-code)"
                ) from err
            raise
        except (OSError, *NETWORK_ERRORS) as err:
            raise ModelNotFoundError(
                f"could not load model '{name}' ({err}); check the id, your network or "
                "HF_HUB_OFFLINE, and that the model is in the local cache when offline"
            ) from err
        if self.device is not None:
            model.to(self.device)
        model.eval()
        main_input = getattr(model, "main_input_name", "input_ids")
        modality = "image" if main_input == "pixel_values" else "text"
        processor = _load_processor(name, modality, common)
        return LoadedModel(name, revision, commit, model, processor, modality)

    def _load_adapter(self, name: str, revision: str | None, commit: str | None) -> LoadedModel:
        """Put the PEFT adapter ``name`` on its base model (loaded once, shared)."""
        try:
            from peft import PeftConfig, PeftModel
        except ImportError as err:
            raise MissingDependencyError(
                f"'{name}' is a PEFT adapter; loading it needs the peft library: "
                "pip install 'hf_cka[peft]'"
            ) from err
        config = PeftConfig.from_pretrained(name, revision=commit or revision, token=self.token)
        if not config.base_model_name_or_path:
            raise ModelNotFoundError(
                f"adapter '{name}' does not name its base model (base_model_name_or_path in "
                f"{ADAPTER_CONFIG}); compare it by passing the base model explicitly"
            )
        base = self.load(config.base_model_name_or_path, config.revision)
        adapter_name = f"adapter_{len([m for m in self._loaded.values() if m.base is base])}"
        source = {"revision": commit or revision, "token": self.token}
        if base.peft is None:
            base.peft = PeftModel.from_pretrained(
                base.model, name, adapter_name=adapter_name, **source
            )
        else:
            base.peft.load_adapter(name, adapter_name=adapter_name, **source)
        base.peft.eval()
        return LoadedModel(
            name=name,
            revision=revision,
            commit_sha=commit,
            model=base.model,
            processor=base.processor,
            modality=base.modality,
            adapter_name=adapter_name,
            base=base,
        )


def is_fingerprint(spec: Any, revision: str | None = None, token: str | bool | None = None) -> bool:
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


def load_model(spec: str, *, revision: str | None = None, **options: Any) -> LoadedModel:
    """Load one model (see :class:`ModelLoader` for the options)."""
    return ModelLoader(**options).load(spec, revision)


def _load_processor(name: str, modality: str, common: dict[str, Any]) -> Any:
    """Tokenizer (right padding, with a pad token) or image processor of ``name``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        if modality == "image":
            return AutoImageProcessor.from_pretrained(name, **common)
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"found no {'image processor' if modality == 'image' else 'tokenizer'} for '{name}' "
            f"({err}); save one next to the model"
        ) from err
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Right padding and a pad token, without touching the model's embeddings.

    Right padding keeps every real token's position ids and (for causal models) its attention
    context unchanged. A tokenizer without a pad token borrows eos, unk or bos: the pad id only
    has to be a valid embedding row, since the attention mask hides it and pooling skips it.
    """
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        borrowed = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if borrowed is None:
            borrowed = tokenizer.convert_ids_to_tokens(0)
        tokenizer.pad_token = borrowed
    return tokenizer
