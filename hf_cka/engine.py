"""The seed-compatible ``CKA`` engine for any pair of ``nn.Module``s (built on :mod:`.capture`).

``CKA`` keeps the API of pytorch-cka (``cka(dataloader)``, ``with cka: cka.compare(...)``,
``export``, ``callback(batch_idx, total, current_matrix)``) and fixes what it got wrong: the
attention mask reaches both the model and the pooling, activations are pooled per example instead
of flattened with their padding, HSIC terms accumulate in float64 and values are never clamped.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any, Concatenate, ParamSpec

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .capture import FeatureCapture, forward_features, input_device, unwrap
from .data import MIN_BATCH
from .errors import EmptyDataError, InvalidInputError
from .functional import Kernel
from .layers import LayerSpec, resolve_layers
from .metric import MinibatchCKA, compute_quietly
from .options import Callback
from .pooling import check_pooling

P = ParamSpec("P")


def _within_hooks(
    method: Callable[Concatenate[Any, P], torch.Tensor],
) -> Callable[Concatenate[Any, P], torch.Tensor]:
    """``method`` run inside ``with self:`` (hooks installed, then removed), same signature."""

    @functools.wraps(method)
    def call(self: Any, *args: P.args, **kwargs: P.kwargs) -> torch.Tensor:
        with self:
            return method(self, *args, **kwargs)

    call.__doc__ = "``with self: return self.compare(...)``, with the arguments of :meth:`compare`."
    return call


class CKA:
    """Minibatch CKA between layers of two ``nn.Module``s (seed-compatible API).

    Args:
        model1: first model (``DataParallel``/``DistributedDataParallel`` are unwrapped).
        model2: second model; pass the same object as ``model1`` for a self-comparison, which
            then runs ONE forward pass per batch.
        model1_name: display name (default: the class name).
        model2_name: display name (default: the class name).
        model1_layers: layer names or indices (see :func:`hf_cka.layers.resolve_layers`);
            ``None`` selects the embedding output and every transformer block.
        model2_layers: likewise for ``model2``.
        device: move both models and inputs there; ``None`` leaves models where they are and
            sends inputs to each model's input device.
        pooling: how ``(batch, tokens, dim)`` activations become ``(batch, dim)`` features
            (mask-aware ``"mean"`` by default; see :mod:`hf_cka.pooling`).
        kernel: ``"linear"`` or ``"rbf"``.
        threshold: RBF bandwidth factor.
        progress: show a progress bar (main process only).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_cka import CKA
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> loader = [torch.randn(32, 8) for _ in range(4)]  # batches of 32 samples
        >>> layers = ["0", "2"]  # module paths, as in model.named_modules()
        >>> cka = CKA(model, model, model1_layers=layers, model2_layers=layers, progress=False)
        >>> matrix = cka(loader)  # one forward pass per batch for a self-comparison
        >>> matrix.shape, matrix.dtype
        (torch.Size([2, 2]), torch.float64)
        >>> print(f"{matrix[0, 0]:.4f} {matrix[1, 1]:.4f}")  # every layer matches itself
        1.0000 1.0000
    """

    def __init__(
        self,
        model1: nn.Module,
        model2: nn.Module,
        model1_name: str | None = None,
        model2_name: str | None = None,
        model1_layers: Sequence[LayerSpec] | None = None,
        model2_layers: Sequence[LayerSpec] | None = None,
        device: str | torch.device | None = None,
        *,
        pooling: str = "mean",
        kernel: Kernel = "linear",
        threshold: float = 1.0,
        progress: bool = True,
    ) -> None:
        self.model1, self.model2 = unwrap(model1), unwrap(model2)
        self.same_model = self.model1 is self.model2
        self.model1_name = model1_name or type(self.model1).__name__
        self.model2_name = model2_name or type(self.model2).__name__
        self.model1_layers = resolve_layers(self.model1, model1_layers, model_name=self.model1_name)
        self.model2_layers = resolve_layers(self.model2, model2_layers, model_name=self.model2_name)
        self.device = torch.device(device) if device is not None else None
        self.pooling = check_pooling(pooling)
        self.kernel = kernel
        self.threshold = threshold
        self.progress = progress
        self.metric: MinibatchCKA | None = None
        self.skipped_batches: list[int] = []
        self._captures: list[FeatureCapture] = []
        self._modes: dict[nn.Module, bool] = {}

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> CKA:
        models = [self.model1] if self.same_model else [self.model1, self.model2]
        self._modes = {sub: sub.training for model in models for sub in model.modules()}
        try:
            for model in models:
                if self.device is not None:
                    model.to(self.device)
                model.eval()
            accumulate_on = self.device or input_device(self.model1)
            if self.same_model:
                layers = [*self.model1_layers, *self.model2_layers]
                self._captures = [FeatureCapture(self.model1, layers, self.pooling, accumulate_on)]
            else:
                self._captures = [
                    FeatureCapture(self.model1, self.model1_layers, self.pooling, accumulate_on),
                    FeatureCapture(self.model2, self.model2_layers, self.pooling, accumulate_on),
                ]
            for capture in self._captures:
                capture.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for capture in self._captures:
            capture.remove()
        self._captures = []
        for module, training in self._modes.items():  # per module: .train() would recurse
            module.training = training
        self._modes = {}

    # ------------------------------------------------------------------ computation
    def batch_features(self, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pooled features of both models for one batch (one forward pass for a same model)."""
        if not self._captures:
            raise InvalidInputError(
                "hooks are not registered: use `with cka: cka.compare(loader)` or `cka(loader)`"
            )
        first = forward_features(self.model1, self._captures[0], batch)
        second = (
            first if self.same_model else forward_features(self.model2, self._captures[1], batch)
        )
        return [first[s] for s in self.model1_layers], [second[s] for s in self.model2_layers]

    def compare(
        self,
        dataloader: Iterable[Any],
        callback: Callback | None = None,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Accumulate minibatch CKA over ``dataloader`` and return the ``(L1, L2)`` matrix.

        Batches with fewer than 4 samples cannot enter the unbiased estimator: they are skipped
        and reported with a warning (their indices are in :attr:`skipped_batches`).
        ``callback(batch_idx, total, current_matrix)`` runs after every used batch, with a
        1-based ``batch_idx`` (``total`` is ``len(dataloader)`` or ``-1`` when unknown).
        """
        self_similarity = self.same_model and self.model1_layers == self.model2_layers
        metric = MinibatchCKA(
            len(self.model1_layers),
            None if self_similarity else len(self.model2_layers),
            kernel=self.kernel,
            threshold=self.threshold,
            layer_names_a=self.model1_layers,
            layer_names_b=self.model2_layers,
        )
        self.metric, self.skipped_batches = metric, []
        total = len(dataloader) if isinstance(dataloader, Sized) else -1
        show = (self.progress if progress is None else progress) and distributed.is_main_process()
        bar = tqdm(dataloader, total=total if total >= 0 else None, disable=not show, desc="CKA")
        for batch_idx, batch in enumerate(bar, start=1):
            feats1, feats2 = self.batch_features(batch)
            if feats1[0].shape[0] < MIN_BATCH:
                self.skipped_batches.append(batch_idx)
                continue
            metric.update(feats1, None if self_similarity else feats2, batch_index=batch_idx)
            if callback is not None:
                callback(batch_idx, total, compute_quietly(metric))
        if self.skipped_batches:
            warnings.warn(
                f"skipped batch(es) {self.skipped_batches} with fewer than {MIN_BATCH} samples "
                "(the unbiased HSIC needs n >= 4); use a larger batch size or drop_last=True",
                UserWarning,
                stacklevel=2,
            )
        if metric.n_batches == 0:
            raise EmptyDataError(
                f"no usable batch: got 0 batches with at least {MIN_BATCH} samples (skipped "
                f"{len(self.skipped_batches)}); pass a non-empty loader, batch_size >= {MIN_BATCH}"
            )
        return metric.compute()

    __call__ = _within_hooks(compare)

    def export(self, matrix: torch.Tensor) -> dict[str, Any]:
        """The seed's result dict: names, layers and the CKA matrix."""
        return {
            "model1_name": self.model1_name,
            "model2_name": self.model2_name,
            "model1_layers": list(self.model1_layers),
            "model2_layers": list(self.model2_layers),
            "cka_matrix": matrix,
        }
