"""Mask-aware pooling on hand-computed values, and layer discovery / resolution on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    GPTNeoXConfig,
    GPTNeoXModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    RobertaConfig,
    RobertaModel,
    T5Config,
    T5Model,
    ViTConfig,
    ViTModel,
)

from hf_cka.errors import InvalidInputError, LayerNotFoundError, ShapeMismatchError
from hf_cka.layers import (
    INPUT_SUFFIX,
    default_layers,
    display_name,
    find_blocks,
    resolve_layers,
    split_spec,
)
from hf_cka.pooling import POOLINGS, pool

# ------------------------------------------------------------------------------------ pooling
# hidden[b, t] = [value, -value] with value = 10 * b + t + 1, so every token is recognisable and
# the second feature is negative (a padding zero would win a max over it if it were counted).
HIDDEN = torch.tensor(
    [[[10.0 * b + t + 1, -(10.0 * b + t + 1)] for t in range(4)] for b in range(2)]
)
RIGHT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
LEFT = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])

EXPECTED = {
    "right": {
        "mean": [[2.0, -2.0], [11.5, -11.5]],
        "max": [[3.0, -1.0], [12.0, -11.0]],
        "first": [[1.0, -1.0], [11.0, -11.0]],
        "cls": [[1.0, -1.0], [11.0, -11.0]],
        "last": [[3.0, -3.0], [12.0, -12.0]],
        "tokens": [[1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [11.0, -11.0], [12.0, -12.0]],
    },
    "left": {
        "mean": [[3.0, -3.0], [13.5, -13.5]],
        "max": [[4.0, -2.0], [14.0, -13.0]],
        "first": [[2.0, -2.0], [13.0, -13.0]],
        "cls": [[2.0, -2.0], [13.0, -13.0]],
        "last": [[4.0, -4.0], [14.0, -14.0]],
        "tokens": [[2.0, -2.0], [3.0, -3.0], [4.0, -4.0], [13.0, -13.0], [14.0, -14.0]],
    },
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean", "max", "first", "cls", "last", "tokens"])
def test_pooling_hand_computed(side, pooling):
    mask = RIGHT if side == "right" else LEFT
    got = pool(HIDDEN, mask, pooling)
    assert torch.equal(got, torch.tensor(EXPECTED[side][pooling]))


@pytest.mark.parametrize("pooling", ["mean", "max", "first", "last", "tokens"])
def test_boolean_and_float_masks_agree(pooling):
    expected = pool(HIDDEN, LEFT, pooling)
    assert torch.equal(pool(HIDDEN, LEFT.bool(), pooling), expected)
    assert torch.equal(pool(HIDDEN, LEFT.float(), pooling), expected)


def test_no_mask_means_every_token_counts():
    assert torch.equal(pool(HIDDEN, None, "mean"), HIDDEN.mean(1))
    assert torch.equal(pool(HIDDEN, None, "last"), HIDDEN[:, -1])
    assert torch.equal(pool(HIDDEN, None, "first"), HIDDEN[:, 0])
    assert torch.equal(pool(HIDDEN, None, "tokens"), HIDDEN.reshape(8, 2))
    assert torch.equal(pool(HIDDEN, torch.ones(2, 4), "max"), HIDDEN.amax(1))


def test_flatten():
    assert torch.equal(pool(HIDDEN, None, "flatten"), HIDDEN.reshape(2, 8))
    assert torch.equal(pool(HIDDEN, torch.ones(2, 4), "flatten"), HIDDEN.reshape(2, 8))
    with pytest.raises(InvalidInputError, match="flatten.*padding"):
        pool(HIDDEN, RIGHT, "flatten")


def test_mean_pooling_keeps_low_precision_dtype():
    got = pool(HIDDEN.to(torch.bfloat16), RIGHT, "mean")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.float(), torch.tensor(EXPECTED["right"]["mean"]))


def test_half_precision_mean_of_a_long_sequence_does_not_overflow():
    """2048 tokens of value 64 sum to 131072 > 65504, the largest float16: the mean is 64."""
    hidden = torch.full((2, 2048, 3), 64.0, dtype=torch.float16)
    mask = torch.ones(2, 2048)
    mask[1, 1024:] = 0
    assert torch.equal(pool(hidden, mask, "mean").float(), torch.full((2, 3), 64.0))


@pytest.mark.parametrize("pooling", ["mean", "max", "first", "last", "tokens"])
def test_all_zero_mask_row_raises(pooling):
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(InvalidInputError, match="no real token"):
        pool(HIDDEN, mask, pooling)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_two_dimensional_input_passes_through(pooling):
    features = torch.randn(5, 3)
    assert pool(features, torch.ones(5, 7), pooling) is features
    assert pool(torch.arange(5.0), None, pooling).shape == (5, 1)


def test_four_dimensional_maps_are_flattened_per_sample():
    maps = torch.randn(3, 2, 4, 5)
    assert torch.equal(pool(maps, None, "mean"), maps.reshape(3, 40))


def test_mask_length_mismatch():
    # a mask without padding is ignored when the layer changed the sequence length
    assert torch.equal(pool(HIDDEN, torch.ones(2, 6), "mean"), HIDDEN.mean(1))
    with pytest.raises(ShapeMismatchError, match="covers 6 tokens.*has 4"):
        pool(HIDDEN, torch.tensor([[1, 1, 1, 1, 1, 0]] * 2), "mean")
    with pytest.raises(ShapeMismatchError, match=r"batch=2"):
        pool(HIDDEN, torch.ones(3, 4), "mean")
    with pytest.raises(ShapeMismatchError, match=r"batch=2"):
        pool(HIDDEN, torch.ones(2, 4, 1), "mean")


def test_unknown_pooling():
    with pytest.raises(InvalidInputError, match="expected pooling in"):
        pool(HIDDEN, RIGHT, "median")


# ------------------------------------------------------------------------------------- layers
TINY = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 37, "vocab_size": 100}


def tiny_bert() -> BertModel:
    return BertModel(BertConfig(num_hidden_layers=3, **TINY))


def t5_config() -> T5Config:
    return T5Config(
        d_model=32,
        d_kv=16,
        d_ff=37,
        num_layers=3,
        num_decoder_layers=2,
        num_heads=2,
        vocab_size=100,
    )


ARCHITECTURES = {
    "bert": (tiny_bert, "encoder.layer", 3),
    "roberta": (
        lambda: RobertaModel(RobertaConfig(num_hidden_layers=2, **TINY)),
        "encoder.layer",
        2,
    ),
    "distilbert": (
        lambda: DistilBertModel(
            DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, vocab_size=100)
        ),
        "transformer.layer",
        2,
    ),
    "gpt2": (
        lambda: GPT2Model(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100)),
        "h",
        3,
    ),
    "gpt2-lm-head": (
        lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100)),
        "transformer.h",
        2,
    ),
    "llama": (lambda: LlamaModel(LlamaConfig(num_hidden_layers=3, **TINY)), "layers", 3),
    "llama-causal-lm": (
        lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **TINY)),
        "model.layers",
        2,
    ),
    "gpt-neox": (lambda: GPTNeoXModel(GPTNeoXConfig(num_hidden_layers=3, **TINY)), "layers", 3),
    "t5": (lambda: T5Model(t5_config()), "encoder.block", 3),
    "vit": (
        lambda: ViTModel(ViTConfig(image_size=8, patch_size=4, num_hidden_layers=2, **TINY)),
        "layers",  # transformers 5 names ViT's blocks `layers` (no `encoder.layer`)
        2,
    ),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_default_layers(arch):
    build, blocks, count = ARCHITECTURES[arch]
    model = build()
    layers = default_layers(model)
    assert len(layers) == count + 1
    assert layers == [f"{blocks}.0:input"] + [f"{blocks}.{i}" for i in range(count)]
    assert find_blocks(model) == blocks
    assert resolve_layers(model) == layers
    assert resolve_layers(model, None) == layers


def test_t5_decoder_part():
    model = T5Model(t5_config())
    assert default_layers(model, part="decoder") == [
        "decoder.block.0:input",
        "decoder.block.0",
        "decoder.block.1",
    ]
    assert resolve_layers(model, [-1], part="decoder") == ["decoder.block.1"]
    with pytest.raises(InvalidInputError, match="part"):
        default_layers(model, part="middle")


@pytest.fixture(scope="module")
def bert() -> BertModel:
    return tiny_bert()


def test_resolve_names_indices_and_inputs(bert):
    assert resolve_layers(bert, ["encoder.layer.1", "embeddings"]) == [
        "encoder.layer.1",
        "embeddings",
    ]
    assert resolve_layers(bert, [0, 1, 3]) == [
        "encoder.layer.0:input",
        "encoder.layer.0",
        "encoder.layer.2",
    ]
    assert resolve_layers(bert, [-1, -4]) == ["encoder.layer.2", "encoder.layer.0:input"]
    assert resolve_layers(bert, ["encoder.layer.2:input", 2]) == [
        "encoder.layer.2:input",
        "encoder.layer.1",
    ]
    assert resolve_layers(bert, "pooler") == ["pooler"]
    assert resolve_layers(bert, 2) == ["encoder.layer.1"]


def test_unknown_block_suggests_the_closest_valid_one(bert):
    with pytest.raises(LayerNotFoundError, match=r"(?i)did you mean 'encoder\.layer\.2'") as info:
        resolve_layers(bert, ["encoder.layer.13"], model_name="tiny-bert")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "encoder.layer.13" in message
    assert "tiny-bert" in message
    assert "3 blocks" in message
    assert info.value.layer == "encoder.layer.13"  # the error carries what was asked and the
    assert "encoder.layer.2" in info.value.available  # candidates, for code that handles it
    assert "" not in info.value.available


def test_unknown_name_is_a_key_error_with_a_suggestion(bert):
    with pytest.raises(KeyError, match=r"(?i)did you mean 'embeddings'"):
        resolve_layers(bert, ["embedings"])
    with pytest.raises(LayerNotFoundError, match=r"(?i)did you mean 'encoder\.layer\.0'"):
        resolve_layers(bert, ["encoder.layer.0x:input"])
    with pytest.raises(LayerNotFoundError, match="not found"):
        resolve_layers(bert, [""])


def test_index_out_of_range(bert):
    for index in (4, -5):
        with pytest.raises(
            LayerNotFoundError, match=f"index {index} is out of range.*-4 to 3"
        ) as info:
            resolve_layers(bert, [index])
        assert info.value.layer == index
        assert info.value.available == resolve_layers(bert, "auto")


def test_invalid_layer_specs(bert):
    with pytest.raises(InvalidInputError, match="distinct"):
        resolve_layers(bert, [1, "encoder.layer.0"])
    with pytest.raises(InvalidInputError, match="expected layer names"):
        resolve_layers(bert, [1.5])


def test_plain_sequential_falls_back_to_children():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert default_layers(model) == ["0", "1", "2"]
    assert resolve_layers(model, [-1, 0]) == ["2", "0"]


def test_module_without_children_or_blocks_raises():
    with pytest.raises(LayerNotFoundError, match="no list of transformer blocks"):
        default_layers(nn.Linear(3, 3))


def test_layer_spec_format_and_display_names():
    """layers owns the spec format: capture parses it, plotting asks it for labels."""
    assert split_spec("encoder.layer.0" + INPUT_SUFFIX) == ("encoder.layer.0", True)
    assert split_spec("encoder.layer.3") == ("encoder.layer.3", False)
    assert display_name("encoder.layer.0:input") == "embeddings"  # what default_layers records
    assert display_name("h.0:input") == "embeddings"
    assert display_name("encoder.layer.3:input") == "encoder.layer.3:input"
    assert display_name("encoder.layer.10") == "encoder.layer.10"
