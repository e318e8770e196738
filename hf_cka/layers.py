"""Layer discovery and layer-name resolution.

The default layers of a model are its embedding output plus the output of every transformer
block, in depth order -- the same positions as ``output_hidden_states`` (index ``i`` is
``hidden_states[i]``), but taken from the blocks themselves so the last entry is the last
block's output, not a final norm. The blocks are the longest ``nn.ModuleList`` of modules of one
class (``encoder.layer`` in BERT/RoBERTa, ``transformer.layer`` in DistilBERT, ``h`` in GPT-2,
``layers`` in ViT/GPT-NeoX/Llama/Mistral/Qwen2, ``encoder.block`` in T5); encoder-decoder
models use their encoder unless ``part="decoder"``. The embedding output is recorded as the input
of the first block (``"encoder.layer.0:input"``), which is exactly what block 0 receives in every
family (T5 and GPT-2 apply dropout after the embedding lookup, Gemma scales it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, get_args

from torch import nn

from .errors import InvalidInputError, LayerNotFoundError, suggest

Part = Literal["encoder", "decoder", "vision", "text"]
PARTS: tuple[str, ...] = get_args(Part)
TOWERS = ("vision", "text")  # the parts that pick one tower of a CLIP-style model
LayerSpec = str | int

# A layer spec is a module path (``"encoder.layer.3"``: the module's output) or a module path with
# this suffix (``"encoder.layer.0:input"``: the hidden states entering the module).
INPUT_SUFFIX = ":input"
EMBEDDINGS_LABEL = "embeddings"


def split_spec(spec: str) -> tuple[str, bool]:
    """``"path:input"`` -> ``("path", True)``; ``"path"`` -> ``("path", False)``."""
    if spec.endswith(INPUT_SUFFIX):
        return spec[: -len(INPUT_SUFFIX)], True
    return spec, False


def display_name(spec: str) -> str:
    """Readable label of a layer spec: the input of a first block (``"encoder.layer.0:input"``,
    the embedding output in :func:`default_layers`) reads as ``"embeddings"``; any other spec is
    returned unchanged.
    """
    path, is_input = split_spec(spec)
    return EMBEDDINGS_LABEL if is_input and path.endswith(".0") else spec


# words of a module path (split at "." and "_") that mark a CLIP-style tower
_TOWER_WORDS = {"vision": ("vision", "visual"), "text": ("text", "language")}


def find_blocks(model: nn.Module, part: Part = "encoder") -> str:
    """Module path of the transformer blocks of ``model``.

    Picks the longest ``nn.ModuleList`` whose children all share one class, preferring lists
    whose blocks contain an attention module when there are any (so a wav2vec2 model's
    convolutional feature encoder never beats its transformer layers). Then, by ``part``:

    * ``"vision"`` / ``"text"``: only lists inside that tower of a CLIP-style model (a path
      word ``vision``/``visual``, or ``text``/``language``: ``vision_model.encoder.layers``),
      or every list of a model that is itself such a tower (its ``config.model_type`` names
      it: ``clip_vision_model``).
    * ``"encoder"`` (default) / ``"decoder"``: for models with both an encoder and a decoder
      (T5, Whisper), lists under a ``decoder`` path are skipped unless ``part="decoder"`` (and
      then only those are considered). A model with both a vision and a text tower needs
      ``part="vision"`` or ``part="text"``; a lone tower (``CLIPVisionModel``) takes either.

    Raises:
        InvalidInputError: an unknown ``part``, a tower the model does not have, or
            ``"encoder"``/``"decoder"`` for a model with two towers.
        LayerNotFoundError: no list of blocks exists; the message lists the top-level modules.
    """
    if part not in PARTS:
        raise InvalidInputError(f"expected part in {PARTS}, got {part!r}")
    label = type(model).__name__
    candidates = [
        (name, len(module))
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
    ]
    with_attention = [(n, k) for n, k in candidates if _has_attention(model.get_submodule(n))]
    candidates = with_attention or candidates
    towers = {
        tower: [(n, k) for n, k in candidates if _names_tower(n, tower)] for tower in _TOWER_WORDS
    }
    if part in towers:
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        if not _names_tower(model_type, part):  # else the model is that tower (CLIPVisionModel)
            candidates = towers[part]
        if not candidates:
            raise InvalidInputError(
                f"found no {part} tower in {label} (no block list under a path naming "
                f"{' or '.join(_TOWER_WORDS[part])}); use part='encoder' for single-stack models"
            )
    elif all(towers.values()):
        raise InvalidInputError(
            f"{label} has a vision and a text tower ({towers['vision'][0][0]}, "
            f"{towers['text'][0][0]}); pass part='vision' or part='text' (part_a/part_b in "
            f"compare) instead of {part!r}"
        )
    is_decoder = lambda name: "decoder" in name.split(".")  # noqa: E731
    has_decoder = any(is_decoder(name) for name, _ in candidates)
    if has_decoder and any(not is_decoder(name) for name, _ in candidates):
        candidates = [(n, k) for n, k in candidates if is_decoder(n) == (part == "decoder")]
    if not candidates:
        children = [name for name, _ in model.named_children()]
        raise LayerNotFoundError(
            f"found no list of transformer blocks in {label}; pass layer names "
            f"explicitly (top-level modules: {children})",
            available=children,
        )
    # longest list; among equals the outermost (shortest path), then the first registered
    return max(candidates, key=lambda item: (item[1], -item[0].count(".")))[0]


def _has_attention(blocks: nn.Module) -> bool:
    """Whether the first of ``blocks`` has a submodule named like ``attn`` or ``attention``."""
    first = next(iter(blocks.children()))
    words = (name.rsplit(".", 1)[-1].lower() for name, _ in first.named_modules())
    return any("attn" in word or "attention" in word for word in words)


def _names_tower(name: str, tower: str) -> bool:
    """Whether a word of a module path or model type (split at ``.``/``_``) names ``tower``."""
    return any(word in _TOWER_WORDS[tower] for word in re.split(r"[._]", name.lower()))


def default_layers(model: nn.Module, part: Part = "encoder") -> list[str]:
    """Embedding output plus every block output: ``[blocks.0:input, blocks.0, ..., blocks.L-1]``.

    Models without a list of blocks (plain ``nn.Module``s) get their direct children instead.
    """
    try:
        blocks = find_blocks(model, part)
    except LayerNotFoundError:
        children = [name for name, _ in model.named_children()]
        if not children:
            raise
        return children
    count = _block_count(model.get_submodule(blocks))
    return [f"{blocks}.0{INPUT_SUFFIX}"] + [f"{blocks}.{i}" for i in range(count)]


def resolve_layers(
    model: nn.Module,
    layers: str | Sequence[LayerSpec] | None = "auto",
    *,
    model_name: str | None = None,
    part: Part = "encoder",
) -> list[str]:
    """Turn ``"auto"``/``None``, names and indices into validated layer specs.

    Integers index the default layer list (``0`` is the embedding output, ``i`` the output of
    block ``i - 1``, ``-1`` the last block), like ``output_hidden_states``. Names are module
    paths, optionally with ``":input"``.

    Raises:
        LayerNotFoundError: an unknown name or an out-of-range index, with suggestions.
    """
    if layers is None or (isinstance(layers, str) and layers == "auto"):
        return default_layers(model, part)
    if isinstance(layers, (str, int)):
        layers = [layers]
    modules = dict(model.named_modules())
    defaults: list[str] | None = None
    resolved = []
    label = model_name or type(model).__name__
    for spec in layers:
        if isinstance(spec, int) and not isinstance(spec, bool):
            defaults = defaults if defaults is not None else default_layers(model, part)
            if not -len(defaults) <= spec < len(defaults):
                raise LayerNotFoundError(
                    f"layer index {spec} is out of range for {label}: it has {len(defaults)} "
                    f"default layers (embedding output + blocks), so use -{len(defaults)} to "
                    f"{len(defaults) - 1}",
                    layer=spec,
                    available=defaults,
                )
            resolved.append(defaults[spec])
            continue
        if not isinstance(spec, str):
            raise InvalidInputError(
                f"expected layer names (str) or indices (int), got {type(spec).__name__}"
            )
        path, _ = split_spec(spec)
        if path not in modules or path == "":
            raise LayerNotFoundError(
                _unknown_layer_message(path, modules, label, part),
                layer=spec,
                available=[name for name in modules if name],
            )
        resolved.append(spec)
    if len(set(resolved)) != len(resolved):
        raise InvalidInputError(f"layers must be distinct, got {resolved}")
    return resolved


def _block_count(blocks: nn.Module) -> int:
    """The number of blocks in a block list (an ``nn.ModuleList``, see :func:`find_blocks`)."""
    if not isinstance(blocks, nn.ModuleList):
        raise InvalidInputError(f"expected a list of blocks, got a {type(blocks).__name__}")
    return len(blocks)


def _unknown_layer_message(path: str, modules: dict[str, nn.Module], label: str, part: Part) -> str:
    names = [name for name in modules if name]
    hint = ""
    match = re.fullmatch(r"(.+)\.(\d+)", path)
    if match and isinstance(modules.get(match.group(1)), nn.ModuleList):
        size = _block_count(modules[match.group(1)])
        hint = f" Did you mean '{match.group(1)}.{size - 1}'? ({match.group(1)} has {size} blocks)"
    try:
        blocks = find_blocks(modules[""], part) if "" in modules else None
        count = f" ({_block_count(modules[blocks])} blocks)" if blocks else ""
    except (LayerNotFoundError, InvalidInputError):
        count = ""
    return (
        f"layer '{path}' not found in {label}{count}; expected a module path from "
        f"model.named_modules().{hint or suggest(path, names)}"
    )


def check_some_layers(**layer_lists: str | Sequence[LayerSpec]) -> None:
    """Refuse an empty layer list (``layers_a=[]``) before any model is loaded."""
    for name, layers in layer_lists.items():
        if not isinstance(layers, str) and len(layers) == 0:
            raise InvalidInputError(
                f"expected at least one layer in {name}, got an empty list; pass 'auto' (the "
                "embedding output and every block), module names or indices such as [0, -1]"
            )
