"""Block discovery for CLIP / SigLIP towers and Whisper / wav2vec2 audio encoders (tiny configs)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tiny import TOWER_LAYERS, build_multimodal
from transformers import CLIPVisionModel

from hf_cka.errors import InvalidInputError, LayerNotFoundError
from hf_cka.layers import PARTS, default_layers, find_blocks, resolve_layers


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {kind: build_multimodal(kind) for kind in ("clip", "siglip", "whisper", "wav2vec2")}


def _text(model):
    return model.text_model(input_ids=torch.tensor([[1, 5, 6, 7, 2]]), output_hidden_states=True)


def _vision(model):
    return model.vision_model(pixel_values=torch.randn(2, 3, 16, 16), output_hidden_states=True)


def _whisper_decoder(model):
    encoded = model.encoder(torch.randn(1, 8, 32)).last_hidden_state
    ids = torch.tensor([[1, 5, 6]])
    return model.decoder(input_ids=ids, encoder_hidden_states=encoded, output_hidden_states=True)


# kind, part -> (block list, number of blocks, forward giving the part's hidden_states)
CASES: dict[tuple[str, str], tuple[str, int, Callable]] = {
    ("clip", "vision"): ("vision_model.encoder.layers", TOWER_LAYERS["vision"], _vision),
    ("clip", "text"): ("text_model.encoder.layers", TOWER_LAYERS["text"], _text),
    ("siglip", "vision"): ("vision_model.encoder.layers", TOWER_LAYERS["vision"], _vision),
    ("siglip", "text"): ("text_model.encoder.layers", TOWER_LAYERS["text"], _text),
    ("whisper", "encoder"): (
        "encoder.layers",
        TOWER_LAYERS["encoder"],
        lambda m: m.encoder(torch.randn(1, 8, 32), output_hidden_states=True),
    ),
    ("whisper", "decoder"): ("decoder.layers", TOWER_LAYERS["decoder"], _whisper_decoder),
    ("wav2vec2", "encoder"): (
        "encoder.layers",
        TOWER_LAYERS["encoder"],
        lambda m: m(torch.randn(1, 200), output_hidden_states=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids="-".join)
def test_part_discovers_the_right_block_list(models, case):
    kind, part = case
    blocks, count, _ = CASES[case]
    model = models[kind]
    assert find_blocks(model, part) == blocks
    expected = [f"{blocks}.0:input"] + [f"{blocks}.{i}" for i in range(count)]
    assert default_layers(model, part) == expected
    assert resolve_layers(model, "auto", part=part) == expected
    assert resolve_layers(model, [0, -1], part=part) == [expected[0], expected[-1]]


@pytest.mark.parametrize("case", list(CASES), ids="-".join)
def test_embedding_entry_is_the_parts_first_hidden_state(models, case):
    """``<blocks>.0:input`` is what ``output_hidden_states`` reports as ``hidden_states[0]``."""
    kind, part = case
    blocks, _, forward = CASES[case]
    model = models[kind]
    seen = []

    def record(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = model.get_submodule(f"{blocks}.0").register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            hidden_states = forward(model).hidden_states
    finally:
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], hidden_states[0], rtol=0, atol=0)


def test_wav2vec2_convolutions_are_not_blocks(models):
    """The conv feature encoder is a longer list of one class, but has no attention."""
    model = models["wav2vec2"]
    convs = model.feature_extractor.conv_layers
    assert len({type(c) for c in convs}) == 1 and len(convs) > TOWER_LAYERS["encoder"]
    assert find_blocks(model) == "encoder.layers"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_two_towers_need_a_tower_part(models, kind, part):
    with pytest.raises(InvalidInputError, match="vision and a text tower.*part='vision'") as info:
        default_layers(models[kind], part)
    assert "vision_model.encoder.layers" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind", ["whisper", "wav2vec2"])
def test_a_tower_part_needs_a_tower(models, kind):
    for part in ("vision", "text"):
        with pytest.raises(InvalidInputError, match=f"no {part} tower.*part='encoder'"):
            default_layers(models[kind], part)


def test_a_lone_tower_takes_encoder_or_its_tower_part(models):
    """CLIPVisionModel keeps no ``vision`` in its paths; its config's model type names it."""
    vision = CLIPVisionModel(models["clip"].config.vision_config).eval()
    blocks = find_blocks(vision)
    assert isinstance(vision.get_submodule(blocks), torch.nn.ModuleList)
    assert len(vision.get_submodule(blocks)) == TOWER_LAYERS["vision"]
    assert find_blocks(vision, "vision") == blocks
    with pytest.raises(InvalidInputError, match="no text tower"):
        find_blocks(vision, "text")


def test_unknown_layer_message_counts_the_selected_towers_blocks(models):
    with pytest.raises(LayerNotFoundError, match=r"\(3 blocks\)"):
        resolve_layers(models["clip"], ["vision_model.encoder.layers.9"], part="vision")
    with pytest.raises(LayerNotFoundError, match=r"\(2 blocks\)"):
        resolve_layers(models["clip"], ["text_model.encoder.layers.9"], part="text")
    # the default part cannot count the blocks of a two-tower model, but still names the layer
    with pytest.raises(LayerNotFoundError, match="'nope' not found in CLIPModel;"):
        resolve_layers(models["clip"], ["nope"])


def test_parts():
    assert PARTS == ("encoder", "decoder", "vision", "text")
