"""The ``>>>`` examples in the public docstrings run, and pass, as part of the suite."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = ["hf_cka.functional", "hf_cka.metric", "hf_cka.engine"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    with torch.random.fork_rng():  # examples may seed the global generator: restore it after
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no >>> example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
