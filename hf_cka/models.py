"""Model loading: weights at the resolved commit, dtype, placement, adapters and preprocessors.

:class:`ModelLoader` resolves each spec with :mod:`hf_cka.model_files` (Hub ids or local folders,
revisions pinned to commit shas, file checks), then loads the model, its tokenizer or image
processor and any PEFT adapter at that commit, so that the weights, the tokenizer and the
recorded provenance can never disagree (the preprocessors come from :mod:`hf_cka.processors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed
from ._network import NETWORK_ERRORS
from .dtypes import resolve_dtype
from .errors import (
    DeviceMismatchError,
    DeviceNotAvailableError,
    InvalidInputError,
    MissingDependencyError,
    ModelFormatError,
    ModelNotFoundError,
    RemoteCodeError,
    WeightsFileError,
)
from .layers import TOWERS, find_blocks
from .model_files import (
    ADAPTER_CONFIG,
    check_model_files,
    first_line,
    parse_model_spec,
    resolve_commit,
)
from .processors import input_modality, is_two_tower, load_processor, prepare_tokenizer
from .provenance import ModelProvenance
from .tokens import HubToken

LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, *NETWORK_ERRORS)
"""A model that cannot be read from disk or fetched from the Hub."""
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class LoadedModel:
    """A model ready for feature extraction, with its preprocessor and provenance.

    A PEFT adapter shares its base model's module (one copy of the weights): the adapter side
    runs with its adapter active, the base side with every adapter disabled. A tower of a
    CLIP-style model (:meth:`tower`) shares the model too: it runs only that tower's forward,
    on its part of the processor.
    """

    name: str
    revision: str | None
    commit_sha: str | None
    model: nn.Module
    processor: Any
    modality: str  # "text", "image" or "audio"
    peft: Any = None  # the PeftModel wrapping ``model``, once an adapter was loaded onto it
    adapter_name: str | None = None  # set on the adapter side only
    base: LoadedModel | None = None  # the base model of an adapter
    part: str | None = None  # "vision" or "text" on a tower of a two-tower model
    tower_path: str | None = None  # the module running that tower (``"vision_model"``)
    _towers: dict[str, LoadedModel] = field(default_factory=dict, init=False, repr=False)

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def tower(self, part: str) -> LoadedModel:
        """This model restricted to its ``"vision"`` or ``"text"`` tower, when it has both
        (CLIP, SigLIP); else (another part, or a single-stack model) the model itself.

        The tower runs alone (``model.vision_model(pixel_values=...)``, ``model.text_model(
        input_ids=..., attention_mask=...)``: the module above its blocks) on its part of the
        processor (the image processor or the tokenizer). One view per part, so a tower asked
        twice is one model with one forward pass per batch.

        Raises:
            ModelNotFoundError: the processor saved with the model lacks that tower's part.
            InvalidInputError: the other tower asked of a tower.
        """
        if part not in TOWERS or not is_two_tower(self.model) or part == self.part:
            return self
        if self.part is not None:
            raise InvalidInputError(
                f"this is the {self.part} tower of '{self.name}', got part={part!r}; take the "
                "other tower from the whole model"
            )
        if part not in self._towers:
            attribute = "image_processor" if part == "vision" else "tokenizer"
            processor = getattr(self.processor, attribute, None)
            if processor is None:
                needed = "an image processor" if part == "vision" else "a tokenizer"
                raise ModelNotFoundError(
                    f"the {part} tower of '{self.name}' needs {needed}, but none was saved with "
                    "the model; save the model's full processor (e.g. CLIPProcessor) next to it",
                    model_id=self.name,
                    revision=self.revision,
                )
            self._towers[part] = dataclasses.replace(
                self,
                processor=prepare_tokenizer(processor) if part == "text" else processor,
                modality="image" if part == "vision" else "text",
                part=part,
                tower_path=find_blocks(self.model, part).split(".")[0],  # type: ignore[arg-type]
            )
        return self._towers[part]

    def feature_widths(self, layers: Sequence[str]) -> list[int] | None:
        """Width of each layer's pooled features: the hidden size of a transformer, of its tower
        for a tower (``None`` when the config does not say, e.g. a plain ``nn.Module``)."""
        config = getattr(self.model, "config", None)
        if self.part is not None:
            config = getattr(config, f"{self.part}_config", None)
        width = getattr(config, "hidden_size", None)
        return [int(width)] * len(layers) if isinstance(width, int) else None

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context for a forward pass of this side: its adapter on, or all adapters off."""
        if self.adapter_name is not None:
            assert self.base is not None and self.base.peft is not None  # set with adapter_name
            self.base.peft.set_adapter(self.adapter_name)
            return contextlib.nullcontext()
        if self.peft is not None:
            return self.peft.disable_adapter()
        return contextlib.nullcontext()

    def provenance(self) -> ModelProvenance:
        """Which weights this side ran: name, revision and commit (and base, for an adapter)."""
        base = self.base
        return ModelProvenance(
            name=self.name,
            revision=self.revision,
            commit_sha=self.commit_sha,
            part=self.part,
            base_model=None if base is None else base.name,
            base_commit_sha=None if base is None else base.commit_sha,
        )


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that exists on this machine (``None`` stays ``None``).

    Raises:
        DeviceNotAvailableError: not a device name (``"tpu9"``), or a device this machine lacks
            (``"cuda"`` without CUDA, ``"cuda:3"`` with one GPU). Checked before any weights
            are read.
    """
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceNotAvailableError(
            f"expected a torch device such as 'cpu', 'cuda', 'cuda:1' or 'mps', got {device!r}; "
            "pass one of those, or no device to stay on the CPU"
        ) from err
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "meta":
        raise DeviceNotAvailableError(
            "device 'meta' holds no data, so a model on it cannot compute features; pass a real "
            "device such as 'cpu' or 'cuda'"
        )
    try:  # a zero-size allocation is the one check every backend (cuda, mps, xpu...) answers
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as err:  # torch asserts when built without CUDA
        raise DeviceNotAvailableError(
            f"device '{resolved}' is not available on this machine ({first_line(err)}); pass "
            f"an available device (e.g. 'cpu'{_visible_gpus()}), or no device to stay on the CPU"
        ) from err
    return resolved


def check_device_map(device_map: str | dict | None) -> str | dict | None:
    """``device_map`` unchanged when it is a placement strategy, a device that exists on this
    machine, or a dict (checked by accelerate); else :class:`DeviceNotAvailableError`."""
    if device_map is None or isinstance(device_map, dict) or device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if not isinstance(device_map, str):
        raise DeviceNotAvailableError(
            f"expected device_map as one of {DEVICE_MAP_STRATEGIES}, a device or a dict, got "
            f"{type(device_map).__name__}"
        )
    try:
        resolve_device(device_map)
    except DeviceNotAvailableError as err:
        raise DeviceNotAvailableError(
            f"expected device_map in {DEVICE_MAP_STRATEGIES} or an available device, got "
            f"{device_map!r}: {str(err).split(';')[0]}"
        ) from err
    return device_map


def _visible_gpus() -> str:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "".join(f", 'cuda:{i}'" for i in range(min(count, 4)))


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
        token: HubToken = None,
    ) -> None:
        if device is not None and device_map is not None:
            raise DeviceMismatchError(
                f"got device={device!r} and device_map={device_map!r}; use device for one device "
                "or device_map to spread the model over several"
            )
        self.dtype = resolve_dtype(dtype)
        if device is None and device_map is None:  # under a launcher: this process's own GPU
            device = distributed.local_device()
        self.device, self.device_map = resolve_device(device), check_device_map(device_map)
        self.trust_remote_code, self.token = trust_remote_code, token
        self._loaded: dict[tuple[str, str | None], LoadedModel] = {}

    def load(self, spec: str, revision: str | None = None) -> LoadedModel:
        """Load ``spec`` (Hub id, local folder or ``"repo@revision"``), adapters included."""
        name, revision = parse_model_spec(spec, revision)
        commit, files = resolve_commit(name, revision, self.token)
        local = os.path.isdir(name)
        key = (os.path.abspath(name) if local else name, commit or revision)
        if key not in self._loaded:
            check_model_files(name, files, local)
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
        from safetensors import SafetensorError
        from transformers import AutoModel

        common = self._common(commit or revision)
        try:  # use_safetensors: never fall back to unpickling pytorch_model.bin
            model = AutoModel.from_pretrained(
                name, dtype=self.dtype, device_map=self.device_map, use_safetensors=True, **common
            )
        except SafetensorError as err:
            raise WeightsFileError(
                f"the weights of model '{name}' are damaged or truncated ({first_line(err)}); "
                "expected complete safetensors files: download or save the model again"
            ) from err
        except ValueError as err:
            if "trust_remote_code" in str(err):
                raise RemoteCodeError(
                    f"'{name}' ships its own modelling code, which hf_cka does not run unless "
                    "asked: review the repo, then pass trust_remote_code=True "
                    "(--trust-remote-code)"
                ) from err
            raise ModelFormatError(
                f"transformers could not build a model from '{name}' ({first_line(err)}); "
                "check its config.json (model_type, architectures) and the dtype/device_map given"
            ) from err
        except LOAD_ERRORS as err:
            if os.path.isdir(name):
                raise ModelNotFoundError(
                    f"could not load the model folder '{name}' ({first_line(err)}); check its "
                    "config.json and weights, or save the model again",
                    model_id=name,
                    revision=revision,
                ) from err
            raise ModelNotFoundError(
                f"could not load model '{name}' ({err}); check the id, your network or "
                "HF_HUB_OFFLINE, and that the model is in the local cache when offline",
                model_id=name,
                revision=revision,
            ) from err
        if self.device is not None:
            model.to(self.device)
        model.eval()
        modality = input_modality(model)
        processor = load_processor(name, modality, common, two_towers=is_two_tower(model))
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
        try:
            config = PeftConfig.from_pretrained(name, revision=commit or revision, token=self.token)
        except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            raise ModelFormatError(
                f"the {ADAPTER_CONFIG} of adapter '{name}' is unreadable ({first_line(err)}); "
                "expected the file peft's save_pretrained writes: save the adapter again"
            ) from err
        if not config.base_model_name_or_path:
            raise ModelNotFoundError(
                f"adapter '{name}' does not name its base model (base_model_name_or_path in "
                f"{ADAPTER_CONFIG}); compare it by passing the base model explicitly",
                model_id=name,
                revision=revision,
            )
        try:
            base = self.load(config.base_model_name_or_path, config.revision)
        except ModelNotFoundError as err:
            raise ModelNotFoundError(
                f"adapter '{name}' names the base model '{config.base_model_name_or_path}' "
                f"(base_model_name_or_path in its {ADAPTER_CONFIG}), which was not found: {err}",
                model_id=name,
                revision=revision,
            ) from err
        adapter_name = f"adapter_{len([m for m in self._loaded.values() if m.base is base])}"
        at = commit or revision
        if base.peft is None:
            base.peft = PeftModel.from_pretrained(
                base.model, name, adapter_name=adapter_name, revision=at, token=self.token
            )
        else:
            base.peft.load_adapter(name, adapter_name=adapter_name, revision=at, token=self.token)
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


def load_model(spec: str, *, revision: str | None = None, **options: Any) -> LoadedModel:
    """Load one model (see :class:`ModelLoader` for the options)."""
    return ModelLoader(**options).load(spec, revision)
