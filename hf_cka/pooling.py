"""Mask-aware pooling of token activations into one feature vector per sample.

CKA treats samples as examples, so a ``(batch, tokens, dim)`` activation is reduced to
``(batch, dim)`` with the attention mask ``m`` (1 for real tokens, 0 for padding); padding never
counts, whichever side it is on:

* ``mean``:  ``f_b = sum_t m_bt h_bt / sum_t m_bt``;
* ``first`` / ``cls``: the first real token (position of the first 1 in ``m_b``);
* ``last``:  the last real token (position of the last 1 in ``m_b``) -- right for left and right
  padding alike;
* ``max``:   ``f_bd = max_{t: m_bt = 1} h_btd``;
* ``tokens``: every real token becomes a sample: ``(sum_bt m_bt, dim)`` rows in batch-major order;
* ``flatten``: ``(batch, tokens * dim)`` -- the seed library's behaviour, for inputs without
  padding (images, fixed-length sequences); it refuses a mask with padding in it.

Tensors with two dimensions are returned unchanged; tensors with four or more (convolutional
maps) are flattened per sample, as in Kornblith et al. Pooling happens inside the forward hook,
so only ``(batch, dim)`` tensors outlive the hook. The mask is checked once per batch
(:func:`padding_mask`), not once per layer: no hook reads a device tensor back to the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from .errors import InvalidInputError, ShapeMismatchError, TokenizerMismatchError

if TYPE_CHECKING:
    from .models import LoadedModel

Pooling = Literal["mean", "first", "cls", "last", "max", "tokens", "flatten"]
POOLINGS: tuple[str, ...] = ("mean", "first", "cls", "last", "max", "tokens", "flatten")


def check_pooling(pooling: str) -> str:
    """Return ``pooling`` if it is known, else raise :class:`InvalidInputError`."""
    if pooling not in POOLINGS:
        raise InvalidInputError(f"expected pooling in {POOLINGS}, got {pooling!r}")
    return pooling


def check_same_tokenizer(model_a: LoadedModel, model_b: LoadedModel) -> None:
    """``pooling="tokens"`` makes every token a sample: refuse two models that tokenize apart.

    Raises:
        TokenizerMismatchError: a model is not a text model, or the vocabularies differ.
    """
    if model_a.modality != "text" or model_b.modality != "text":
        raise TokenizerMismatchError("pooling='tokens' needs two text models")
    if model_a.processor.get_vocab() != model_b.processor.get_vocab():
        raise TokenizerMismatchError(
            f"pooling='tokens' makes every token a sample, so both models must tokenize "
            f"identically; '{model_a.name}' and '{model_b.name}' have different "
            "vocabularies: use pooling='mean' (or 'last', 'max', 'first')"
        )


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A batch's attention mask if it holds padding, ``None`` if it holds none, checked with ONE
    host transfer (none for a mask on the CPU): call it once per batch, where the inputs are built,
    and pass the result to :func:`pool` with ``mask_checked=True`` for every layer.

    Raises:
        ShapeMismatchError: the mask is not ``(batch, tokens)``.
        InvalidInputError: a sample has no real token (an all-zero row).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ShapeMismatchError(
            "expected an attention mask of shape (batch, tokens), got "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask != 0
    every_sample_has_a_token, no_padding = torch.stack((mask.any(dim=1).all(), mask.all())).tolist()
    if not every_sample_has_a_token:
        raise InvalidInputError(
            "a sample has no real token (its attention mask is all zeros); drop empty texts"
        )
    return None if no_padding else attention_mask


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pooling: str = "mean",
    *,
    mask_checked: bool = False,
) -> torch.Tensor:
    """Pool ``hidden`` to one row per sample (or per real token for ``"tokens"``).

    Args:
        hidden: ``(batch, dim)``, ``(batch, tokens, dim)`` or ``(batch, c, h, w, ...)`` activations.
        attention_mask: ``(batch, tokens)`` with 1 for real tokens; ``None`` means no padding.
            A mask whose length differs from ``tokens`` (a layer that adds or drops positions)
            is ignored only when it holds no padding; otherwise a ShapeMismatchError is raised.
        pooling: one of :data:`POOLINGS`.
        mask_checked: ``attention_mask`` comes from :func:`padding_mask` (``None`` or a mask with
            padding and a real token in every row), so no check reads it back to the host.

    Returns:
        The pooled features, same dtype and device as ``hidden`` except ``max``/``mean`` which
        keep the dtype too; accumulation to float64 happens later.
    """
    check_pooling(pooling)
    if hidden.dim() <= 2:
        return hidden if hidden.dim() == 2 else hidden[:, None]
    if hidden.dim() > 3:
        return hidden.reshape(hidden.shape[0], -1)
    mask = _token_mask(hidden, attention_mask, mask_checked)
    if pooling == "flatten":
        if mask is not None:
            raise InvalidInputError(
                "pooling='flatten' would mix padding into the features; use pooling='mean' "
                "(or 'last', 'max', 'first') for padded text"
            )
        return hidden.reshape(hidden.shape[0], -1)
    if mask is None:
        if pooling == "tokens":  # no boolean indexing: its output size would need a host sync
            return hidden.reshape(-1, hidden.shape[-1])
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if pooling == "mean":  # summed in float32 at least, so long fp16 sequences cannot overflow
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        weights = mask.to(dtype)[..., None]
        return ((hidden.to(dtype) * weights).sum(1) / weights.sum(1)).to(hidden.dtype)
    if pooling == "max":
        lowest = torch.finfo(hidden.dtype).min if hidden.is_floating_point() else -(2**31)
        return hidden.masked_fill(~mask[..., None], lowest).amax(dim=1)
    if pooling == "tokens":
        return hidden[mask]
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if pooling in ("first", "cls"):
        index = torch.where(mask, positions, mask.shape[1]).amin(dim=1)
    else:  # last
        index = torch.where(mask, positions, -1).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.to(hidden.device)]


def _token_mask(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None, checked: bool
) -> torch.Tensor | None:
    """The boolean ``(batch, tokens)`` padding mask matching ``hidden``, or None for 'no padding'
    (``checked``: ``attention_mask`` comes from :func:`padding_mask`)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != hidden.shape[0]:
        raise ShapeMismatchError(
            f"expected an attention mask of shape (batch={hidden.shape[0]}, tokens), got "
            f"{tuple(attention_mask.shape)}"
        )
    if not checked:
        attention_mask = padding_mask(attention_mask)
        if attention_mask is None:
            return None
    if attention_mask.shape[1] != hidden.shape[1]:
        raise ShapeMismatchError(
            f"the attention mask covers {attention_mask.shape[1]} tokens but the layer output has "
            f"{hidden.shape[1]}; select layers whose outputs are aligned with the input tokens"
        )
    return attention_mask.to(device=hidden.device) != 0
