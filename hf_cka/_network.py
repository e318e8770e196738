"""The exception types that mean "the Hub could not be reached", whichever HTTP client is in use."""

from __future__ import annotations

from huggingface_hub.errors import OfflineModeIsEnabled

try:
    from httpx2 import LocalProtocolError, TransportError
except ImportError:  # huggingface_hub < 2 speaks httpx
    from httpx import LocalProtocolError, TransportError  # type: ignore[no-redef, import-not-found]

NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    TransportError,
    OfflineModeIsEnabled,
    ConnectionError,
    TimeoutError,
)
"""Exception types meaning "the Hub could not be reached", whichever HTTP client is in use."""

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (OfflineModeIsEnabled, LocalProtocolError)
"""Network errors that a retry cannot cure: offline mode, a request the client refuses to send
(e.g. an illegal header value)."""
