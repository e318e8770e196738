"""CKA batches -> per-model encoded tensors: each model encodes the SAME samples with its own
tokenizer, image processor or feature extractor (:func:`encode`), and pads the ones of a forward
pass into a model batch (:func:`collate`). Loading and batching the samples is :mod:`hf_cka.data`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidInputError


def waveform(sample: Any, sampling_rate: int) -> Any:
    """The 1-d float32 numpy waveform of an audio sample, at the feature extractor's rate.

    Takes a decoded ``datasets.Audio`` dict (``{"array", "sampling_rate"}``), a ``datasets``
    audio decoder (``get_all_samples()``, channels averaged), or a 1-d array or list (taken to be
    at ``sampling_rate`` already).

    Raises:
        InvalidInputError: a sample at another sampling rate (hf_cka does not resample).
    """
    import numpy as np

    rate = sampling_rate
    if isinstance(sample, Mapping) and "array" in sample:
        array, rate = sample["array"], sample.get("sampling_rate", sampling_rate)
    elif callable(getattr(sample, "get_all_samples", None)):
        decoded = sample.get_all_samples()
        array, rate = decoded.data.mean(dim=0).numpy(), decoded.sample_rate
    else:
        array = sample
    if rate != sampling_rate:
        raise InvalidInputError(
            f"expected audio at the feature extractor's {sampling_rate} Hz, got a sample at "
            f"{rate} Hz; resample it first, e.g. dataset.cast_column('audio', "
            f"datasets.Audio(sampling_rate={sampling_rate}))"
        )
    array = np.asarray(array, dtype=np.float32)
    return array.mean(axis=0) if array.ndim == 2 else array


def encode(processor: Any, samples: Sequence[Any], modality: str, max_length: int | None) -> Any:
    """Unpadded encodings of ``samples`` (token lists for text, tensors for images, the feature
    extractor's output for audio: per-sample arrays, with its attention mask if it gives one)."""
    if modality == "image":
        return processor(images=list(samples), return_tensors="pt")
    if modality == "audio":
        rate = processor.sampling_rate
        return processor([waveform(s, rate) for s in samples], sampling_rate=rate)
    return processor(
        list(samples), truncation=max_length is not None, max_length=max_length, padding=False
    )


def collate(processor: Any, encodings: Any, indices: Sequence[int], modality: str) -> dict:
    """A padded model batch of the samples at ``indices`` of ``encodings``."""
    if modality == "image":
        return {k: v[list(indices)] for k, v in encodings.items()}
    rows = [{k: encodings[k][i] for k in encodings} for i in indices]
    if modality == "audio":  # padded with the extractor's padding value and attention mask
        return dict(processor.pad(rows, return_tensors="pt"))
    # right padding whatever the tokenizer says: left padding would shift the absolute position
    # ids of real tokens (BERT, GPT-2); pooling skips the pads on either side anyway
    return dict(processor.pad(rows, return_tensors="pt", padding_side="right"))


def lengths(encodings: Any, modality: str) -> list[int]:
    """Sequence length of each encoded sample (all equal for images)."""
    if modality == "image":
        return [1] * len(next(iter(encodings.values())))
    if modality == "audio":  # the main input: waveform samples, or mel frames (all equal)
        main = next(v for k, v in encodings.items() if k != "attention_mask")
        return [len(row[0]) if getattr(row, "ndim", 1) == 2 else len(row) for row in main]
    return [len(ids) for ids in encodings["input_ids"]]


def same_tokens(enc_a: Any, enc_b: Any) -> bool:
    """Whether two text encodings hold identical token ids for every sample."""
    return list(enc_a["input_ids"]) == list(enc_b["input_ids"])
