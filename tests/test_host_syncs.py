"""No per-layer host-device syncs in the per-batch path (issue 16).

On a GPU every ``.item()``, ``bool()``, ``int()``, ``float()``, ``.cpu()``, ``.tolist()`` or
``.numpy()`` of a device tensor waits for the device to finish its queue. One small transfer per
batch (the HSIC sums, with the finiteness probes folded in) is the budget. This machine has no GPU,
so the tests count the CALLS of those methods made from hf_cka's own code (transformers' and
tokenizers' calls are not hf_cka's to remove) and require the count per batch to be a small
constant that does not grow with the number of layers. ``.to("cpu")`` is not counted: on a CPU-only
machine it cannot be told apart from the moves to the model's device.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tiny
import torch

import hf_cka
from hf_cka import CKA, AutoCKA, MinibatchCKA
from hf_cka.capture import model_inputs
from hf_cka.errors import InvalidInputError, NonFiniteActivationError, ShapeMismatchError
from hf_cka.pooling import POOLINGS, padding_mask, pool

HF_CKA_DIR = str(Path(hf_cka.__file__).resolve().parent)
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
TRANSFERS = ("cpu", "tolist", "numpy")
SCALAR_READS = ("item", "__bool__", "__int__", "__float__", "__index__")
# hooked layers of the tiny 3-block BERT: 2, or 6 including sub-modules of other widths
LAYERS = {
    2: ["embeddings", "encoder.layer.1"],
    6: [
        "embeddings",
        "encoder.layer.0",
        "encoder.layer.1",
        "encoder.layer.2",
        "encoder.layer.0.intermediate",
        "encoder.layer.2:input",
    ],
}


def _called_from_hf_cka() -> bool:
    """Whether the nearest caller outside torch is hf_cka code (a hook, pooling, metric...)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(HF_CKA_DIR)


@contextmanager
def counted_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Count hf_cka's calls of the tensor methods that read a device tensor back to the host."""
    counts: Counter[str] = Counter()

    def counting(name: str, method: Callable) -> Callable:
        def wrapper(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            if _called_from_hf_cka():
                counts[name] += 1
            return method(self, *args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in (*TRANSFERS, *SCALAR_READS):
            patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        yield counts


def transfers(counts: Counter[str]) -> int:
    return sum(counts[name] for name in TRANSFERS)


def update_counts(
    monkeypatch: pytest.MonkeyPatch, num_layers: int, kernel: str, self_similarity: bool
) -> Counter[str]:
    gen = torch.Generator().manual_seed(num_layers)
    widths = [8, 8, 5, 8, 3, 8][:num_layers]  # mixed widths: the per-layer Gram path too
    feats_a = [torch.randn(16, d, generator=gen) for d in widths]
    feats_b = None if self_similarity else [torch.randn(16, 4, generator=gen) for _ in widths]
    metric = MinibatchCKA(num_layers, None if self_similarity else num_layers, kernel=kernel)
    metric.update(feats_a, feats_b, batch_index=0)  # warm-up: nothing lazy is counted
    with counted_syncs(monkeypatch) as counts:
        metric.update(feats_a, feats_b, batch_index=1)
    return counts


@pytest.mark.parametrize("self_similarity", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_update_reads_back_once_whatever_the_layer_count(
    monkeypatch: pytest.MonkeyPatch, kernel: str, self_similarity: bool
) -> None:
    two, six = (update_counts(monkeypatch, n, kernel, self_similarity) for n in (2, 6))
    assert two == six, (two, six)
    assert transfers(six) == 1, six  # the HSIC sums and the finiteness probes, together
    assert sum(six.values()) <= 3, six  # + the finiteness checks of that CPU copy


def test_a_non_finite_layer_is_still_named_from_the_transferred_sums() -> None:
    feats = [torch.randn(8, 3) for _ in range(3)]
    feats[2][4, 1] = float("inf")
    metric = MinibatchCKA(3, 3, layer_names_a=["x", "y", "z"], layer_names_b=["p", "q", "r"])
    with pytest.raises(NonFiniteActivationError, match="layer 'r'.*batch 7"):
        metric.update([torch.randn(8, 2) for _ in range(3)], feats, batch_index=7)
    assert metric.n_batches == 0


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_a_checked_mask_reads_nothing_back(
    monkeypatch: pytest.MonkeyPatch, pooling: str
) -> None:
    hidden = torch.randn(3, 5, 4)
    full, padded = torch.ones(3, 5), torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]])
    masks = [padding_mask(full)] + ([] if pooling == "flatten" else [padding_mask(padded)])
    with counted_syncs(monkeypatch) as counts:
        pooled = [pool(hidden, mask, pooling, mask_checked=True) for mask in masks]
    assert not counts, counts
    for mask, got in zip(masks, pooled, strict=True):  # the same as the checking call
        assert torch.equal(got, pool(hidden, full if mask is None else mask, pooling))


@pytest.fixture(scope="module")
def pair(saved) -> tuple[str, str]:
    return saved("bert", 0), saved("bert", 1)


def compare_counts(
    monkeypatch: pytest.MonkeyPatch, pair: tuple[str, str], layers: list[str], batches: int
) -> Counter[str]:
    auto = AutoCKA.from_pretrained(*pair, layers_a=layers, layers_b=layers)
    texts = tiny.varied_texts(8 * batches, seed=5)
    auto.compare(texts[:16], batch_size=8, progress=False)  # warm-up
    with counted_syncs(monkeypatch) as counts:
        auto.compare(texts, batch_size=8, chunk_batches=2, progress=False)
    return counts


def test_autocka_syncs_per_batch_do_not_grow_with_the_layers(
    monkeypatch: pytest.MonkeyPatch, pair: tuple[str, str]
) -> None:
    """Per batch = (count over 4 batches - count over 2 batches) / 2: per-run costs cancel."""
    per_batch = {}
    for num_layers, layers in LAYERS.items():
        two, four = (compare_counts(monkeypatch, pair, layers, b) for b in (2, 4))
        per_batch[num_layers] = {k: (four[k] - two[k]) / 2 for k in four | two}
    assert per_batch[2] == per_batch[6], per_batch
    # one padding-mask check per forward pass (2 models), one transfer of the sums per batch
    assert per_batch[6]["tolist"] == 2 and per_batch[6]["cpu"] == 1, per_batch
    assert sum(per_batch[6].values()) <= 6, per_batch


def test_the_mask_is_checked_once_where_the_inputs_are_built() -> None:
    """``model_inputs`` hands the hooks a checked mask: ``None`` without padding, else the mask."""
    ids = torch.ones(2, 4, dtype=torch.long)
    full, padded = torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    _, kwargs, mask = model_inputs({"input_ids": ids, "attention_mask": full}, torch.device("cpu"))
    assert mask is None and kwargs["attention_mask"] is full  # the model still gets its mask
    _, kwargs, mask = model_inputs({"input_ids": ids, "attention_mask": padded}, "cpu")
    assert mask is kwargs["attention_mask"]
    empty = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(InvalidInputError, match="no real token"):
        model_inputs({"input_ids": ids, "attention_mask": empty}, torch.device("cpu"))
    with pytest.raises(ShapeMismatchError, match=r"\(batch, tokens\), got \(2, 4, 1\)"):
        model_inputs({"input_ids": ids, "attention_mask": full[..., None]}, torch.device("cpu"))
    # a model whose hooked layers are all 2-D still refuses the empty sample, before any forward
    model = FlatEmbedding()
    loader = [{"input_ids": ids, "attention_mask": mask} for mask in (full, empty)]
    with pytest.raises(InvalidInputError, match="no real token"):
        CKA(model, model, model1_layers=["flat"], progress=False)(loader)
    assert model.calls == 1  # the first batch only


class FlatEmbedding(torch.nn.Module):
    """Embeds tokens and flattens them: its ``flat`` layer gives 2-D features, nothing to pool."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.flat, self.calls = torch.nn.Embedding(3, 2), torch.nn.Flatten(), 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.flat(self.embed(input_ids) * attention_mask[..., None])
