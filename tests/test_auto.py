"""``AutoCKA`` end to end on tiny local models: padding invariance of the pooled features,
length-sorted forwards, forward-pass counts (self-comparison, pairs, drift), features that
reproduce ``compare`` and the token-level mode."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny
import torch
from transformers import PreTrainedModel

import hf_cka
from hf_cka import MinibatchCKA
from hf_cka.auto import AutoCKA
from hf_cka.data import batch_samples, probe_corpus
from hf_cka.errors import InvalidInputError, TokenizerMismatchError

TEXTS = tiny.varied_texts(32)


def test_public_exports() -> None:
    from hf_cka.result import CKAResult, DriftResult

    assert hf_cka.AutoCKA is AutoCKA
    assert (hf_cka.CKAResult, hf_cka.DriftResult) == (CKAResult, DriftResult)
    assert {"AutoCKA", "CKAResult", "DriftResult"} <= set(hf_cka.__all__)


# ---------------------------------------------------------------------- padding invariance

SHORT = ["the cat sat", "a dog ran home", "rain fell", "she smiled at him"]
LONG = [" ".join(probe_corpus()[i : i + 3]) for i in range(0, 12, 3)]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean", "last", "max"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_padding_never_changes_a_samples_features(saved, kind: str, pooling: str, side: str):
    """A text's features are the same batched alone or with much longer texts (more padding).

    The tokenizer is switched to ``side`` AFTER loading, as a user might do; DESIGN.md requires
    invariance for either padding side.
    """
    auto = AutoCKA.from_pretrained(saved(kind), pooling=pooling)
    auto.model_a.processor.padding_side = side
    options = {"sort_by_length": False, "max_length": 128}
    alone = auto.extract_features(SHORT, batch_size=4, **options)
    mixed = auto.extract_features(SHORT + LONG, batch_size=8, **options)
    lengths = [len(ids) for ids in auto.model_a.processor(SHORT + LONG)["input_ids"]]
    assert max(lengths[4:]) > 3 * max(lengths[:4])  # the long texts really add padding
    assert list(alone) == list(mixed) == auto.layers_a
    assert {tuple(f.shape) for f in mixed.values()} == {(8, tiny.HIDDEN)}
    errors = {layer: (mixed[layer][:4] - alone[layer]).abs().max().item() for layer in alone}
    assert max(errors.values()) < 1e-5, f"max |change| per layer with {side} padding: {errors}"


# ------------------------------------------------------------------------- length sorting


@pytest.mark.parametrize("chunk_batches", [1, 3, 8])
def test_length_sorted_forwards_give_the_unsorted_result(saved, chunk_batches: int) -> None:
    texts = tiny.varied_texts(45, seed=1)  # batch_size 6: 7 CKA batches, the last of 9 (6 + 3)
    auto = AutoCKA.from_pretrained(saved("bert"), saved("gpt2"))
    options = {"batch_size": 6, "progress": False}
    unsorted = auto.compare(texts, sort_by_length=False, **options)
    result = auto.compare(texts, sort_by_length=True, chunk_batches=chunk_batches, **options)
    assert (result.metadata["n_batches"], result.metadata["n_samples"]) == (7, 45)
    torch.testing.assert_close(result.matrix, unsorted.matrix, atol=1e-6, rtol=0)


def test_sorted_feature_rows_follow_the_data_order(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("gpt2"))
    texts = tiny.varied_texts(19, seed=2)
    plain = auto.extract_features(texts, batch_size=19, sort_by_length=False)
    in_order = auto.extract_features(texts, batch_size=5, sort_by_length=True)
    for layer in auto.layers_a:
        torch.testing.assert_close(in_order[layer], plain[layer], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- forward counts


def count_forwards(*models: torch.nn.Module) -> tuple[list[int], list]:
    """Per model, a counter of its top-level forward calls, and the hook handles."""
    counts = [0] * len(models)

    def hook_for(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            counts[index] += 1

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(models)]
    return counts, handles


@pytest.mark.parametrize("sort_by_length", [False, True])
def test_self_comparison_runs_one_forward_per_batch(saved, sort_by_length: bool) -> None:
    path = saved("bert")
    results = []
    for auto in (AutoCKA.from_pretrained(path), AutoCKA.from_pretrained(path, path)):
        assert auto.model_b is auto.model_a  # loaded once
        counts, handles = count_forwards(auto.model_a.model)
        result = auto.compare(TEXTS, batch_size=8, sort_by_length=sort_by_length, progress=False)
        for handle in handles:
            handle.remove()
        assert counts == [4]  # 32 texts, batches of 8
        assert result.metadata["n_batches"] == 4
        torch.testing.assert_close(
            result.matrix.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-10, rtol=0
        )
        results.append(result.matrix)
    torch.testing.assert_close(results[0], results[1], atol=1e-12, rtol=0)


def test_two_models_run_one_forward_each_per_batch(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("bert"), saved("bert", 1))
    counts, handles = count_forwards(auto.model_a.model, auto.model_b.model)
    auto.compare(TEXTS, batch_size=8, progress=False)
    for handle in handles:
        handle.remove()
    assert counts == [4, 4]


@pytest.fixture
def forwards_by_name() -> Iterator[Counter]:
    """Counts forward calls of every ``PreTrainedModel`` by its ``name_or_path``."""
    counts: Counter = Counter()

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, PreTrainedModel):
            counts[module.name_or_path] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield counts
    handle.remove()


def test_drift_runs_the_base_once_per_batch(saved, tmp_path: Path, forwards_by_name) -> None:
    base = saved("bert")
    same = str(shutil.copytree(base, tmp_path / "bert-copy"))
    checkpoints = [same, saved("bert", 1), saved("bert", 2)]
    drift = AutoCKA.drift(base, checkpoints, TEXTS, batch_size=8, progress=False)
    assert dict(forwards_by_name) == {name: 4 for name in [base, *checkpoints]}
    assert drift.similarity.shape == (tiny.LAYERS["bert"] + 1, 3)
    assert drift.similarity.dtype == torch.float64
    assert drift.checkpoints == checkpoints and drift.base == base
    torch.testing.assert_close(
        drift.similarity[:, 0], torch.ones(4, dtype=torch.float64), atol=1e-10, rtol=0
    )
    assert bool((drift.similarity[1:, 1:] < 1 - 1e-6).all())  # other weights, other blocks
    assert drift.metadata["n_batches"] == 4 and drift.metadata["batch_size"] == 8


# ---------------------------------------------------------------------------- features


def test_extracted_features_reproduce_compare(saved) -> None:
    texts = tiny.varied_texts(27, seed=3)  # batches of 8, 8, 11
    auto = AutoCKA.from_pretrained(saved("bert"), saved("gpt2"))
    options = {"batch_size": 8, "sort_by_length": False}
    feats_a = auto.extract_features(texts, model="a", **options)
    feats_b = auto.extract_features(texts, model="b", **options)
    assert list(feats_b) == auto.layers_b
    assert {tuple(f.shape) for f in feats_b.values()} == {(27, tiny.HIDDEN)}
    sizes = [len(batch) for batch in batch_samples(range(27), 8)]
    assert sizes == [8, 8, 11]

    metric = MinibatchCKA(len(auto.layers_a), len(auto.layers_b))
    start = 0
    for size in sizes:
        metric.update(
            [feats_a[layer][start : start + size] for layer in auto.layers_a],
            [feats_b[layer][start : start + size] for layer in auto.layers_b],
        )
        start += size
    expected = metric.compute()
    result = auto.compare(texts, progress=False, **options)
    torch.testing.assert_close(result.matrix, expected, atol=1e-10, rtol=0)
    sorted_run = auto.compare(texts, batch_size=8, progress=False)
    torch.testing.assert_close(sorted_run.matrix, expected, atol=1e-6, rtol=0)


def test_extract_features_rejects_an_unknown_side(saved) -> None:
    with pytest.raises(InvalidInputError, match="'a' or 'b'"):
        AutoCKA.from_pretrained(saved("bert")).extract_features(TEXTS, model="c")


# ---------------------------------------------------------------------------- token level


def test_token_pooling_needs_identical_tokenizers(saved) -> None:
    with pytest.raises(TokenizerMismatchError, match="tokenize identically"):
        AutoCKA.from_pretrained(saved("bert"), saved("gpt2"), pooling="tokens")


def test_token_pooling_counts_every_real_token(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("bert"), saved("bert", 1), pooling="tokens")
    texts = TEXTS[:12]
    result = auto.compare(texts, batch_size=4, max_length=32, progress=False)
    ids = auto.model_a.processor(texts, truncation=True, max_length=32)["input_ids"]
    tokens = sum(len(row) for row in ids)
    assert tokens > 12 * 3
    assert (result.metadata["n_samples"], result.metadata["n_batches"]) == (tokens, 3)
    assert result.metadata["pooling"] == "tokens"
    assert result.matrix.shape == (4, 4) and bool(torch.isfinite(result.matrix).all())
    assert not math.isclose(result.matrix[0, 0].item(), 1.0)  # two different models
