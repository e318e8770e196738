"""Exception types meaning "the Hub could not be reached", whichever HTTP client is in use."""

from __future__ import annotations

from huggingface_hub.errors import OfflineModeIsEnabled

try:
    from httpx2 import TransportError
except ImportError:  # huggingface_hub < 2 speaks httpx
    from httpx import TransportError

NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    TransportError,
    OfflineModeIsEnabled,
    ConnectionError,
    TimeoutError,
)
