"""Test-suite bootstrap: an isolated Hugging Face environment and the loopback Hub.

``huggingface_hub``, ``datasets`` and ``transformers`` read their endpoint, token, cache and
offline settings when they are imported, so this module sets them at import time, before any
test module imports those libraries. Subprocesses started by tests inherit the same settings,
so they too talk to the loopback Hub (``hub`` fixture) and never to huggingface.co.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator

import pytest
from helpers import free_port

_CLIENTS = ("huggingface_hub", "datasets", "transformers")
if imported := [name for name in _CLIENTS if name in sys.modules]:
    raise RuntimeError(
        f"{imported} were imported before tests/conftest.py could point them at the loopback Hub;"
        " remove the plugin or import that loads them before pytest collects this conftest."
    )


HUB_PORT = free_port()
HUB_TOKEN = "hf_loopback_dummy_token"
_HF_HOME = tempfile.mkdtemp(prefix="hf-cka-tests-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{HUB_PORT}",
    HF_TOKEN=HUB_TOKEN,
    HF_HOME=_HF_HOME,
    HF_HUB_CACHE=os.path.join(_HF_HOME, "hub"),
    HF_DATASETS_CACHE=os.path.join(_HF_HOME, "datasets"),
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_OFFLINE="0",
    HF_DATASETS_OFFLINE="0",
    TOKENIZERS_PARALLELISM="false",
)
# Tiny models gain nothing from intra-op threads, and 2-process gloo tests on 2 cores would
# oversubscribe them: one thread per process keeps the suite fast and its timings steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tiny  # noqa: E402
import torch  # noqa: E402
from hub_server import HubServer  # noqa: E402 (the environment above must come first)
from transformers import PreTrainedModel  # noqa: E402


@pytest.fixture(scope="session")
def hub() -> Iterator[HubServer]:
    """The loopback Hub serving ``HF_ENDPOINT`` (started on first use, shared by the session).

    Repos persist across tests: use unique repo names, or ``hub.reset()``. See
    ``tests/hub_server.py`` for ``fail_next``, ``requests``, ``repo`` and ``reset``.
    """
    with HubServer(port=HUB_PORT, token=HUB_TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """``saved(kind, seed=0)`` -> folder of a tiny ``kind`` model, saved once per module."""
    cache: dict[tuple[str, int], str] = {}

    def get(kind: str, seed: int = 0) -> str:
        if (kind, seed) not in cache:
            folder = tmp_path_factory.mktemp(f"{kind}-{seed}")
            cache[kind, seed] = str(tiny.save(kind, folder, seed))
        return cache[kind, seed]

    return get


@pytest.fixture(scope="module")
def bert_and_gpt2(saved) -> dict[str, str]:
    """A tiny BERT and a tiny GPT-2 (different tokenizers), saved once for the module."""
    return {"bert": saved("bert"), "gpt2": saved("gpt2", 1)}


@pytest.fixture
def bar_positions(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The position of the tqdm bar after each of its ``update`` calls during the test."""
    from tqdm.auto import tqdm

    positions: list[float] = []
    original = tqdm.update

    def record(self: tqdm, n: float = 1) -> bool | None:
        shown = original(self, n)
        positions.append(self.n)
        return shown

    monkeypatch.setattr(tqdm, "update", record)
    return positions


@pytest.fixture
def forwards_by_name() -> Iterator[Counter]:
    """Counts forward calls of every ``PreTrainedModel`` by its ``name_or_path``."""
    counts: Counter = Counter()

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, PreTrainedModel):
            counts[module.name_or_path] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield counts
    handle.remove()
