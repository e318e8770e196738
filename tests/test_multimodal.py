"""Across modalities: paired columns, CLIP towers, audio models and the measures beyond CKA.

Tiny models from configs (tests/tiny.py) saved with processors built offline, on synthetic
image-caption and waveform data.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import tiny
import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from hf_cka import AutoCKA
from hf_cka.cli import main
from hf_cka.errors import (
    ColumnNotFoundError,
    ColumnTypeError,
    FullDataMemoryError,
    InvalidInputError,
    ModelNotFoundError,
)
from hf_cka.measures import mutual_knn, procrustes
from hf_cka.options import RunOptions
from hf_cka.result import CKAResult

N = 12
RATE = 16_000  # the tiny feature extractors' sampling rate
CAPTIONS = tiny.varied_texts(N, seed=3, low=2, high=8)
FAST = {"batch_size": 4, "progress": False, "max_length": 16}


def caption_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer of < 100 ids (the tiny CLIP text tower's vocabulary)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    tok.train_from_iterator(
        CAPTIONS, trainers.WordLevelTrainer(vocab_size=90, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)]
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
        unk_token="[UNK]",
    )  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multimodal")
    clip = root / "clip"
    tiny.build_multimodal("clip").save_pretrained(clip)
    tf.CLIPProcessor(
        image_processor=tf.CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=caption_tokenizer(),
    ).save_pretrained(clip)
    siglip = root / "siglip"
    tiny.build_multimodal("siglip").save_pretrained(siglip)
    tf.SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(siglip)
    caption_tokenizer().save_pretrained(siglip)
    whisper, wav2vec2 = root / "whisper", root / "wav2vec2"
    tiny.build_multimodal("whisper").save_pretrained(whisper)
    # 1 s windows of 32 frames: the tiny encoder's 2 x max_source_positions
    tf.WhisperFeatureExtractor(
        feature_size=8, sampling_rate=RATE, hop_length=500, chunk_length=1, n_fft=1000
    ).save_pretrained(whisper)
    tiny.build_multimodal("wav2vec2").save_pretrained(wav2vec2)
    tf.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=RATE, do_normalize=True, return_attention_mask=True
    ).save_pretrained(wav2vec2)
    return {
        "clip": str(clip),
        "siglip": str(siglip),
        "vit": str(tiny.save("vit", root / "vit")),
        "bert": str(tiny.save("bert", root / "bert")),
        "whisper": str(whisper),
        "wav2vec2": str(wav2vec2),
    }


def images(n: int = N, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]


def waveforms(n: int = N, seed: int = 0) -> list[np.ndarray]:
    """Sines of random pitch and length (0.2 to 0.9 s) plus noise."""
    rng = np.random.default_rng(seed)
    return [
        (np.sin(np.arange(size) * pitch) + 0.1 * rng.standard_normal(size)).astype(np.float32)
        for size, pitch in zip(rng.integers(300, 1500, n), rng.uniform(0.05, 0.5, n), strict=True)
    ]


@pytest.fixture(scope="module")
def pairs() -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images(), "caption": CAPTIONS}, features=features)


@pytest.fixture(scope="module")
def vit_bert(folders: dict[str, str]) -> AutoCKA:
    return AutoCKA.from_pretrained(folders["vit"], folders["bert"])


def forward_counter(auto: AutoCKA) -> list[int]:
    """A list whose length counts the forward passes of any module of both models."""
    calls: list[int] = []
    for loaded in (auto.model_a, auto.model_b):
        for module in loaded.model.modules():
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


# ----------------------------------------------------------------------------- paired columns


def test_vit_vs_bert_on_image_caption_pairs(vit_bert: AutoCKA, pairs: datasets.Dataset) -> None:
    """ViT reads the images, BERT the captions of the same rows: (3, 4) with both measures, and
    the mutual k-NN equals the measure of each model's own features of the same rows."""
    cka = vit_bert.compare(pairs, column_a="image", column_b="caption", **FAST)
    assert cka.matrix.shape == (1 + tiny.LAYERS["vit"], 1 + tiny.LAYERS["bert"])
    assert cka.stderr is not None and torch.isfinite(cka.matrix).all()
    assert (cka.metadata["column_a"], cka.metadata["column_b"]) == ("image", "caption")
    assert (cka.metadata["measure"], cka.metadata["n_samples"]) == ("cka", N)

    knn = vit_bert.compare(
        pairs, column_a="image", column_b="caption", measure="mutual_knn",
        measure_params={"k": 3}, **FAST,
    )  # fmt: skip
    assert knn.matrix.shape == cka.matrix.shape and knn.stderr is None
    assert (knn.metadata["measure"], knn.metadata["measure_params"]) == ("mutual_knn", {"k": 3})
    assert knn.metadata["estimator"] is None
    image_features = vit_bert.extract_features(images(), model="a", batch_size=4)
    caption_features = vit_bert.extract_features(CAPTIONS, model="b", batch_size=4, max_length=16)
    expected = torch.tensor(
        [[mutual_knn(x, y, k=3).item() for y in caption_features.values()]
         for x in image_features.values()],
        dtype=torch.float64,
    )  # fmt: skip
    torch.testing.assert_close(knn.matrix, expected, atol=1e-12, rtol=0)
    table = knn.to_pandas()
    assert len(table) == knn.matrix.numel() and table["stderr"].isna().all()


def test_every_batch_holds_the_same_rows_on_both_sides(folders: dict[str, str]) -> None:
    """BERT on column 'a' vs BERT on column 'b' holding the same texts, shuffled by rows of
    unequal length (so the length sort reorders each side differently): Procrustes of a layer
    with itself is 1 exactly when every row meets its own pair."""
    auto = AutoCKA.from_pretrained(folders["bert"], layers_a=[-1], layers_b=[-1])
    texts = tiny.varied_texts(N, seed=5, low=1, high=20)
    data = datasets.Dataset.from_dict({"a": texts, "b": list(texts)})
    result = auto.compare(data, column_a="a", column_b="b", measure="procrustes", **FAST)
    assert not result.is_self_comparison
    torch.testing.assert_close(result.matrix, torch.ones(1, 1, dtype=torch.float64))
    shifted = datasets.Dataset.from_dict({"a": texts, "b": texts[1:] + texts[:1]})
    moved = auto.compare(shifted, column_a="a", column_b="b", measure="procrustes", **FAST)
    assert moved.matrix.item() < 0.999


def test_paired_local_file_and_hub_dataset_match_the_in_memory_dataset(
    vit_bert: AutoCKA, pairs: datasets.Dataset, tmp_path: Path, hub
) -> None:
    columns = {"column_a": "image", "column_b": "caption"}
    reference = vit_bert.compare(pairs, **columns, **FAST).matrix
    path = tmp_path / "pairs.parquet"
    pairs.to_parquet(str(path))
    local = vit_bert.compare(str(path), **columns, **FAST)
    torch.testing.assert_close(local.matrix, reference, atol=1e-10, rtol=0)
    assert local.metadata["dataset"] == str(path)
    repo_id = f"{hub.user}/image-captions"
    pairs.push_to_hub(repo_id)
    remote = vit_bert.compare(repo_id, **columns, **FAST)
    torch.testing.assert_close(remote.matrix, reference, atol=1e-10, rtol=0)
    assert (remote.metadata["dataset"], remote.metadata["column_b"]) == (repo_id, "caption")


@pytest.mark.parametrize(
    ("columns", "error", "words"),
    [
        ({"column_a": "image", "column_b": "title"}, ColumnNotFoundError, ["'title' (column_b)"]),
        ({"column_a": "photo", "column_b": "caption"}, ColumnNotFoundError, ["(column_a)"]),
        ({"column_a": "image", "column_b": "image"}, ColumnTypeError, ["'image' (column_b)",
                                                                        "holds image",
                                                                        "reads text"]),
        ({"column_a": "caption", "column_b": "caption"}, ColumnTypeError, ["(column_a)",
                                                                           "holds text",
                                                                           "reads image"]),
    ],
)  # fmt: skip
def test_a_bad_column_is_one_typed_line_before_any_forward_pass(
    folders: dict[str, str], pairs: datasets.Dataset, columns: dict, error: type, words: list
) -> None:
    auto = AutoCKA.from_pretrained(folders["vit"], folders["bert"])
    calls = forward_counter(auto)
    with pytest.raises(error) as raised:
        auto.compare(pairs, **columns, **FAST)
    message = str(raised.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert calls == []


def test_paired_columns_need_both_and_a_dataset(vit_bert: AutoCKA) -> None:
    with pytest.raises(InvalidInputError, match="column_a and column_b go together"):
        RunOptions(column_a="image")
    with pytest.raises(InvalidInputError, match="drop one of them"):
        RunOptions(column_a="image", column_b="caption", text_column="body")
    with pytest.raises(InvalidInputError, match="pick two columns of a dataset"):
        vit_bert.compare(CAPTIONS, column_a="image", column_b="caption", **FAST)


# ------------------------------------------------------------------------------- CLIP towers


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_towers_compare_on_the_same_rows(
    folders: dict[str, str], pairs: datasets.Dataset, kind: str
) -> None:
    """Image tower vs text tower of one CLIP (or SigLIP); each tower runs alone (the whole
    model's forward never) on its processor part, and gives the tower's own hidden states."""
    auto = AutoCKA.from_pretrained(folders[kind], part_a="vision", part_b="text")
    layers = tiny.TOWER_LAYERS
    assert auto.layers_a[-1] == f"vision_model.encoder.layers.{layers['vision'] - 1}"
    assert auto.layers_b[-1] == f"text_model.encoder.layers.{layers['text'] - 1}"
    clip = auto.model_a.model
    assert auto.model_b.model is clip and not auto.same_model
    whole_model_calls: list[int] = []
    clip.register_forward_pre_hook(lambda *_: whole_model_calls.append(1))
    result = auto.compare(pairs, column_a="image", column_b="caption", **FAST)
    assert result.matrix.shape == (1 + layers["vision"], 1 + layers["text"])
    assert torch.isfinite(result.matrix).all() and whole_model_calls == []
    assert (result.metadata["part_a"], result.metadata["part_b"]) == ("vision", "text")

    pixels = auto.model_a.processor(images=images(4), return_tensors="pt")["pixel_values"]
    hidden = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    features = auto.extract_features(images(4), model="a", batch_size=4)
    for index, rows in enumerate(features.values()):
        torch.testing.assert_close(rows, hidden[index].mean(dim=1))


def test_a_clip_tower_compares_with_another_model(folders: dict[str, str]) -> None:
    auto = AutoCKA.from_pretrained(folders["clip"], folders["vit"], part_a="vision")
    result = auto.compare(images(), **FAST)
    assert result.matrix.shape == (1 + tiny.TOWER_LAYERS["vision"], 1 + tiny.LAYERS["vit"])
    assert torch.isfinite(result.matrix).all()


# ------------------------------------------------------------------------------------- audio


def test_whisper_vs_wav2vec2_on_an_audio_column(folders: dict[str, str]) -> None:
    auto = AutoCKA.from_pretrained(folders["whisper"], folders["wav2vec2"])
    assert (auto.model_a.modality, auto.model_b.modality) == ("audio", "audio")
    decoded = [{"array": wave, "sampling_rate": RATE} for wave in waveforms()]
    data = datasets.Dataset.from_dict({"audio": decoded, "text": ["a clip"] * N})
    result = auto.compare(data, **FAST)
    size = 1 + tiny.TOWER_LAYERS["encoder"]
    assert result.matrix.shape == (size, size) and torch.isfinite(result.matrix).all()
    assert result.metadata["text_column"] == "audio"
    from_arrays = auto.compare(waveforms(), **FAST)
    torch.testing.assert_close(from_arrays.matrix, result.matrix, atol=1e-10, rtol=0)


def test_wav2vec2_pooling_skips_the_padded_frames(folders: dict[str, str]) -> None:
    """Waveforms of different lengths padded into one batch pool to what each gives alone."""
    auto = AutoCKA.from_pretrained(folders["wav2vec2"])
    waves = waveforms(4, seed=1)
    batched = auto.extract_features(waves, batch_size=4)
    alone = [auto.extract_features([wave], batch_size=1) for wave in waves]
    for spec, rows in batched.items():
        torch.testing.assert_close(rows, torch.cat([one[spec] for one in alone]), atol=1e-5, rtol=0)


def test_audio_at_another_sampling_rate_is_refused(folders: dict[str, str]) -> None:
    auto = AutoCKA.from_pretrained(folders["wav2vec2"])
    data = [{"array": wave, "sampling_rate": 2 * RATE} for wave in waveforms(4)]
    with pytest.raises(
        InvalidInputError, match=f"expected audio at the feature extractor's {RATE}"
    ):
        auto.extract_features(data)


# ---------------------------------------------------------------------------------- measures


def test_full_data_measure_refuses_beyond_max_bytes_before_any_forward(
    vit_bert: AutoCKA, pairs: datasets.Dataset
) -> None:
    calls = forward_counter(vit_bert)
    with pytest.raises(FullDataMemoryError, match="measure 'rsa' on 12 samples needs about"):
        vit_bert.compare(
            pairs, column_a="image", column_b="caption", measure="rsa", max_bytes=10_000, **FAST
        )
    assert calls == []


def test_measure_options_are_checked() -> None:
    with pytest.raises(InvalidInputError, match=r"takes the parameters \['distance'\]"):
        RunOptions(measure="rsa", measure_params={"k": 3})
    with pytest.raises(InvalidInputError, match="estimator='linear' applies to measure='cka'"):
        RunOptions(measure="svcca", estimator="linear")
    with pytest.raises(InvalidInputError, match="expected measure in"):
        RunOptions(measure="cca")  # type: ignore[arg-type]


def test_a_measure_result_plots_saves_and_reloads(
    vit_bert: AutoCKA, pairs: datasets.Dataset, tmp_path: Path
) -> None:
    result = vit_bert.compare(
        pairs, column_a="image", column_b="caption", measure="procrustes", **FAST
    )
    fig, ax = result.plot()
    assert ax.child_axes[-1].get_ylabel() == "Procrustes similarity"  # the inset colour bar
    result.save(tmp_path / "run")
    loaded = CKAResult.load(tmp_path / "run")
    assert loaded.metadata["measure"] == "procrustes" and loaded.stderr is None
    torch.testing.assert_close(loaded.matrix, result.matrix)
    x = vit_bert.extract_features(images(), model="a", batch_size=4)
    y = vit_bert.extract_features(CAPTIONS, model="b", batch_size=4, max_length=16)
    first = procrustes(next(iter(x.values())), next(iter(y.values())))
    torch.testing.assert_close(result.matrix[0, 0], first, atol=1e-12, rtol=0)


def test_cli_measure_and_paired_columns(
    folders: dict[str, str], pairs: datasets.Dataset, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "pairs.parquet"
    pairs.to_parquet(str(data))
    out = tmp_path / "out"
    code = main([
        "compare", folders["vit"], folders["bert"], "--dataset", str(data), "--column-a", "image",
        "--column-b", "caption", "--measure", "mutual_knn", "--measure-param", "k=3",
        "--batch-size", "4", "--max-length", "16", "--no-progress", "-o", str(out),
    ])  # fmt: skip
    assert code == 0
    summary = capsys.readouterr().out
    assert "measure=mutual_knn, k=3" in summary and "mean mutual k-NN" in summary, summary
    result = CKAResult.load(out)
    assert (result.metadata["measure"], result.metadata["measure_params"]) == (
        "mutual_knn",
        {"k": 3},
    )
    assert result.metadata["column_a"] == "image" and result.matrix.shape == (3, 4)
    assert main(["compare", folders["vit"], "--measure-param", "k"]) == 2  # one error line
    assert "expected NAME=VALUE such as k=10, got 'k'" in capsys.readouterr().err


def test_a_measure_has_a_permutation_null(vit_bert: AutoCKA, pairs: datasets.Dataset) -> None:
    result = vit_bert.compare(
        pairs, column_a="image", column_b="caption", measure="mutual_knn",
        measure_params={"k": 3}, null_permutations=2, **FAST,
    )  # fmt: skip
    assert result.null is not None and result.null.shape == result.matrix.shape
    assert ((result.null >= 0) & (result.null <= 1)).all()


def test_a_full_data_measure_refuses_several_processes(
    vit_bert: AutoCKA, pairs: datasets.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The features would have to be gathered, not summed: refused before any forward pass."""
    from hf_cka import distributed

    calls = forward_counter(vit_bert)
    monkeypatch.setattr(distributed, "num_processes", lambda: 2)
    with pytest.raises(InvalidInputError, match="needs every sample in one process"):
        vit_bert.compare(pairs, column_a="image", column_b="caption", measure="svcca", **FAST)
    assert calls == []


def test_a_tower_without_its_processor_part_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "clip-tokenizer-only"
    tiny.build_multimodal("clip").save_pretrained(folder)
    caption_tokenizer().save_pretrained(folder)
    text = AutoCKA.from_pretrained(str(folder), part_a="text", part_b="text")  # has a tokenizer
    assert text.model_a.modality == "text" and text.model_a.tower_path == "text_model"
    with pytest.raises(ModelNotFoundError, match="the vision tower of .* needs an image processor"):
        AutoCKA.from_pretrained(str(folder), part_a="vision", part_b="text")


def test_a_measure_result_round_trips_through_the_hub(
    vit_bert: AutoCKA, pairs: datasets.Dataset, hub, tmp_path: Path
) -> None:
    from huggingface_hub import DatasetCard

    result = vit_bert.compare(
        pairs, column_a="image", column_b="caption", measure="mutual_knn",
        measure_params={"k": 3}, **FAST,
    )  # fmt: skip
    repo_id = f"{hub.user}/mutual-knn-run"
    result.push_to_hub(repo_id, local_dir=tmp_path / "push")
    loaded = CKAResult.from_hub(repo_id)
    torch.testing.assert_close(loaded.matrix, result.matrix)
    assert loaded.stderr is None and loaded.metadata["measure_params"] == {"k": 3}
    assert r"| mutual\_knn (k=3) |" in DatasetCard.load(repo_id, repo_type="dataset").text


def test_progress_counts_each_forward_once_for_a_model_reading_two_columns(
    folders: dict[str, str], bar_positions: list[float]
) -> None:
    """BERT on two text columns: two extractors on one module; each of the 4 forward passes of
    a 2-batch chunk (2 per column) moves the bar by half a batch, not twice that."""
    auto = AutoCKA.from_pretrained(folders["bert"])
    texts = tiny.varied_texts(8, seed=2)
    data = datasets.Dataset.from_dict({"a": texts, "b": texts[::-1]})
    auto.compare(data, column_a="a", column_b="b", batch_size=4, chunk_batches=2, max_length=16)
    # one update per forward pass (4), then the chunk's end and the run's end
    assert bar_positions == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0], bar_positions


def test_mutual_knn_with_k_of_at_least_n_is_refused_before_any_forward(
    vit_bert: AutoCKA, pairs: datasets.Dataset
) -> None:
    calls = forward_counter(vit_bert)
    with pytest.raises(
        InvalidInputError, match="mutual_knn needs k < n_samples .* got k=10 for 8 samples"
    ):
        vit_bert.compare(
            pairs, column_a="image", column_b="caption", measure="mutual_knn", num_samples=8,
            **FAST,
        )  # fmt: skip
    assert calls == []


def test_a_callback_gets_nan_until_a_full_data_measure_is_computed(
    vit_bert: AutoCKA, pairs: datasets.Dataset
) -> None:
    seen: list[torch.Tensor] = []
    result = vit_bert.compare(
        pairs, column_a="image", column_b="caption", measure="mutual_knn",
        measure_params={"k": 3}, callback=lambda done, total, matrix: seen.append(matrix), **FAST,
    )  # fmt: skip
    assert len(seen) == N // 4 and all(m.shape == result.matrix.shape for m in seen)
    assert all(m.isnan().all() for m in seen) and not result.matrix.isnan().any()


def test_a_tower_gives_no_other_tower(folders: dict[str, str]) -> None:
    auto = AutoCKA.from_pretrained(folders["clip"], part_a="vision", part_b="text")
    assert auto.model_a.tower("vision") is auto.model_a
    with pytest.raises(InvalidInputError, match="this is the vision tower of"):
        auto.model_a.tower("text")


def test_an_undecodable_column_is_named_as_such(vit_bert: AutoCKA) -> None:
    data = datasets.Dataset.from_dict({"image": [{"x": 1}] * N, "caption": CAPTIONS})
    with pytest.raises(ColumnTypeError, match="holds neither text, image nor audio"):
        vit_bert.compare(data, column_a="image", column_b="caption", **FAST)
