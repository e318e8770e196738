"""Rank-aware logging and warnings: a multi-process run emits each once, not once per process.

Like accelerate's ``MultiProcessAdapter``: ``get_logger(__name__).info(...)`` logs on the main
process only (``main_process_only=False`` logs on every process, prefixed by its rank), and
:func:`warn` issues a Python warning on the main process only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from . import distributed


class MultiProcessAdapter(logging.LoggerAdapter):
    """A logger adapter that drops records on every process but the main one, unless asked."""

    def log(  # type: ignore[override]
        self, level: int, msg: object, *args: Any, main_process_only: bool = True, **kwargs: Any
    ) -> None:
        """Log ``msg`` at ``level``; with ``main_process_only`` only on the main process."""
        if not self.isEnabledFor(level):
            return
        if main_process_only and not distributed.is_main_process():
            return
        if not main_process_only and distributed.num_processes() > 1:
            msg = f"[process {distributed.process_index()}] {msg}"
        msg, processed = self.process(msg, kwargs)
        self.logger.log(level, msg, *args, **processed)


def get_logger(name: str, extra: Mapping[str, object] | None = None) -> MultiProcessAdapter:
    """The rank-aware logger for module ``name`` (use ``get_logger(__name__)``)."""
    return MultiProcessAdapter(logging.getLogger(name), extra or {})


def warn(message: str, category: type[Warning], stacklevel: int = 1) -> None:
    """``warnings.warn`` on the main process only, so a W-process run warns once, not W times.

    ``stacklevel`` counts from the caller of this function, as for ``warnings.warn``.
    """
    if distributed.is_main_process():
        warnings.warn(message, category, stacklevel=stacklevel + 1)
