"""The ``CKA`` progress bar of a run: it moves after every forward pass, not once per chunk."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import distributed


class Progress:
    """A tqdm bar over this process's CKA batches that moves after every forward pass.

    A chunk's forward passes all run before its first CKA batch is complete (they are sorted by
    length over the whole chunk), so a bar moved per finished batch would jump a chunk at a time.
    Instead a forward hook on every model advances it by the pass's share of the chunk:
    ``rows x batches_in_chunk / (rows_in_chunk x models)``; the count is exact at chunk ends.
    Shown on the main process only, when ``enabled``.
    """

    def __init__(
        self, modules: Sequence[torch.nn.Module], total: int | None, enabled: bool, initial: int
    ) -> None:
        from tqdm.auto import tqdm

        show = enabled and distributed.is_main_process()
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not show,
            desc="CKA",
            unit="batch",
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]",
        )
        self.position, self._share, self._chunk_end = initial, 0.0, initial
        hook = self._forwarded
        self._handles = (
            [m.register_forward_hook(hook, with_kwargs=True) for m in modules] if show else []
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self.bar.close()

    def start_chunk(self, batches: int, forward_rows: int) -> None:
        """A chunk of ``batches`` CKA batches needing ``forward_rows`` rows of forward passes."""
        self._share = batches / forward_rows
        self._chunk_end = self.position + batches

    def end_chunk(self) -> None:
        self.position = self._chunk_end
        self._move_to(self.position)

    def finish(self, done: int) -> None:
        self._move_to(done)

    def _move_to(self, position: float) -> None:
        self.bar.update(position - self.bar.n)

    def _forwarded(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        inputs = [*args, *kwargs.values()]
        rows = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.ndim), 0)
        self._move_to(min(self.bar.n + rows * self._share, self._chunk_end))
