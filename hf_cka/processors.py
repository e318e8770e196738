"""A model's preprocessors and input modality: its tokenizer (right padding, with a pad token),
image processor or feature extractor, or both processors of a two-tower (CLIP-style) model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ModelNotFoundError
from .layers import TOWERS

AUDIO_INPUTS = ("input_features", "input_values")  # Whisper-style mels, wav2vec2-style waveforms


def input_modality(model: nn.Module) -> str:
    """``"image"``, ``"audio"`` or ``"text"``: what the model's main input is made from."""
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "pixel_values":
        return "image"
    return "audio" if main_input in AUDIO_INPUTS else "text"


def is_two_tower(model: nn.Module) -> bool:
    """Whether ``model`` has a vision and a text tower (CLIP, SigLIP): its config has both."""
    config = getattr(model, "config", None)
    return all(getattr(config, f"{part}_config", None) is not None for part in TOWERS)


@dataclass
class TowerProcessors:
    """The preprocessors of a two-tower model: each tower reads its own (``None``: not saved)."""

    image_processor: Any
    tokenizer: Any


def load_processor(
    name: str, modality: str, common: dict[str, Any], *, two_towers: bool = False
) -> Any:
    """Tokenizer (right padding, with a pad token), image processor or feature extractor of
    ``name``; for a two-tower model both its image processor and its tokenizer (either may be
    missing: the tower that needs it refuses, see :meth:`hf_cka.models.LoadedModel.tower`)."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    loaders: dict[str, Any] = {
        "image": AutoImageProcessor,
        "audio": AutoFeatureExtractor,
        "text": AutoTokenizer,
    }
    labels = {"image": "image processor", "audio": "feature extractor", "text": "tokenizer"}
    if two_towers:
        found = {}
        for kind in ("image", "text"):
            try:
                found[kind] = loaders[kind].from_pretrained(name, **common)
            except (OSError, ValueError):
                found[kind] = None
        if found["image"] is None and found["text"] is None:
            raise ModelNotFoundError(
                f"found neither an image processor nor a tokenizer for the two-tower model "
                f"'{name}'; save its processor (e.g. CLIPProcessor) next to the model",
                model_id=name,
                revision=common.get("revision"),
            )
        return TowerProcessors(found["image"], found["text"])
    try:
        processor = loaders[modality].from_pretrained(name, **common)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"found no {labels[modality]} for '{name}' ({err}); save one next to the model",
            model_id=name,
            revision=common.get("revision"),
        ) from err
    return prepare_tokenizer(processor) if modality == "text" else processor


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
