"""Process topology and reductions; the only module that imports accelerate / torch.distributed.

Under ``accelerate launch`` (or ``torchrun``, or any initialised process group) CKA batches are
sharded round-robin: process ``r`` of ``W`` takes global batches ``r, r + W, r + 2W, ...``, so the
set of minibatches is the one a single process would see and no sample is repeated. Each process
accumulates its own summable states; :func:`all_reduce_sum` combines them once at the end.
"""

from __future__ import annotations

import atexit
import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def _state():  # noqa: ANN202 - accelerate.PartialState, imported lazily
    """Accelerate's process state; on a machine without CUDA it must be told to use gloo on the
    CPU, or accelerate 1.15 reports a single process inside a multi-process launch."""
    from accelerate import PartialState

    owned = not _group_exists()
    state = PartialState(cpu=not torch.cuda.is_available())
    if owned and _group_exists():  # we created the process group: we tear it down
        atexit.register(_destroy_group)
    return state


def _group_exists() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _destroy_group() -> None:
    """Destroy the process group hf_cka created, before the interpreter exits.

    A gloo group left to the interpreter's teardown destroys its worker threads while they are
    still joinable, and the process dies with ``terminate called without an active exception``
    (SIGABRT) after its work is done — about one run in twenty on a loaded machine.
    """
    if _group_exists():
        torch.distributed.destroy_process_group()


def _launched() -> bool:
    """True when the environment describes more than one process (or a group already exists)."""
    if _group_exists():
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def num_processes() -> int:
    """Number of processes in the run (1 when not launched).

    Read from the process group itself: a ``PartialState`` created earlier by user code (maybe
    without ``cpu=True``) may report one process even though the group has several.
    """
    if not _launched():
        return 1
    _state()  # initialises the process group if the launcher left that to us
    return torch.distributed.get_world_size()


def process_index() -> int:
    """Rank of this process (0 when not launched)."""
    if not _launched():
        return 0
    _state()
    return torch.distributed.get_rank()


def local_device() -> torch.device | None:
    """This process's own device in a multi-process run (``None`` when not launched)."""
    return _state().device if _launched() else None


def is_main_process() -> bool:
    """Whether this process prints, plots and writes files."""
    return process_index() == 0


def shard(index: int) -> bool:
    """Whether global batch ``index`` belongs to this process (round-robin)."""
    return index % num_processes() == process_index()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all processes, returned on the CPU.

    A single process returns ``values`` unchanged. The tensor travels on the backend's device
    (CPU for gloo, the local GPU for nccl) and is summed with one ``all_reduce``.
    """
    if num_processes() == 1:
        return values
    state = _state()
    device = state.device if torch.distributed.get_backend() != "gloo" else torch.device("cpu")
    buffer = values.to(device).contiguous()
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
    return buffer.cpu()


def wait_for_everyone() -> None:
    """Barrier across processes (no-op for a single process)."""
    if num_processes() > 1:
        _state().wait_for_everyone()


def all_gather_objects(value: object) -> list[object]:
    """``value`` of every process, in rank order (``[value]`` for a single process); pickled
    in memory between the processes of this run only, never read from files."""
    if num_processes() == 1:
        return [value]
    _state()
    gathered: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
