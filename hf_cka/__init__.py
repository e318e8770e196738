"""hf_cka: Centered Kernel Alignment between the layers of Hugging Face models.

Quick start::

    from hf_cka import AutoCKA
    cka = AutoCKA.from_pretrained("google-bert/bert-base-uncased", "prajjwal1/bert-tiny")
    result = cka.compare()
    result.plot()
"""

from . import functional
from .auto import AutoCKA
from .engine import CKA
from .errors import HfCkaError
from .fingerprint import Fingerprint
from .grid import GridResult
from .metric import MinibatchCKA
from .plotting import plot_cka_comparison, plot_cka_heatmap, plot_cka_trend, plot_drift
from .result import CKAResult, DriftResult

__version__ = "0.1.0"

__all__ = [
    "CKA",
    "AutoCKA",
    "CKAResult",
    "DriftResult",
    "Fingerprint",
    "GridResult",
    "HfCkaError",
    "MinibatchCKA",
    "__version__",
    "functional",
    "plot_cka_comparison",
    "plot_cka_heatmap",
    "plot_cka_trend",
    "plot_drift",
]
