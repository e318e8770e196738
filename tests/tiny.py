"""Tiny randomly initialised models and offline-built tokenizers, saved to folders."""

from __future__ import annotations

import functools
import pickle
import random
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from hf_cka.data import probe_corpus

HIDDEN = 32
LAYERS = {
    "bert": 3,
    "roberta": 2,
    "distilbert": 2,
    "gpt2": 2,
    "gpt_neox": 2,
    "llama": 3,
    "t5": 2,
    "vit": 2,
}


@functools.cache
def _word_level() -> Tokenizer:
    """A lower-casing word-level tokenizer with BERT-style [CLS] ... [SEP] framing."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        probe_corpus(), trainers.WordLevelTrainer(vocab_size=400, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


@functools.cache
def _byte_bpe() -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) without a pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        probe_corpus(),
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tok


def word_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level(),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_bpe(),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def varied_texts(n: int, seed: int = 0, low: int = 3, high: int = 40) -> list[str]:
    """``n`` texts of ``low..high`` words drawn from the probe corpus."""
    rng = random.Random(seed)
    words = " ".join(probe_corpus()).split()
    return [" ".join(rng.choices(words, k=rng.randint(low, high))) for _ in range(n)]


def build(kind: str, seed: int = 0):
    """(model, tokenizer or image processor) of a tiny random ``kind`` model."""
    import transformers as tf

    torch.manual_seed(seed)
    n = LAYERS[kind]
    common = dict(num_attention_heads=2, intermediate_size=37)
    if kind in ("bert", "roberta"):
        tok = word_tokenizer()
        cfg_cls = tf.BertConfig if kind == "bert" else tf.RobertaConfig
        cfg = cfg_cls(
            vocab_size=len(tok),
            hidden_size=HIDDEN,
            num_hidden_layers=n,
            max_position_embeddings=130,
            pad_token_id=0,
            **common,
        )
        model = (tf.BertModel if kind == "bert" else tf.RobertaModel)(cfg)
    elif kind == "distilbert":
        tok = word_tokenizer()
        cfg = tf.DistilBertConfig(
            vocab_size=len(tok),
            dim=HIDDEN,
            n_layers=n,
            n_heads=2,
            hidden_dim=37,
            max_position_embeddings=130,
            pad_token_id=0,
        )
        model = tf.DistilBertModel(cfg)
    elif kind == "gpt2":
        tok = bpe_tokenizer()
        cfg = tf.GPT2Config(
            vocab_size=len(tok),
            n_embd=HIDDEN,
            n_layer=n,
            n_head=2,
            n_positions=130,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = tf.GPT2Model(cfg)
    elif kind == "gpt_neox":
        tok = bpe_tokenizer()
        cfg = tf.GPTNeoXConfig(
            vocab_size=len(tok),
            hidden_size=HIDDEN,
            num_hidden_layers=n,
            max_position_embeddings=130,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
        model = tf.GPTNeoXModel(cfg)
    elif kind == "llama":
        tok = bpe_tokenizer()
        cfg = tf.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=HIDDEN,
            num_hidden_layers=n,
            num_key_value_heads=1,
            max_position_embeddings=130,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=None,
            **common,
        )
        model = tf.LlamaModel(cfg)
    elif kind == "t5":
        tok = bpe_tokenizer()
        cfg = tf.T5Config(
            vocab_size=len(tok),
            d_model=HIDDEN,
            d_kv=16,
            d_ff=37,
            num_layers=n,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=0,
        )
        model = tf.T5Model(cfg)
    elif kind == "vit":
        tok = tf.ViTImageProcessor(size={"height": 32, "width": 32})
        cfg = tf.ViTConfig(
            image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=n, **common
        )
        model = tf.ViTModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval(), tok


def save(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny ``kind`` model and its tokenizer/processor to ``folder``; returns it."""
    model, tok = build(kind, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TOWER_LAYERS = {"vision": 3, "text": 2, "encoder": 2, "decoder": 3}


def build_multimodal(kind: str, seed: int = 0):
    """A tiny random ``kind`` model: "clip", "siglip" (a vision tower of 3 blocks and a text
    tower of 2), "whisper" (2 encoder and 3 decoder blocks) or "wav2vec2" (2 transformer blocks
    after 3 layer-normed convolutions, more than the blocks, with the stable-layer-norm variant).
    """
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=HIDDEN, num_attention_heads=2, intermediate_size=37)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind in ("clip", "siglip"):
        text = dict(num_hidden_layers=TOWER_LAYERS["text"], vocab_size=100, **ids, **common)
        vision = dict(
            num_hidden_layers=TOWER_LAYERS["vision"], image_size=16, patch_size=8, **common
        )
        if kind == "clip":
            return tf.CLIPModel(
                tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
            ).eval()
        return tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision)).eval()
    if kind == "whisper":
        cfg = tf.WhisperConfig(
            d_model=HIDDEN,
            encoder_layers=TOWER_LAYERS["encoder"],
            decoder_layers=TOWER_LAYERS["decoder"],
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            vocab_size=100,
            decoder_start_token_id=1,
            **ids,
        )
        return tf.WhisperModel(cfg).eval()
    if kind == "wav2vec2":
        cfg = tf.Wav2Vec2Config(
            num_hidden_layers=TOWER_LAYERS["encoder"],
            do_stable_layer_norm=True,
            feat_extract_norm="layer",
            conv_dim=(8, 8, 8),
            conv_kernel=(4, 2, 2),
            conv_stride=(2, 2, 1),
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
            **common,
        )
        return tf.Wav2Vec2Model(cfg).eval()
    raise ValueError(kind)


class _CreatesFile:
    """Unpickling this object creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def code_running_pickle(marker: Path) -> bytes:
    """A pickle whose loading runs code (it creates ``marker``): proof that a file was unpickled."""
    return pickle.dumps(_CreatesFile(marker))
