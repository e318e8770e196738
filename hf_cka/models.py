"""Model resolution: Hub ids or local folders, revisions pinned to commit shas, dtype, placement.

A model spec is a Hub repo id, a local folder, or ``"repo@revision"`` (branch, tag or commit
sha). Hub revisions are resolved to a commit sha FIRST and every file is then loaded at that sha,
so the weights, the tokenizer and the recorded provenance can never disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import DeviceMismatchError, InvalidInputError, ModelNotFoundError, RemoteCodeError

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
    """A model ready for feature extraction, with its preprocessor and provenance."""

    name: str
    revision: str | None
    commit_sha: str | None
    model: nn.Module
    processor: Any
    modality: str  # "text" or "image"

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


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


def resolve_commit(name: str, revision: str | None, token: str | bool | None) -> str | None:
    """Commit sha of ``revision`` of Hub repo ``name``; ``None`` for local folders."""
    if os.path.isdir(name):
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return HfApi().model_info(name, revision=revision, token=token).sha
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


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    token: str | bool | None = None,
) -> LoadedModel:
    """Load a base model (``AutoModel``) and its tokenizer or image processor.

    Args:
        spec: Hub id, local folder, or ``"repo@revision"``.
        revision: branch, tag or commit sha (alternative to ``@``).
        dtype: ``None``/``"auto"`` keeps the checkpoint dtype; e.g. ``"bfloat16"``.
        device: a single device to move the model to.
        device_map: accelerate placement (``"auto"`` or an explicit map) for big models;
            exclusive with ``device``.
        trust_remote_code: allow code from the repo to run (off by default).
        token: Hub token; never stored.
    """
    from transformers import AutoModel

    if device is not None and device_map is not None:
        raise DeviceMismatchError(
            f"got device={device!r} and device_map={device_map!r}; use device for one device or "
            "device_map to spread the model over several"
        )
    name, revision = parse_model_spec(spec, revision)
    commit = resolve_commit(name, revision, token)
    common = {"revision": commit or revision, "token": token, "trust_remote_code": trust_remote_code}
    try:
        model = AutoModel.from_pretrained(
            name, dtype=resolve_dtype(dtype), device_map=device_map, **common
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise RemoteCodeError(
                f"'{name}' ships its own modelling code, which hf_cka does not run unless asked: "
                "review the repo, then pass trust_remote_code=True (--trust-remote-code)"
            ) from err
        raise
    except OSError as err:
        raise ModelNotFoundError(f"could not load model '{name}' ({err})") from err
    if device is not None:
        model.to(device)
    model.eval()
    modality = "image" if getattr(model, "main_input_name", "input_ids") == "pixel_values" else "text"
    processor = _load_processor(name, modality, common)
    return LoadedModel(name, revision, commit, model, processor, modality)


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
