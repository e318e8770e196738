"""pytest plugin for ``benchmarks/gpu_check.py`` (``-p select_cuda_tests``): keep only the tests
that are skipped without CUDA (a ``skipif`` mark whose reason names CUDA), deselect the rest.

Kept apart from ``gpu_check.py`` because a plugin is imported before ``tests/conftest.py``, which
must be the first to import ``huggingface_hub``; this module imports nothing but the standard
library.
"""

from __future__ import annotations

from typing import Any


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Keep the CUDA tests, report the others as deselected."""
    keep, drop = [], []
    for item in items:
        reasons = [str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")]
        (keep if any("cuda" in reason.lower() for reason in reasons) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
