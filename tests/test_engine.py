"""The seed-compatible ``hf_cka.CKA`` engine on tiny BERTs and hand-made modules."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from hf_cka import CKA, MinibatchCKA
from hf_cka.errors import HfCkaError, InvalidInputError, LayerNotFiredError

# ------------------------------------------------------------------------------------ helpers


def tiny_bert(seed: int, num_layers: int = 2) -> BertModel:
    """A float64 BERT in eval mode (float64 keeps engine-vs-manual differences at rounding)."""
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
    )
    return BertModel(config).double().eval()


def text_batches(
    n_batches: int, batch_size: int, pad_to: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Right-padded random token batches (lengths 3..10) as dicts of input_ids/attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.randint(3, 11, (batch_size,), generator=generator)
        ids = torch.randint(1, 100, (batch_size, pad_to), generator=generator)
        mask = (torch.arange(pad_to)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def pooled_hidden_states(model: BertModel, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Mask-weighted mean of every ``output_hidden_states`` entry, computed without hooks."""
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].to(torch.float64)[..., None]
    return [(h * mask).sum(1) / mask.sum(1) for h in states]


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


def count_forwards(model: nn.Module) -> list[int]:
    """A one-element list counting the calls of ``model.forward`` (the handle is not kept)."""
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


class Block(nn.Module):
    """Returns ``(hidden, extra)`` like many HF layers."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        return torch.tanh(self.dropout(self.linear(x))), {"extra": 1}


class Toy(nn.Module):
    """``embed -> blocks`` on ``(batch, 4)`` inputs; raises on the ``fail_on``-th call."""

    def __init__(self, seed: int, depth: int = 3, dim: int = 6, fail_on: int | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.unused = nn.Linear(dim, dim)
        self.fail_on = fail_on
        self.calls = 0
        self.modes: list[bool] = []
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.modes.append(self.training)
        if self.calls == self.fail_on:
            raise RuntimeError("boom")
        h = self.embed(x)
        for block in self.blocks:
            h, _ = block(h)
        return h

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The default-layer features (embedding output, then every block), without hooks."""
        with torch.no_grad():
            out = [self.embed(x)]
            for block in self.blocks:
                out.append(block(out[-1])[0])
        return out


class MaskedToy(nn.Module):
    """Token model whose forward REQUIRES ``attention_mask`` as a keyword argument."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(100, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))
        self.double()

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask[..., None]
        for layer in self.layers:
            h = layer(h)
        return h

    def features(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        mask = batch["attention_mask"].to(torch.float64)[..., None]
        with torch.no_grad():
            out = [self.embed(batch["input_ids"]) * mask]
            for layer in self.layers:
                out.append(layer(out[-1]))
        return [(h * mask).sum(1) / mask.sum(1) for h in out]


def vectors(n_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_batches`` float64 input batches of shape ``(batch_size, 4)`` for :class:`Toy`."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch_size, 4, generator=generator, dtype=torch.float64)
        for _ in range(n_batches)
    ]


def reference(features1, features2) -> torch.Tensor:
    """MinibatchCKA fed with per-batch feature lists computed without hooks."""
    metric = MinibatchCKA(len(features1[0]), len(features2[0]))
    for f1, f2 in zip(features1, features2, strict=True):
        metric.update(f1, f2)
    return metric.compute()


# -------------------------------------------------------------------------------------- tests


def test_bert_matrix_equals_minibatch_cka_on_hidden_states():
    model1, model2 = tiny_bert(0, num_layers=2), tiny_bert(1, num_layers=3)
    loader = text_batches(4, 8, pad_to=10)
    cka = CKA(model1, model2, progress=False)
    assert cka.model1_layers == ["encoder.layer.0:input", "encoder.layer.0", "encoder.layer.1"]
    matrix = cka(loader)
    assert matrix.shape == (3, 4)
    assert matrix.dtype == torch.float64
    expected = reference(
        [pooled_hidden_states(model1, b) for b in loader],
        [pooled_hidden_states(model2, b) for b in loader],
    )
    np.testing.assert_allclose(matrix.numpy(), expected.numpy(), rtol=0, atol=1e-10)


def test_hooked_features_are_the_pooled_hidden_states():
    model = tiny_bert(2, num_layers=3)
    batch = text_batches(1, 6, pad_to=12, seed=3)[0]
    cka = CKA(model, model, progress=False)
    with cka:
        hooked, _ = cka.batch_features(batch)
    manual = pooled_hidden_states(model, batch)
    assert len(hooked) == len(manual) == 4
    for i, (got, expected) in enumerate(zip(hooked, manual, strict=True)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"layer {i}")
    with pytest.raises(InvalidInputError, match="hooks are not registered"):
        cka.batch_features(batch)


def test_float32_model_gives_a_float64_matrix():
    model1 = tiny_bert(0).float()
    model2 = tiny_bert(1).float()
    matrix = CKA(model1, model2, progress=False)(text_batches(2, 6, pad_to=8))
    assert matrix.dtype == torch.float64
    assert torch.isfinite(matrix).all()


def test_compare_callback_and_export():
    model1, model2 = Toy(0), Toy(1, depth=2)
    loader = vectors(4, 8)
    seen: list[tuple[int, int, torch.Tensor]] = []
    cka = CKA(model1, model2, model1_name="first", progress=False)
    with cka:
        matrix = cka.compare(
            loader, callback=lambda idx, total, m: seen.append((idx, total, m.clone()))
        )
        result = cka.export(matrix)
    assert [idx for idx, _, _ in seen] == [1, 2, 3, 4]
    assert {total for _, total, _ in seen} == {4}
    assert all(m.shape == (4, 3) for _, _, m in seen)
    torch.testing.assert_close(seen[-1][2], matrix, rtol=0, atol=0)
    after_one = reference([model1.features(loader[0])], [model2.features(loader[0])])
    torch.testing.assert_close(seen[0][2], after_one, rtol=0, atol=1e-10)
    assert set(result) == {
        "model1_name",
        "model2_name",
        "model1_layers",
        "model2_layers",
        "cka_matrix",
    }
    assert result["model1_name"] == "first"
    assert result["model2_name"] == "Toy"
    assert result["model1_layers"] == ["blocks.0:input", "blocks.0", "blocks.1", "blocks.2"]
    assert result["model2_layers"] == ["blocks.0:input", "blocks.0", "blocks.1"]
    assert result["cka_matrix"] is matrix
    expected = reference([model1.features(x) for x in loader], [model2.features(x) for x in loader])
    np.testing.assert_allclose(matrix.numpy(), expected.numpy(), rtol=0, atol=1e-10)


def test_same_model_runs_one_forward_per_batch_and_has_a_unit_diagonal():
    model = tiny_bert(4)
    calls = count_forwards(model)
    loader = text_batches(3, 6, pad_to=10, seed=5)
    matrix = CKA(model, model, progress=False)(loader)
    assert calls[0] == 3
    np.testing.assert_allclose(torch.diagonal(matrix).numpy(), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(matrix.numpy(), matrix.T.numpy(), rtol=0, atol=1e-12)

    part = CKA(model, model, model2_layers=[1, 2], progress=False)(loader)
    assert calls[0] == 6
    assert part.shape == (3, 2)
    np.testing.assert_allclose(part.numpy(), matrix[:, 1:].numpy(), rtol=0, atol=1e-12)


def test_two_models_run_two_forwards_per_batch():
    model1, model2 = tiny_bert(6), tiny_bert(7)
    calls1, calls2 = count_forwards(model1), count_forwards(model2)
    CKA(model1, model2, progress=False)(text_batches(3, 6, pad_to=10))
    assert calls1[0] == calls2[0] == 3


def test_hooks_removed_and_mode_restored_when_the_forward_raises():
    model1, model2 = Toy(0), Toy(1, fail_on=2)
    model1.train()
    model2.train()
    with pytest.raises(RuntimeError, match="boom"):
        CKA(model1, model2, progress=False)(vectors(3, 8))
    for model in (model1, model2):
        assert_no_hooks(model)
        assert all(m.training for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):  # explicit context manager, same model
        failing = Toy(2, fail_on=2)
        with CKA(failing, failing, progress=False) as cka:
            cka.compare(vectors(3, 8))
    assert_no_hooks(failing)


def test_hooks_removed_after_keyboard_interrupt_in_callback():
    model1, model2 = Toy(0), Toy(1)

    def interrupt(idx: int, total: int, matrix: torch.Tensor) -> None:
        raise KeyboardInterrupt

    cka = CKA(model1, model2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cka(vectors(3, 8), callback=interrupt)
    assert_no_hooks(model1)
    assert_no_hooks(model2)
    with pytest.raises(KeyboardInterrupt), cka:
        cka.compare(vectors(3, 8), callback=interrupt)
    assert_no_hooks(model1)
    assert_no_hooks(model2)


def test_eval_during_compare_and_train_mode_restored():
    model1, model2 = Toy(0), Toy(1)
    model1.train()
    CKA(model1, model2, progress=False)(vectors(2, 8))
    assert model1.modes == [False, False]
    assert model2.modes == [False, False]
    assert all(m.training for m in model1.modules())
    assert not any(m.training for m in model2.modules())


def test_mixed_train_eval_modes_restored_module_by_module():
    """A model in train mode with a frozen (eval) sub-module gets both modes back."""
    model1, model2 = Toy(0), Toy(1)
    model1.train()
    model1.blocks[1].eval()
    before = {name: m.training for name, m in model1.named_modules()}
    CKA(model1, model2, progress=False)(vectors(2, 8))
    assert model1.modes == [False, False]
    assert {name: m.training for name, m in model1.named_modules()} == before


def test_data_parallel_is_unwrapped():
    model1, model2 = Toy(0), Toy(1)
    loader = vectors(3, 8)
    plain = CKA(model1, model2, progress=False)(loader)
    cka = CKA(nn.DataParallel(model1), nn.DataParallel(model2), progress=False)
    assert cka.model1 is model1
    assert cka.model2 is model2
    assert cka.model1_name == "Toy"
    assert not any(name.startswith("module.") for name in cka.model1_layers)
    np.testing.assert_allclose(cka(loader).numpy(), plain.numpy(), rtol=0, atol=1e-12)
    assert CKA(nn.DataParallel(model1), model1, progress=False).same_model


def test_tensor_and_input_label_tuple_batches_agree():
    model1, model2 = Toy(0), Toy(1)
    inputs = torch.cat(vectors(3, 8))
    labels = torch.arange(24)
    tensors = CKA(model1, model2, progress=False)(list(inputs.split(8)))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=8)
    tuples = CKA(model1, model2, progress=False)(loader)
    expected = reference(
        [model1.features(x) for x in inputs.split(8)],
        [model2.features(x) for x in inputs.split(8)],
    )
    np.testing.assert_allclose(tensors.numpy(), expected.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(tuples.numpy(), expected.numpy(), rtol=0, atol=1e-10)


def test_dict_batches_are_keyword_arguments_and_mask_the_pooling():
    model1, model2 = MaskedToy(0), MaskedToy(1)
    loader = text_batches(3, 6, pad_to=9, seed=8)
    matrix = CKA(model1, model2, progress=False)(loader)
    expected = reference([model1.features(b) for b in loader], [model2.features(b) for b in loader])
    np.testing.assert_allclose(matrix.numpy(), expected.numpy(), rtol=0, atol=1e-10)
    with_labels = CKA(model1, model2, progress=False)([(b, torch.zeros(6)) for b in loader])
    np.testing.assert_allclose(with_labels.numpy(), expected.numpy(), rtol=0, atol=1e-10)


def test_small_batches_are_skipped_and_reported():
    model1, model2 = Toy(0), Toy(1)
    loader = vectors(2, 8) + vectors(1, 3, seed=1)
    seen: list[int] = []
    cka = CKA(model1, model2, progress=False)
    with pytest.warns(UserWarning, match=r"skipped batch\(es\) \[3\]"):
        matrix = cka(loader, callback=lambda idx, total, m: seen.append(idx))
    assert cka.skipped_batches == [3]
    assert seen == [1, 2]
    expected = reference(
        [model1.features(x) for x in loader[:2]], [model2.features(x) for x in loader[:2]]
    )
    np.testing.assert_allclose(matrix.numpy(), expected.numpy(), rtol=0, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cka(loader[:2])
    assert cka.skipped_batches == []


def test_no_usable_batch_raises():
    cka = CKA(Toy(0), Toy(1), progress=False)
    with pytest.raises(HfCkaError, match="got 0"), pytest.warns(UserWarning, match="skipped"):
        cka(vectors(2, 3))
    with pytest.raises(ValueError, match="got 0"):
        cka([])


def test_layer_that_never_fires():
    model1, model2 = Toy(0), Toy(1)
    cka = CKA(model1, model2, model1_layers=["unused", "blocks.0"], progress=False)
    with pytest.raises(LayerNotFiredError, match=r"\['unused'\].*never ran"):
        cka(vectors(2, 8))
    assert_no_hooks(model1)
    assert_no_hooks(model2)


def test_mean_pooled_result_ignores_extra_padding():
    model1, model2 = tiny_bert(9), tiny_bert(10, num_layers=3)
    short = text_batches(3, 6, pad_to=10, seed=11)
    long = [{k: torch.nn.functional.pad(v, (0, 10)) for k, v in batch.items()} for batch in short]
    assert long[0]["input_ids"].shape == (6, 20)
    at_10 = CKA(model1, model2, progress=False)(short)
    at_20 = CKA(model1, model2, progress=False)(long)
    np.testing.assert_allclose(at_20.numpy(), at_10.numpy(), rtol=0, atol=1e-10)


def _internal_imports(module: str) -> set[str]:
    """hf_cka modules that ``hf_cka/<module>.py`` imports anywhere (lazy imports included)."""
    import ast
    from pathlib import Path

    import hf_cka

    tree = ast.parse((Path(hf_cka.__file__).parent / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_cka."):
            found.add(node.module.split(".")[1])
    return found


def test_runner_builds_on_capture_and_never_reaches_the_engine():
    """Data flows one way: engine and runner both build on capture; runner never needs engine."""
    seen, todo = set(), ["runner"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_internal_imports(module))
    assert "capture" in seen and "engine" not in seen
    assert "capture" in _internal_imports("engine")
    assert "runner" not in _internal_imports("capture") | _internal_imports("engine")
