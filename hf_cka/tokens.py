"""Tokens: cleaned on input, scrubbed from every message (never written anywhere)."""

from __future__ import annotations

from typing import TypeAlias

HubToken: TypeAlias = str | bool | None
"""A Hub token as huggingface_hub takes it: the token itself (surrounding whitespace is ignored),
``None`` or ``True`` for the saved login or ``HF_TOKEN``, ``False`` for none. Never written
anywhere."""

MASK = "***"


def clean_token(token: HubToken) -> HubToken:
    """``token`` without surrounding whitespace (a token read from a file ends with a newline).

    ``True``/``False``/``None`` keep their huggingface_hub meaning; an empty string is ``None``.
    """
    if not isinstance(token, str):
        return token
    return token.strip() or None


def _forms(secret: str) -> list[str]:
    """Every spelling of ``secret`` a message can hold: raw, stripped, repr- and bytes-escaped."""
    forms = set()
    for text in (secret, secret.strip()):
        forms |= {text, repr(text)[1:-1], repr(text.encode("utf-8"))[2:-1]}
    return sorted((form for form in forms if form), key=len, reverse=True)


def scrub(text: str, token: HubToken = None) -> str:
    """``text`` with ``token`` and the saved token, in every form, replaced by ``***``."""
    from huggingface_hub import get_token  # lazy: `hf-cka --help` must not import the Hub client

    for secret in (token if isinstance(token, str) else None, get_token()):
        if secret and secret.strip():
            for form in _forms(secret):
                text = text.replace(form, MASK)
    return text
