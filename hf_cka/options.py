"""``RunOptions``: every option of a run besides the models and the data, typed and validated once.

The command line takes its defaults and choices from here, ``AutoCKA.compare`` and ``drift``
build one (keyword arguments override its fields, see :class:`RunChanges`) and the runner reads
it. This module imports torch through the Literal types only: no transformers, datasets or
matplotlib.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, get_args

import torch
from typing_extensions import Unpack

from .data import DEFAULT_COLUMN, MIN_BATCH
from .errors import InvalidInputError, suggest
from .functional import Kernel
from .measures import Measure, measure_parameters
from .pooling import Pooling
from .streaming import Estimator

Callback = Callable[[int, int, torch.Tensor], None]
"""``callback(batches_done, total_batches_or_-1, current_matrix)``, called after every batch."""

MIN_MAX_LENGTH = 1
"""The smallest ``max_length``; a tokenizer that adds more special tokens is refused at run time."""

DEFAULT_TEXT_COLUMN = DEFAULT_COLUMN
DEFAULT_ESTIMATOR: Estimator = "minibatch"

RESUME_KEYS = (
    "batch_size", "max_length", "num_samples", "text_column", "dataset_config", "split",
    "pooling", "kernel", "threshold", "estimator", "null_permutations", "seed", "column_a",
    "column_b",
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
        column_a: with ``column_b``, paired data: model A reads this column of every row and
            model B ``column_b`` of the same rows (``text_column`` is then unused), e.g.
            images and their captions. Both or neither.
        column_b: the column model B reads (see ``column_a``).
        dataset_config: Hub dataset configuration name.
        split: dataset split (default ``"train"`` or the first one).
        pooling: how token activations become one vector per example (padding never counts).
        callback: ``callback(batches_done, total, current_matrix)`` after every batch (this
            process's partial matrix in a distributed run; ``total`` is -1 when unknown; NaN
            for a full-data ``measure``, computed once at the end).
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
        max_bytes: refuse an exact estimator whose states, or a full-data ``measure`` whose
            pooled features, would exceed this many bytes.
        measure: ``"cka"`` (default: the ``estimator``, ``kernel`` and standard errors above) or
            a full-data measure of :mod:`hf_cka.measures` (``"mutual_knn"``, ``"procrustes"``,
            ``"svcca"``, ``"pwcca"``, ``"rsa"``), computed once over all the pooled features.
        measure_params: keyword parameters of ``measure`` (``{"k": 10}`` for ``"mutual_knn"``,
            ``{"keep": 0.99}`` for ``"svcca"``, ``{"distance": "euclidean"}`` for ``"rsa"``).
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
    text_column: str = DEFAULT_TEXT_COLUMN
    column_a: str | None = None
    column_b: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    pooling: Pooling = "mean"
    callback: Callback | None = field(default=None, compare=False)
    progress: bool = True
    sort_by_length: bool = True
    chunk_batches: int = 8
    kernel: Kernel = "linear"
    threshold: float = 1.0
    estimator: Estimator = DEFAULT_ESTIMATOR
    max_bytes: int | None = None
    measure: Measure = "cka"
    measure_params: Mapping[str, Any] = field(default_factory=dict, hash=False)
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
        literals = (
            ("pooling", Pooling), ("kernel", Kernel), ("estimator", Estimator), ("measure", Measure)
        )  # fmt: skip
        for name, literal in literals:
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

        self._check_columns()
        self._check_measure()

    def _check_columns(self) -> None:
        """Paired columns come as two non-empty strings, and replace ``text_column``."""
        if (self.column_a is None) != (self.column_b is None):
            raise InvalidInputError(
                f"column_a and column_b go together (model A reads one column, model B the "
                f"other), got column_a={self.column_a!r} and column_b={self.column_b!r}; pass "
                "both, or neither and text_column for one column read by both models"
            )
        for name in ("column_a", "column_b"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidInputError(f"expected {name} as a column name, got {value!r}")
        if self.paired and self.text_column != DEFAULT_TEXT_COLUMN:
            raise InvalidInputError(
                f"text_column={self.text_column!r} names one column for both models, but "
                f"column_a={self.column_a!r} and column_b={self.column_b!r} name one each; "
                "drop one of them"
            )

    def _check_measure(self) -> None:
        """A full-data measure takes its own parameters and none of CKA's estimator options."""
        if not isinstance(self.measure_params, Mapping):
            raise InvalidInputError(
                f"expected measure_params as a dict such as {{'k': 10}}, got "
                f"{type(self.measure_params).__name__}"
            )
        accepted = () if self.measure == "cka" else measure_parameters(self.measure)
        unknown = sorted(set(self.measure_params) - set(accepted))
        if unknown:
            raise InvalidInputError(
                f"measure {self.measure!r} takes the parameters {list(accepted)}, got unknown "
                f"{unknown}"
            )
        if self.measure == "cka":
            return
        cka_only = {
            "estimator": (self.estimator, DEFAULT_ESTIMATOR),
            "kernel": (self.kernel, "linear"),
            "target_stderr": (self.target_stderr, None),
            "checkpoint_dir": (self.checkpoint_dir, None),
        }
        for name, (value, default) in cka_only.items():
            if value != default:
                raise InvalidInputError(
                    f"{name}={value!r} applies to measure='cka' only, got measure="
                    f"{self.measure!r}, which is computed once over all the pooled features; "
                    f"drop {name}, or use measure='cka'"
                )

    @property
    def paired(self) -> bool:
        """Whether the models read two columns of the same rows (``column_a``/``column_b``)."""
        return self.column_a is not None

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
    column_a: str | None
    column_b: str | None
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
    measure: Measure
    measure_params: Mapping[str, Any]
    null_permutations: int
    seed: int
    target_stderr: float | None
    checkpoint_dir: str | None
    checkpoint_every: int


class LoadChanges(TypedDict, total=False):
    """How ``drift``, ``fingerprint`` and ``grid`` load each model: the arguments of the same
    names of :meth:`hf_cka.AutoCKA.from_pretrained` (see :class:`hf_cka.models.ModelLoader`)."""

    dtype: str | torch.dtype | None
    device: str | torch.device | None
    device_map: str | dict | None
    trust_remote_code: bool


class ModelRunChanges(RunChanges, LoadChanges, total=False):
    """Keyword arguments of ``drift``, ``fingerprint`` and ``grid``: how each model is loaded
    (:class:`LoadChanges`) and any :class:`RunOptions` field (:class:`RunChanges`)."""


def split_changes(changes: ModelRunChanges) -> tuple[dict[str, Any], dict[str, Any]]:
    """``changes`` as ``(loading, run changes)``: the :class:`LoadChanges` keys, and the rest."""
    loading = {k: v for k, v in changes.items() if k in LoadChanges.__optional_keys__}
    return loading, {k: v for k, v in changes.items() if k not in loading}


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
