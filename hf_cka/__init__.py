"""hf_cka: Centered Kernel Alignment between the layers of Hugging Face models."""

from . import functional
from .engine import CKA
from .errors import HfCkaError
from .metric import MinibatchCKA

__version__ = "0.1.0"

__all__ = ["CKA", "HfCkaError", "MinibatchCKA", "__version__", "functional"]
