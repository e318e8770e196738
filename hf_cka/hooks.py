"""Activation capture: forward hooks that pool each selected layer's output inside the hook.

A layer spec is a module path (``"encoder.layer.3"``: the module's output) or a module path with
the suffix ``":input"`` (``"encoder.layer.0:input"``: the hidden states entering the module,
which for the first transformer block is the embedding output). Hooks live only inside the
``with`` block and are removed in ``finally``, also when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .errors import InvalidInputError, LayerNotFiredError
from .pooling import pool

INPUT_SUFFIX = ":input"


def split_spec(spec: str) -> tuple[str, bool]:
    """``"path:input"`` -> ``("path", True)``; ``"path"`` -> ``("path", False)``."""
    if spec.endswith(INPUT_SUFFIX):
        return spec[: -len(INPUT_SUFFIX)], True
    return spec, False


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a layer output: the tensor itself, or the first tensor of a
    tuple/list, or the first value of a ``ModelOutput``/mapping."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
            if isinstance(item, (tuple, list, Mapping)):
                return first_tensor(item)
    raise InvalidInputError(
        f"expected a layer output holding a tensor, got {type(output).__name__}; select a layer "
        "whose output is a hidden-state tensor"
    )


class FeatureCapture:
    """Context manager that records pooled activations of ``layers`` of ``model``.

    Set :attr:`attention_mask` (the batch's :func:`~hf_cka.pooling.padding_mask`: ``None``
    when it holds no padding) and :attr:`active` around each forward pass; after it,
    :meth:`pop` returns the pooled ``(n, d)`` tensor of each layer (moved to ``device`` when
    given) and clears the store.

    Args:
        model: the module to hook.
        layers: layer specs (module paths, optionally with ``":input"``), already validated.
        pooling: pooling applied inside the hook (see :mod:`hf_cka.pooling`).
        device: where pooled features are moved; ``None`` keeps them where they were computed.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str],
        pooling: str = "mean",
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.pooling = pooling
        self.device = device
        self.attention_mask: torch.Tensor | None = None
        self.active = False  # hooks record only while True (set around this model's own forward)
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureCapture:
        modules = dict(self.model.named_modules())
        try:
            for spec in self.layers:
                path, is_input = split_spec(spec)
                module = modules[path]
                if is_input:
                    handle = module.register_forward_pre_hook(
                        self._input_hook(spec), with_kwargs=True
                    )
                else:
                    handle = module.register_forward_hook(self._output_hook(spec))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent) and drop stored features."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()

    def _store(self, spec: str, hidden: torch.Tensor) -> None:
        if not self.active:  # another capture's forward on a shared module (adapter vs base)
            return
        with torch.no_grad():
            pooled = pool(hidden.detach(), self.attention_mask, self.pooling, mask_checked=True)
            if self.device is not None:
                pooled = pooled.to(self.device, non_blocking=True)
        self.features[spec] = pooled

    def _output_hook(self, spec: str):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._store(spec, first_tensor(output))

        return hook

    def _input_hook(self, spec: str):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None:
                hidden = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            self._store(spec, first_tensor(hidden))

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """Pooled features of every layer from the last forward pass (the store is cleared).

        Raises:
            LayerNotFiredError: a layer produced no output during the forward pass.
        """
        features, self.features = self.features, {}
        missing = [spec for spec in self.layers if spec not in features]
        if missing:
            raise LayerNotFiredError(
                f"layer(s) {missing} were selected but never ran during the forward pass; "
                "pick layers on the path of the inputs (e.g. encoder blocks for encoder inputs)"
            )
        return features
