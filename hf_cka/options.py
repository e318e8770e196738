"""``RunOptions``: every option of a run besides the models and the data, typed and validated once.

The command line takes its defaults and choices from here, ``AutoCKA.compare`` and ``drift``
build one (keyword arguments override its fields, see :class:`RunChanges`) and the runner reads
it. This module imports torch through the Literal types only: no transformers, datasets or
matplotlib.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict, get_args

import torch
from typing_extensions import Unpack

from .data import MIN_BATCH
from .errors import InvalidInputError, suggest
from .functional import Kernel
from .pooling import Pooling
from .streaming import Estimator

Callback = Callable[[int, int, torch.Tensor], None]
"""``callback(batches_done, total_batches_or_-1, current_matrix)``, called after every batch."""

MIN_MAX_LENGTH = 1
"""The smallest ``max_length``; a tokenizer that adds more special tokens is refused at run time."""

RESUME_KEYS = (
    "batch_size", "max_length", "num_samples", "text_column", "dataset_config", "split",
    "pooling", "kernel", "threshold", "estimator", "null_permutations", "seed",
)  # fmt: skip
"""The options a resumed run must share with the checkpointed one (they shape the numbers)."""


@dataclass(frozen=True)
class RunOptions:
    """Everything that shapes a run besides the models and the data.

    Attributes:
        batch_size: samples per CKA minibatch (an ``int`` >= 4, the unbiased HSIC's minimum); also
            the forward batch size.
        max_length: truncate texts to this many tokens (an ``int`` >= 1; ``None``: the model's
            own limit). A tokenizer whose special tokens alone fill it is refused at run time.
        num_samples: use at most this many samples (``None``: all).
        text_column: the dataset column holding texts (images are found automatically).
        dataset_config: Hub dataset configuration name.
        split: dataset split (default ``"train"`` or the first one).
        pooling: how token activations become one vector per example (padding never counts).
        callback: ``callback(batches_done, total, current_matrix)`` after every batch (this
            process's partial matrix in a distributed run; ``total`` is -1 when unknown).
        progress: show a progress bar (main process only), moved once per CKA batch.
        sort_by_length: run the forward passes over length-sorted sub-batches of a chunk (faster;
            the CKA minibatches are unchanged and the matrix differs only by the float rounding of
            the features, see ``docs/distributed.md``).
        chunk_batches: CKA batches per sorting chunk.
        kernel: ``"linear"`` or ``"rbf"`` (bandwidth: ``threshold`` x the per-batch median).
        threshold: RBF bandwidth factor.
        estimator: ``"minibatch"`` (Nguyen et al.; with standard errors), ``"linear"`` (exact
            full-data biased linear CKA, Kornblith et al.) or ``"debiased"`` (exact full-data
            debiased linear CKA); see ``docs/statistics.md``.
        max_bytes: refuse an exact estimator whose states would exceed this many bytes.
        null_permutations: also compute CKA with B's samples shuffled within each batch this many
            times; the mean is ``result.null``, the chance level for this n and d.
        seed: seed of the permutations.
        target_stderr: stop early once every cell's standard error is below this.
        checkpoint_dir: save the sums there every ``checkpoint_every`` batches and on any
            interruption; rerunning with the same arguments resumes from them.
        checkpoint_every: batches between checkpoints.

    Raises:
        InvalidInputError: a value of the wrong type or out of range (one message per field,
            saying what was expected and what was got).
    """

    batch_size: int = 32
    max_length: int | None = 128
    num_samples: int | None = None
    text_column: str = "text"
    dataset_config: str | None = None
    split: str | None = None
    pooling: Pooling = "mean"
    callback: Callback | None = field(default=None, compare=False)
    progress: bool = True
    sort_by_length: bool = True
    chunk_batches: int = 8
    kernel: Kernel = "linear"
    threshold: float = 1.0
    estimator: Estimator = "minibatch"
    max_bytes: int | None = None
    null_permutations: int = 0
    seed: int = 0
    target_stderr: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, MIN_BATCH, "the unbiased HSIC needs 4 samples")
        if self.max_length is not None:
            check_int("max_length", self.max_length, MIN_MAX_LENGTH, "or None for no truncation")
        if self.num_samples is not None:
            check_int("num_samples", self.num_samples, 1, "or None for all samples")
        check_int("chunk_batches", self.chunk_batches, 1, "CKA batches sorted together")
        check_int("null_permutations", self.null_permutations, 0, "0 turns the null off")
        check_int("checkpoint_every", self.checkpoint_every, 1, "batches between checkpoints")
        check_int("seed", self.seed, None, "the permutations' seed")
        if self.max_bytes is not None:
            check_int("max_bytes", self.max_bytes, 1, "or None for no limit")
        for name, literal in (("pooling", Pooling), ("kernel", Kernel), ("estimator", Estimator)):
            choices = get_args(literal)
            value = getattr(self, name)
            if value not in choices:
                raise InvalidInputError(
                    f"expected {name} in {choices}, got {value!r}.{suggest(str(value), choices)}"
                )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real):
            raise InvalidInputError(f"expected threshold as a number, got {self.threshold!r}")
        if self.target_stderr is not None:
            if not isinstance(self.target_stderr, numbers.Real) or not self.target_stderr > 0:
                raise InvalidInputError(f"expected target_stderr > 0, got {self.target_stderr!r}")
            if self.estimator != "minibatch":
                raise InvalidInputError(
                    f"target_stderr needs the per-batch standard errors of estimator='minibatch',"
                    f" got estimator={self.estimator!r}"
                )

    def replace(self, **changes: Unpack[RunChanges]) -> RunOptions:
        """A copy with ``changes`` applied (and validated); unknown names raise a typed error."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = [f.name for f in dataclasses.fields(self)]
            raise InvalidInputError(
                f"unknown run option(s) {unknown}; expected some of {names}."
                f"{suggest(unknown[0], names)}"
            )
        return dataclasses.replace(self, **changes) if changes else self

    def resume_key(self) -> dict[str, Any]:
        """The options a resumed run must share with the checkpointed one."""
        return {key: getattr(self, key) for key in RESUME_KEYS}


class RunChanges(TypedDict, total=False):
    """Keyword arguments of ``compare``/``drift``: any :class:`RunOptions` field by name."""

    batch_size: int
    max_length: int | None
    num_samples: int | None
    text_column: str
    dataset_config: str | None
    split: str | None
    pooling: Pooling
    callback: Callback | None
    progress: bool
    sort_by_length: bool
    chunk_batches: int
    kernel: Kernel
    threshold: float
    estimator: Estimator
    max_bytes: int | None
    null_permutations: int
    seed: int
    target_stderr: float | None
    checkpoint_dir: str | None
    checkpoint_every: int


def check_int(name: str, value: Any, minimum: int | None, hint: str) -> None:
    """Raise ``InvalidInputError`` unless ``value`` is an ``int`` (not a bool, float or str) and
    ``>= minimum``; ``hint`` says why the minimum is what it is."""
    if isinstance(value, bool) or not isinstance(value, int):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InvalidInputError(
            f"expected {name} as an int{bound}, got {value!r} ({type(value).__name__})"
        )
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"expected {name} >= {minimum} ({hint}), got {value}")


DEFAULTS = RunOptions()
"""The default options, read by the command line for its defaults."""
