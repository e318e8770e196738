"""hf_cka: Centered Kernel Alignment between the layers of Hugging Face models.

Quick start::

    from hf_cka import AutoCKA
    cka = AutoCKA.from_pretrained("google-bert/bert-base-uncased", "prajjwal1/bert-tiny")
    result = cka.compare()
    result.plot()

The names below are imported on first use (module ``__getattr__``), so ``import hf_cka`` and
``import hf_cka.functional`` load neither transformers, matplotlib, pandas nor the Hub client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

_EXPORTS = {
    "AutoCKA": "auto",
    "CKA": "engine",
    "CKAResult": "result",
    "DriftResult": "drift",
    "Fingerprint": "fingerprint",
    "GridResult": "grid",
    "HfCkaError": "errors",
    "MinibatchCKA": "metric",
    "RunOptions": "options",
    "plot_cka_comparison": "plotting",
    "plot_cka_heatmap": "plotting",
    "plot_cka_trend": "plotting",
    "plot_drift": "plotting",
}

__all__ = [*sorted(_EXPORTS), "__version__", "functional"]

if TYPE_CHECKING:
    from . import functional as functional
    from .auto import AutoCKA as AutoCKA
    from .drift import DriftResult as DriftResult
    from .engine import CKA as CKA
    from .errors import HfCkaError as HfCkaError
    from .fingerprint import Fingerprint as Fingerprint
    from .grid import GridResult as GridResult
    from .metric import MinibatchCKA as MinibatchCKA
    from .options import RunOptions as RunOptions
    from .plotting import plot_cka_comparison as plot_cka_comparison
    from .plotting import plot_cka_heatmap as plot_cka_heatmap
    from .plotting import plot_cka_trend as plot_cka_trend
    from .plotting import plot_drift as plot_drift
    from .result import CKAResult as CKAResult


def __getattr__(name: str) -> Any:
    """Import an exported name's module, or a submodule (``hf_cka.cli``), on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the submodule exists but one of its own imports is missing
        raise AttributeError(f"module 'hf_cka' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
