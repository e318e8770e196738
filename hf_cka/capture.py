"""Forward primitives: batches to model inputs, hooks that pool each selected layer, extractors.

Everything that runs a model and captures its activations lives here, for the seed-compatible
:class:`~hf_cka.engine.CKA` and the streaming :mod:`~hf_cka.runner` alike:

* :func:`model_inputs` splits a batch into arguments and the attention mask on the input device;
* :class:`FeatureCapture` registers forward hooks on layer specs (see
  :func:`hf_cka.layers.split_spec`) and pools each layer's output inside its hook, so only
  ``(batch, dim)`` tensors outlive the forward pass; hooks live only inside the ``with`` block and
  are removed in ``finally``, also when the forward pass raises;
* :func:`forward_features` runs one forward pass and returns the pooled features by layer spec;
* :class:`Extractor` does the same for a loaded Hugging Face model and chunks of CKA batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import MIN_BATCH, batch_samples
from .encoding import collate, encode, lengths
from .errors import InvalidInputError, LayerNotFiredError
from .layers import split_spec
from .pooling import padding_mask, pool

if TYPE_CHECKING:  # the seed-compatible engine never loads Hub models: keep huggingface_hub out
    from .models import LoadedModel


def unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of ``DataParallel`` / ``DistributedDataParallel`` (else ``model``)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def input_device(model: nn.Module) -> torch.device:
    """Device that inputs must be on: the input embedding's device, else the first parameter's."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
        if embeddings is not None:
            weight = getattr(embeddings, "weight", None)
            if isinstance(weight, torch.Tensor):
                return weight.device
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_inputs(batch: Any, device: torch.device) -> tuple[tuple, dict, torch.Tensor | None]:
    """Split a batch into ``(args, kwargs, padding_mask)`` on ``device``.

    A tensor is the single positional input; for a tuple or list the first element is the input
    (the rest, e.g. labels, is dropped); a mapping is passed as keyword arguments, so the
    ``attention_mask`` reaches the model -- and the pooling: the third item is that mask on
    ``device``, checked once here (:func:`~hf_cka.pooling.padding_mask`, before the move: no
    host sync for a CPU batch), or ``None`` when it holds no padding.
    """
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(batch, torch.Tensor):
        return (move(batch),), {}, None
    if isinstance(batch, Mapping):
        kwargs = {k: move(v) for k, v in batch.items()}
        padded = padding_mask(batch.get("attention_mask")) is not None
        return (), kwargs, kwargs["attention_mask"] if padded else None
    if isinstance(batch, (tuple, list)) and batch:
        if isinstance(batch[0], Mapping):
            return model_inputs(batch[0], device)
        return (move(batch[0]),), {}, None
    raise InvalidInputError(
        f"expected a batch that is a Tensor, a non-empty tuple/list or a dict, got "
        f"{type(batch).__name__}"
    )


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


def forward_features(
    model: nn.Module,
    capture: FeatureCapture,
    batch: Any,
    hidden_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``batch`` under ``inference_mode``; pooled features by layer spec.

    ``hidden_mask`` maps the batch's attention mask (when it holds padding) to the mask of the
    hidden states, for models whose hidden states are not one per input position (wav2vec2's
    frames are a convolution of the waveform's samples).
    """
    args, kwargs, mask = model_inputs(batch, input_device(model))
    if mask is not None and hidden_mask is not None:
        mask = hidden_mask(mask)
    capture.attention_mask, capture.active = mask, True
    try:
        with torch.inference_mode():
            model(*args, **kwargs)
    except BaseException:
        capture.features.clear()
        raise
    finally:
        capture.active = False
    return capture.pop()


class Extractor:
    """Pooled features of one model for chunks of CKA batches (hooks live in ``with``).

    Which module runs: the tower of a two-tower model (``loaded.tower_path``: CLIP's
    ``vision_model`` on pixel values, or ``text_model`` on token ids), the encoder of an
    encoder-decoder model (T5; Whisper on its feature extractor's log-mel features) unless a
    decoder layer is selected, else the whole model. Audio waveforms (wav2vec2) are padded by
    the feature extractor, and when it gives an attention mask, pooling counts only the frames
    the model's convolutions draw from real samples. Whisper's feature extractor pads every clip
    to its fixed window (30 s in released models) and gives no mask, so the pooled features are
    over every frame of the window, the padding's included, as the encoder sees them.

    Args:
        loaded: the model (or one of its towers, :meth:`~hf_cka.models.LoadedModel.tower`).
        layers: layer specs to capture.
        pooling: see :mod:`hf_cka.pooling`.
        column: with paired data, the column of each sample (a row dict) this model reads;
            ``None``: the sample itself.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        layers: Sequence[str],
        pooling: str,
        column: str | None = None,
    ) -> None:
        self.loaded, self.layers, self.pooling = loaded, list(dict.fromkeys(layers)), pooling
        self.column = column
        model = loaded.model
        self.use_decoder = bool(getattr(model.config, "is_encoder_decoder", False)) and any(
            split_spec(spec)[0].split(".")[0] == "decoder" for spec in self.layers
        )
        is_enc_dec = getattr(model.config, "is_encoder_decoder", False)
        # get_encoder is a PreTrainedModel method; nn.Module's __getattr__ types it as a Tensor
        get_encoder = model.get_encoder if is_enc_dec and not self.use_decoder else None
        self.forward_module: nn.Module = model if get_encoder is None else get_encoder()  # type: ignore[operator]
        if loaded.tower_path is not None:
            self.forward_module = model.get_submodule(loaded.tower_path)
        waveform_model = callable(getattr(model, "_get_feature_vector_attention_mask", None))
        self.hidden_mask = self._frame_mask if waveform_model else None
        # pooled rows gather on the input device: CKA math runs there, only sums go to the CPU
        self.capture = FeatureCapture(model, self.layers, pooling, device=input_device(model))

    def __enter__(self) -> Extractor:
        model = self.loaded.model
        self._modes = {module: module.training for module in model.modules()}
        model.eval()  # no dropout; flags restored module by module on exit
        self.capture.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.remove()
        for module, training in self._modes.items():
            module.training = training

    def _frame_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The frame mask of a padded waveform batch: the frames a wav2vec2-style model's
        convolutions draw from real samples (its own transformers helpers compute them)."""
        model: Any = self.loaded.model
        frames = int(model._get_feat_extract_output_lengths(mask.shape[1]))
        return model._get_feature_vector_attention_mask(frames, mask)

    def encode(self, samples: Sequence[Any], max_length: int | None) -> Any:
        """Encodings of ``samples`` (of this extractor's column of each row, if it has one)."""
        if self.column is not None:
            samples = [sample[self.column] for sample in samples]
        return encode(self.loaded.processor, samples, self.loaded.modality, max_length)

    def _forward(self, encodings: Any, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate(self.loaded.processor, encodings, indices, self.loaded.modality)
        if self.use_decoder:
            batch["decoder_input_ids"] = batch["input_ids"]
            batch["decoder_attention_mask"] = batch["attention_mask"]
        with self.loaded.forward_context():
            return forward_features(self.forward_module, self.capture, batch, self.hidden_mask)

    def chunk_features(
        self, encodings: Any, sizes: Sequence[int], batch_size: int, sort: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Features of consecutive CKA batches of ``sizes`` samples (encoded in ``encodings``).

        With ``sort`` the forward passes run over the chunk sorted by length (longest first,
        ``batch_size`` samples each) and the pooled rows are put back in sample order.
        """
        bounds = [0, *itertools.accumulate(sizes)]
        if not sort or self.pooling == "tokens":
            return [self._forward(encodings, range(s, e)) for s, e in itertools.pairwise(bounds)]
        total = bounds[-1]
        order = sorted(range(total), key=lengths(encodings, self.loaded.modality).__getitem__)
        order.reverse()
        # one index copy per chunk: a list index would be copied to the device for every layer
        order_on_device = torch.tensor(order, device=self.capture.device)
        buffers: dict[str, torch.Tensor] = {}
        for start in range(0, total, batch_size):
            indices = order[start : start + batch_size]
            for spec, rows in self._forward(encodings, indices).items():
                if spec not in buffers:
                    buffers[spec] = rows.new_empty((total, *rows.shape[1:]))
                buffers[spec][order_on_device[start : start + batch_size]] = rows
        return [{k: v[s:e] for k, v in buffers.items()} for s, e in itertools.pairwise(bounds)]

    def all_features(
        self, samples: Iterator[Any], batch_size: int, max_length: int | None, sort: bool
    ) -> dict[str, torch.Tensor]:
        """The pooled features ``{layer: (n, d)}`` of every sample, in data order, on the CPU.

        The batches are those ``compare`` forms (see :func:`_batches`), so the features match its
        own bit for bit; ``sort`` as in :meth:`chunk_features`.
        """
        rows: dict[str, list[torch.Tensor]] = {spec: [] for spec in self.layers}
        for batch in _batches(samples, batch_size):
            encodings = self.encode(batch, max_length)
            (feats,) = self.chunk_features(encodings, [len(batch)], batch_size, sort)
            for spec in self.layers:
                rows[spec].append(feats[spec])
        return {spec: torch.cat(parts).cpu() for spec, parts in rows.items()}


def _batches(samples: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """The batches ``compare`` would form (a tail of < 4 samples joins the batch before it); with
    ``size`` < 4 or fewer than 4 samples, plain consecutive batches of ``size`` (the last one
    possibly shorter)."""
    head = list(itertools.islice(samples, MIN_BATCH))
    if size >= MIN_BATCH and len(head) == MIN_BATCH:
        yield from batch_samples(itertools.chain(head, samples), size)
        return
    samples = itertools.chain(head, samples)
    while batch := list(itertools.islice(samples, size)):
        yield batch
