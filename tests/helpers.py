"""Helpers shared by the tests that launch real processes (the CLI, examples, torchrun)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for the loopback Hub or a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(*, drop: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    """The test environment for a child process: the loopback Hub settings of conftest.py,
    this checkout and ``tests/`` importable, one OpenMP thread (more make tiny models far slower
    on a small busy machine); ``drop`` removes variables, ``overrides`` sets others."""
    env = {key: value for key, value in os.environ.items() if key not in drop}
    paths = [str(REPO_ROOT), str(TESTS), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")
    env.update(overrides)
    return env
