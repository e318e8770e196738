"""``AutoCKA`` end to end on tiny local models: padding invariance of the pooled features,
length-sorted forwards, forward-pass counts (self-comparison, pairs, drift), features that
reproduce ``compare`` and the token-level mode."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import typing
import warnings
from pathlib import Path

import pytest
import tiny
import torch

import hf_cka
from hf_cka import MinibatchCKA, distributed
from hf_cka.auto import AutoCKA
from hf_cka.data import batch_samples, probe_corpus
from hf_cka.errors import EstimatorWarning, InvalidInputError, TokenizerMismatchError
from hf_cka.logging import get_logger
from hf_cka.options import RunChanges, RunOptions

TEXTS = tiny.varied_texts(32)


def test_public_exports() -> None:
    from hf_cka.drift import DriftResult
    from hf_cka.result import CKAResult

    assert hf_cka.AutoCKA is AutoCKA
    assert (hf_cka.CKAResult, hf_cka.DriftResult) == (CKAResult, DriftResult)
    assert {"AutoCKA", "CKAResult", "DriftResult", "RunOptions"} <= set(hf_cka.__all__)
    for name in hf_cka.__all__:  # every lazy export resolves
        assert getattr(hf_cka, name) is not None, name
    assert set(hf_cka.__all__) <= set(dir(hf_cka))
    assert hf_cka.cli.PROG == "hf-cka"  # submodules resolve as attributes too
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_cka.nope  # noqa: B018


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


# The tolerances that README.md and docs/distributed.md state for "sorted vs unsorted": the
# padded forward batches differ, so the features differ by their dtype's rounding (measured: 4e-8
# with float32 weights, 3e-16 with float64).
SORTING_ATOL = {"float32": 1e-7, "float64": 1e-12}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("chunk_batches", [1, 3, 8])
def test_length_sorted_forwards_give_the_unsorted_result(
    saved, chunk_batches: int, dtype: str
) -> None:
    texts = tiny.varied_texts(45, seed=1)  # batch_size 6: 7 CKA batches, the last of 9 (6 + 3)
    auto = AutoCKA.from_pretrained(saved("bert"), saved("gpt2"), dtype=dtype)
    options = {"batch_size": 6, "progress": False}
    unsorted = auto.compare(texts, sort_by_length=False, **options)
    result = auto.compare(texts, sort_by_length=True, chunk_batches=chunk_batches, **options)
    assert (result.metadata["n_batches"], result.metadata["n_samples"]) == (7, 45)
    torch.testing.assert_close(result.matrix, unsorted.matrix, atol=SORTING_ATOL[dtype], rtol=0)


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
    torch.testing.assert_close(sorted_run.matrix, expected, atol=SORTING_ATOL["float32"], rtol=0)


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


@pytest.mark.parametrize(
    ("texts", "batch_size"), [(TEXTS[:1], 1), (TEXTS[:3], 2), (TEXTS[:5], 1), (TEXTS[:9], 3)]
)
def test_extract_features_takes_any_sample_count_and_batch_size(
    saved, texts: list[str], batch_size: int
) -> None:
    """No HSIC is computed: 1 sample, 3 samples, batches of 1 all work, as one batch would."""
    auto = AutoCKA.from_pretrained(saved("bert"))
    options = {"sort_by_length": False, "max_length": 128}
    feats = auto.extract_features(texts, batch_size=batch_size, **options)
    whole = auto.extract_features(texts, batch_size=len(texts), **options)
    assert {tuple(f.shape) for f in feats.values()} == {(len(texts), tiny.HIDDEN)}
    for layer in auto.layers_a:
        torch.testing.assert_close(feats[layer], whole[layer], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [0, -1, "2", 2.0, True])
def test_extract_features_rejects_a_bad_batch_size(saved, batch_size: object) -> None:
    with pytest.raises(InvalidInputError, match="batch_size"):
        AutoCKA.from_pretrained(saved("bert")).extract_features(TEXTS, batch_size=batch_size)


# ---------------------------------------------------------------------------- run options


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"batch_size": 0}, r"batch_size >= 4"),
        ({"batch_size": 3}, r"batch_size >= 4"),
        ({"batch_size": "8"}, r"batch_size as an int >= 4, got '8' \(str\)"),
        ({"batch_size": 8.0}, r"batch_size as an int >= 4, got 8.0 \(float\)"),
        ({"batch_size": True}, r"batch_size as an int"),
        ({"max_length": -1}, r"max_length >= 1"),
        ({"max_length": 0}, r"max_length >= 1"),
        ({"max_length": 64.0}, r"max_length as an int"),
        ({"num_samples": 0}, r"num_samples >= 1"),
        ({"chunk_batches": 0}, r"chunk_batches >= 1"),
        ({"null_permutations": -1}, r"null_permutations >= 0"),
        ({"kernel": "rbff"}, r"kernel in \('linear', 'rbf'\), got 'rbff'.*Did you mean 'rbf'"),
        ({"estimator": "exact"}, r"estimator in"),
        ({"pooling": "median"}, r"pooling in"),
        ({"threshold": "1"}, r"threshold as a number"),
        ({"target_stderr": 0.0}, r"target_stderr > 0"),
        ({"target_stderr": 0.01, "estimator": "linear"}, r"estimator='minibatch'"),
    ],
)
def test_run_options_reject_bad_values_with_a_typed_error(changes: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as caught:
        RunOptions(**changes)
    assert isinstance(caught.value, ValueError)


def test_compare_validates_options_before_any_forward(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("bert"))
    counts, handles = count_forwards(auto.model_a.model)
    try:
        with pytest.raises(InvalidInputError, match="batch_size as an int"):
            auto.compare(TEXTS, batch_size="8")
        with pytest.raises(InvalidInputError, match=r"unknown run option\(s\) \['batchsize'\]"):
            auto.compare(TEXTS, batchsize=8)  # type: ignore[call-arg]
        with pytest.raises(InvalidInputError, match="pooling='mean'.*from_pretrained"):
            auto.compare(TEXTS, pooling="max")
        with pytest.raises(InvalidInputError, match="give the options pooling='mean'"):
            auto.compare(TEXTS, RunOptions(pooling="max"))
    finally:
        for handle in handles:
            handle.remove()
    assert counts == [0]


def test_run_changes_lists_exactly_the_run_options_fields() -> None:
    """``RunChanges`` types the keyword arguments of compare/drift: it must mirror RunOptions."""
    fields = {f.name: f.type for f in dataclasses.fields(RunOptions)}
    assert typing.get_type_hints(RunChanges) == typing.get_type_hints(RunOptions)
    assert list(RunChanges.__annotations__) == list(fields)


def test_compare_takes_a_run_options_object_and_keyword_changes(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("bert"), saved("bert", 1))
    options = RunOptions(batch_size=8, progress=False, sort_by_length=False)
    by_object = auto.compare(TEXTS, options)
    by_keywords = auto.compare(TEXTS, batch_size=8, progress=False, sort_by_length=False)
    changed = auto.compare(TEXTS, options, batch_size=16)
    torch.testing.assert_close(by_object.matrix, by_keywords.matrix, atol=0, rtol=0)
    assert (by_object.metadata["n_batches"], changed.metadata["n_batches"]) == (4, 2)


def test_drift_takes_typed_options(saved, tmp_path: Path) -> None:
    options = RunOptions(batch_size=16, progress=False)
    drift = AutoCKA.drift(saved("bert"), [saved("bert", 1)], TEXTS, options=options, batch_size=8)
    assert drift.metadata["n_batches"] == 4 and drift.metadata["batch_size"] == 8
    with pytest.raises(InvalidInputError, match="batch_size >= 4"):  # before any model loads
        AutoCKA.drift(str(tmp_path / "missing"), [str(tmp_path / "gone")], batch_size=2)


def test_max_length_is_honoured_or_refused_never_ignored(saved) -> None:
    """BERT's tokenizer adds [CLS] and [SEP]: max_length=2 or less leaves no text (the tokenizer
    would silently ignore 1); GPT-2 adds none, so max_length=1 keeps exactly one token."""
    bert = AutoCKA.from_pretrained(saved("bert"))
    for max_length in (1, 2):
        with pytest.raises(InvalidInputError, match=r"adds 2 special token\(s\).*>= 3"):
            bert.compare(TEXTS, max_length=max_length, progress=False)
        with pytest.raises(InvalidInputError, match="max_length"):
            bert.extract_features(TEXTS, max_length=max_length)
    gpt2 = AutoCKA.from_pretrained(saved("gpt2"), saved("gpt2", 1))
    one = gpt2.compare(TEXTS, max_length=1, batch_size=8, progress=False)
    full = gpt2.compare(TEXTS, max_length=128, batch_size=8, progress=False)
    assert one.metadata["max_length"] == 1
    assert not torch.allclose(one.matrix, full.matrix)  # the truncation really happened
    feats = gpt2.extract_features(TEXTS, max_length=1, sort_by_length=False)
    first_tokens = [gpt2.model_a.processor.decode(ids[:1]) for ids in
                    gpt2.model_a.processor(TEXTS)["input_ids"]]  # fmt: skip
    again = gpt2.extract_features(first_tokens, max_length=128, sort_by_length=False)
    for layer in gpt2.layers_a:
        torch.testing.assert_close(feats[layer], again[layer], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["layers_a", "layers_b"])
def test_an_empty_layer_list_fails_at_construction(saved, tmp_path: Path, side: str) -> None:
    missing = str(tmp_path / "no-such-model")  # the check comes before any load
    with pytest.raises(InvalidInputError, match=f"at least one layer in {side}"):
        AutoCKA.from_pretrained(missing, missing, **{side: []})
    with pytest.raises(InvalidInputError, match="at least one layer in layers"):
        AutoCKA.drift(missing, [missing], layers=[])


# ---------------------------------------------------------------------------- progress, ranks


def test_progress_bar_moves_within_a_chunk(saved, bar_positions: list[float]) -> None:
    """One chunk of 8 CKA batches: the bar advances during the forward passes, before the chunk
    is complete, and ends on the exact batch count."""
    positions = bar_positions
    at_first_batch: list[list[float]] = []

    def first_batch(done: int, total: int, matrix: torch.Tensor) -> None:
        if not at_first_batch:
            at_first_batch.append(list(positions))

    auto = AutoCKA.from_pretrained(saved("bert"), saved("gpt2"))
    auto.compare(TEXTS, batch_size=4, chunk_batches=8, callback=first_batch, progress=True)
    (before,) = at_first_batch
    assert len([p for p in before if 0 < p < 8]) >= 8, before  # each forward of each model
    assert positions == sorted(positions) and positions[-1] == 8


def test_warnings_are_issued_by_the_main_process_only(
    saved, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = AutoCKA.from_pretrained(saved("bert"))
    with pytest.warns(EstimatorWarning, match="only one batch"):
        auto.compare(TEXTS[:8], batch_size=8, progress=False)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto.compare(TEXTS[:8], batch_size=8, progress=False)


def test_rank_aware_logger_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    logger = get_logger("hf_cka.test")
    with caplog.at_level(logging.INFO, logger="hf_cka.test"):
        logger.info("from the main process")
        monkeypatch.setattr(distributed, "is_main_process", lambda: False)
        logger.info("from another process")
        logger.info("from every process", main_process_only=False)
    assert [r.getMessage() for r in caplog.records] == [
        "from the main process", "from every process",
    ]  # fmt: skip
