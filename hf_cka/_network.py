"""The exception types that mean "the Hub could not be reached", whichever HTTP client is in use,
and what a failed request means: worth a retry (:func:`retry_reason`) or what to change first
(:func:`advice`)."""

from __future__ import annotations

from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

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

CONFLICT_STATUS = frozenset({409, 412})
"""A concurrent push moved the branch: the commit is rebuilt on the new head."""
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""The Hub is overloaded or briefly down: the request is retried after a wait."""


def retry_reason(err: BaseException) -> str | None:
    """Why ``err`` is worth retrying (a conflict or a transient failure), or None."""
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", None)
        if status in CONFLICT_STATUS:
            return f"conflict with a concurrent push (HTTP {status})"
        return f"HTTP {status}" if status in TRANSIENT_STATUS else None
    if isinstance(err, NETWORK_ERRORS) and not isinstance(err, PERMANENT_ERRORS):
        return f"network error ({type(err).__name__})"
    return None


def advice(err: BaseException) -> str | None:
    """What to change before trying again, for errors that a plain retry cannot cure."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return "the token was refused: log in with `hf auth login` or set HF_TOKEN / token=..."
    if status == 403:
        return "the token has no write access to this repo: use a token with write permission"
    if isinstance(err, OfflineModeIsEnabled):
        return "huggingface_hub is in offline mode: unset HF_HUB_OFFLINE"
    if isinstance(err, LocalProtocolError):
        return "the request was malformed (is the token a single line without spaces?)"
    return None
