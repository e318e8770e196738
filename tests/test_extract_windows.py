"""Extraction sorts by length over memory-bounded windows of many CKA batches, and the stored
values equal an unsorted extraction's to float rounding: the distances within 1e-12 (relative to
the largest distance) and the CKA within 1e-12 for a float64 model, 1e-7 for a float32 one (its
pooled rows within 4 float32 ulps)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tiny
import torch

from hf_cka.capture import Extractor
from hf_cka.combine import combine
from hf_cka.errors import InvalidInputError
from hf_cka.extract import ExtractOptions, extract
from hf_cka.layers import resolve_layers
from hf_cka.models import LoadedModel, ModelLoader

TEXTS = tiny.varied_texts(120, seed=3)  # batch_size 6: 20 CKA batches
TOLERANCE = {"float64": 1e-12, "float32": 1e-7}
# the pooled rows themselves (in the model's dtype) differ by a few units in the last place
FEATURE_ULPS = {"float64": 1e-12, "float32": 4 * torch.finfo(torch.float32).eps}


@pytest.fixture(scope="module", params=["float64", "float32"])
def bert(saved, request: pytest.FixtureRequest) -> tuple[LoadedModel, list[str], str]:
    loaded = ModelLoader(dtype=request.param).load(saved("bert"))
    return loaded, resolve_layers(loaded.model, "auto", model_name=loaded.name), request.param


@pytest.fixture
def window_sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Samples of every window the extraction forwards (one ``chunk_features`` call each)."""
    sizes: list[int] = []
    original = Extractor.chunk_features

    def spy(self: Extractor, encodings, batch_sizes, batch_size, sort):  # noqa: ANN001, ANN202
        sizes.append(sum(batch_sizes))
        return original(self, encodings, batch_sizes, batch_size, sort)

    monkeypatch.setattr(Extractor, "chunk_features", spy)
    yield sizes


def _options(**changes: object) -> ExtractOptions:
    return ExtractOptions(batch_size=6, progress=False, features=True, **changes)  # type: ignore[arg-type]


def test_sorted_windows_equal_the_unsorted_extraction(bert, window_sizes: list[int]) -> None:
    loaded, layers, dtype = bert
    unsorted = extract(loaded, layers, "mean", TEXTS, _options(sort_by_length=False))
    window_sizes.clear()  # (unsorted: each window is forwarded batch by batch)
    windowed = extract(loaded, layers, "mean", TEXTS, _options(chunk_batches=2))
    assert window_sizes == [12, 108]  # the first window measures; the rest fits in 1 GB
    tol = TOLERANCE[dtype]
    scale = unsorted.distances.abs().max()
    assert (windowed.distances - unsorted.distances).abs().max() <= tol * scale
    assert windowed.batch_digests == unsorted.batch_digests
    for layer in layers:
        assert unsorted.features is not None and windowed.features is not None
        rows = unsorted.features[layer].double()
        gap = (windowed.features[layer].double() - rows).abs().max()
        assert gap <= FEATURE_ULPS[dtype] * rows.abs().max()
    self_unsorted = combine(unsorted, unsorted).matrix
    torch.testing.assert_close(combine(windowed, windowed).matrix, self_unsorted, atol=tol, rtol=0)


def test_windows_hold_at_most_the_buffer(bert, window_sizes: list[int]) -> None:
    loaded, layers, _ = bert
    first = extract(loaded, layers, "mean", TEXTS, _options(chunk_batches=1))
    per_sample = sum(
        first.features[layer][0].numel() * first.features[layer].element_size()  # type: ignore[index]
        for layer in layers
    )
    window_sizes.clear()
    budget = 25 * per_sample  # four 6-sample batches per window
    bounded = extract(loaded, layers, "mean", TEXTS, _options(chunk_batches=1, buffer_bytes=budget))
    assert window_sizes == [6, 24, 24, 24, 24, 18]
    assert all(size * per_sample <= budget for size in window_sizes[1:])
    torch.testing.assert_close(bounded.distances, first.distances, atol=1e-6, rtol=1e-6)
    assert bounded.batch_sizes == first.batch_sizes


def test_buffer_must_be_positive() -> None:
    with pytest.raises(InvalidInputError, match="buffer_bytes >= 1"):
        ExtractOptions(buffer_bytes=0)
