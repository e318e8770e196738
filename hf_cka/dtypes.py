"""The dtypes a model can be loaded in, by name, and how a ``dtype`` argument resolves."""

from __future__ import annotations

import torch

from .errors import InvalidInputError

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


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """``None``/``"auto"`` -> ``"auto"`` (the checkpoint's dtype); names -> ``torch.dtype``."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InvalidInputError(
                f"expected a floating dtype (torch.float32, float16, bfloat16 or float64) or "
                f"'auto', got {dtype}; model weights and activations must be floating point"
            )
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise InvalidInputError(f"expected dtype in {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[key]
