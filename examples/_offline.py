"""Tiny local stand-ins for Hub checkpoints, so that every example runs with ``--offline``.

``tiny_bert(folder)`` saves a randomly initialised BERT (a few thousand parameters) with a
word-level tokenizer trained on hf_cka's probe corpus, built with the ``tokenizers`` library:
nothing is downloaded. The folder loads like any checkpoint (``AutoModel.from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    PreTrainedTokenizerFast,
)

from hf_cka.data import probe_corpus

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer with BERT's ``[CLS] ... [SEP]`` framing."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=1000, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(probe_corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip


def tiny_bert(
    folder: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 3,
    hidden_size: int = 32,
    noise: float = 0.0,
    num_labels: int | None = None,
) -> Path:
    """Save a tiny random BERT and its tokenizer to ``folder`` and return the folder.

    Args:
        folder: Where to save.
        seed: Initialisation seed.
        num_layers: Transformer blocks.
        hidden_size: Width of the hidden states.
        noise: Standard deviation of Gaussian noise added to every weight (a "fine-tuned"
            variant of the model with the same seed).
        num_labels: Add a sequence-classification head with this many labels.
    """
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=256,
        pad_token_id=0, num_labels=num_labels or 2,
    )  # fmt: skip
    model = BertForSequenceClassification(config) if num_labels else BertModel(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
