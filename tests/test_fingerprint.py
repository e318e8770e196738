"""Per-model fingerprints: the stored squared distances reproduce minibatch CKA, stores are
validated files and one-commit Hub datasets, and a fingerprint stands in for a model (one
model's forward passes), refusing stores of other samples, batches or settings."""

from __future__ import annotations

import json
import socket
import uuid
from collections import Counter
from pathlib import Path

import pytest
import tiny
import torch

from hf_cka import MinibatchCKA
from hf_cka.auto import AutoCKA, TwoPhaseCKA
from hf_cka.combine import combine
from hf_cka.data import batch_samples, probe_corpus
from hf_cka.errors import FingerprintMismatchError, InvalidInputError, ResultFormatError
from hf_cka.extract import batch_distances
from hf_cka.fingerprint import (
    TENSORS_FILE,
    Fingerprint,
    default_folder,
    full_matrix,
    triangle_size,
)
from hf_cka.functional import squared_distances
from hf_cka.model_files import FINGERPRINT_FILE, is_fingerprint
from hf_cka.options import RunOptions

TEXTS = tiny.varied_texts(45, seed=1)  # batch_size 6: 7 CKA batches, the last of 9 (6 + 3)
OPTIONS = {"batch_size": 6, "progress": False}


@pytest.fixture(scope="module")
def bert_print(saved, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder of the fingerprint of the tiny BERT on ``TEXTS`` (batch size 6)."""
    folder = tmp_path_factory.mktemp("fp") / "bert-fp"
    AutoCKA.fingerprint(saved("bert"), TEXTS, **OPTIONS).save(folder)
    return str(folder)


# ------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_distances_give_the_feature_update(kernel: str) -> None:
    """U(-H D H / 2) and the RBF Gram of D accumulate what update() does from the features,
    to 1e-10, for batches of unequal sizes and features with large offsets."""
    gen = torch.Generator().manual_seed(0)
    live = MinibatchCKA(3, 2, kernel=kernel)
    stored = MinibatchCKA(3, 2, kernel=kernel)
    for n in (32, 7, 32, 10):
        feats_a = [torch.randn(n, 16, generator=gen) * s + 100 for s in (1.0, 10.0, 1e-3)]
        feats_b = [feats_a[0][:, :8] * 2 + torch.randn(n, 8, generator=gen)]
        feats_b.append(torch.randn(n, 24, generator=gen))
        live.update(feats_a, feats_b)
        stored.update_from_distances(
            full_matrix(batch_distances(feats_a), n), full_matrix(batch_distances(feats_b), n)
        )
    torch.testing.assert_close(stored.compute(), live.compute(), atol=1e-10, rtol=0)
    torch.testing.assert_close(stored.compute_stderr(), live.compute_stderr(), atol=1e-10, rtol=0)


def test_stored_triangle_is_the_exact_distance_matrix() -> None:
    x = torch.randn(9, 5, dtype=torch.float64)
    x[3] = x[7]  # identical rows are exactly 0 apart
    full = full_matrix(batch_distances([x]), 9)[0]
    assert batch_distances([x]).shape == (1, triangle_size(9))
    assert torch.equal(full, squared_distances(x - x.mean(dim=0)))
    assert full[3, 7] == 0.0


# ------------------------------------------------------------------- equal to one stream


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_fingerprint_compare_equals_the_single_stream(saved, bert_print: str, kernel) -> None:
    options = {**OPTIONS, "kernel": kernel, "null_permutations": 2, "seed": 3}
    live = AutoCKA.from_pretrained(saved("bert"), saved("gpt2"), dtype="float32")
    expected = live.compare(TEXTS, **options)
    auto = AutoCKA.from_pretrained(bert_print, saved("gpt2"), dtype="float32")
    assert isinstance(auto, TwoPhaseCKA) and isinstance(auto, AutoCKA)
    result = auto.compare(TEXTS, **options)
    for name in ("matrix", "stderr", "null"):
        torch.testing.assert_close(
            getattr(result, name), getattr(expected, name), atol=1e-8, rtol=0
        )
    assert (result.layers_a, result.layers_b) == (expected.layers_a, expected.layers_b)
    for key in ("n_samples", "n_batches", "batch_size", "max_length", "pooling", "estimator"):
        assert result.metadata[key] == expected.metadata[key], key
    assert result.metadata["model_b"] == saved("gpt2")
    assert result.metadata["dtype"] == "float32"


def test_two_stored_fingerprints_reproduce_their_comparison_exactly(saved) -> None:
    """Combining the same stores twice is bit-identical, and equals the pair's stream to 1e-10
    (the same stored Grams)."""
    a = AutoCKA.fingerprint(saved("bert"), TEXTS, dtype="float32", **OPTIONS)
    b = AutoCKA.fingerprint(saved("bert", 1), TEXTS, dtype="float32", **OPTIONS)
    first, second = combine(a, b), combine(a, b)
    assert torch.equal(first.matrix, second.matrix)
    assert first.metadata["two_phase"] is True
    itself = combine(a, a)
    torch.testing.assert_close(
        itself.matrix.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_features_give_the_exact_estimators(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("bert"), saved("gpt2"), dtype="float32")
    expected = auto.compare(TEXTS, estimator="debiased", **OPTIONS)
    a = AutoCKA.fingerprint(saved("bert"), TEXTS, features=True, dtype="float32", **OPTIONS)
    b = AutoCKA.fingerprint(saved("gpt2"), TEXTS, features=True, dtype="float32", **OPTIONS)
    assert a.features is not None and a.features[a.layers[0]].shape == (45, tiny.HIDDEN)
    result = combine(a, b, options=RunOptions(estimator="debiased"))
    torch.testing.assert_close(result.matrix, expected.matrix, atol=1e-8, rtol=0)
    bare = AutoCKA.fingerprint(saved("gpt2"), TEXTS, dtype="float32", **OPTIONS)
    with pytest.raises(InvalidInputError, match="features=True"):
        combine(a, bare, options=RunOptions(estimator="linear"))


def test_shuffle_seed_fixes_a_recorded_composition(saved) -> None:
    shuffled = AutoCKA.fingerprint(saved("bert"), TEXTS, shuffle_seed=7, **OPTIONS)
    order = torch.randperm(45, generator=torch.Generator().manual_seed(7)).tolist()
    permuted = [TEXTS[i] for i in order]
    plain = AutoCKA.fingerprint(saved("bert"), permuted, **OPTIONS)
    assert shuffled.settings["shuffle_seed"] == 7
    assert shuffled.batch_digests == plain.batch_digests  # the same batches...
    assert shuffled.samples_digest != plain.samples_digest  # ...of another sample order
    assert torch.equal(shuffled.distances, plain.distances)
    with pytest.raises(FingerprintMismatchError, match="shuffle_seed"):
        combine(shuffled, plain)


# ---------------------------------------------------------------- one model's forwards


def test_comparing_with_a_fingerprint_runs_one_model(
    saved, bert_print: str, forwards_by_name: Counter
) -> None:
    auto = AutoCKA.from_pretrained(bert_print, saved("gpt2"))
    assert forwards_by_name == Counter()
    result = auto.compare(TEXTS, **OPTIONS)
    assert dict(forwards_by_name) == {saved("gpt2"): 8}  # one sorted chunk: ceil(45 / 6)
    assert result.model_a == saved("bert") and result.metadata["n_batches"] == 7
    forwards_by_name.clear()
    both = AutoCKA.from_pretrained(bert_print, bert_print).compare(TEXTS, **OPTIONS)
    assert forwards_by_name == Counter()  # two stores: no forward pass at all
    torch.testing.assert_close(
        both.matrix.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_fingerprint_data_is_the_default_data(saved, tmp_path: Path) -> None:
    """compare() without data reuses the data the fingerprint names (here the probe corpus)."""
    AutoCKA.fingerprint(saved("bert"), num_samples=40, progress=False).save(tmp_path / "fp")
    result = AutoCKA.from_pretrained(str(tmp_path / "fp"), saved("gpt2")).compare(
        num_samples=40, progress=False
    )
    assert result.metadata["dataset"] == "hf_cka/probe_corpus"
    assert result.metadata["n_samples"] == 40
    listed = AutoCKA.fingerprint(saved("bert"), TEXTS, **OPTIONS)
    listed.save(tmp_path / "listed")
    with pytest.raises(InvalidInputError, match="pass the same data"):
        AutoCKA.from_pretrained(str(tmp_path / "listed"), saved("gpt2")).compare(**OPTIONS)


# ------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"data": TEXTS[:-1]}, "batch 6 of this data"),
        ({"data": TEXTS[::-1]}, "batch 0 of this data"),
        ({"data": TEXTS, "batch_size": 9}, "batch 0 of this data"),
        ({"data": TEXTS[:30]}, "gave 5 CKA batches"),
        ({"data": TEXTS, "max_length": 16}, "max_length=128"),
    ],
)
def test_other_samples_batches_or_settings_are_refused(
    saved, bert_print: str, forwards_by_name: Counter, options: dict, match: str
) -> None:
    auto = AutoCKA.from_pretrained(bert_print, saved("gpt2"))
    arguments = {**OPTIONS, **options}
    with pytest.raises(FingerprintMismatchError, match=match):
        auto.compare(arguments.pop("data"), **arguments)
    if "max_length" in options or "batch 0" in match:
        assert forwards_by_name == Counter()  # refused before any forward pass


def test_mismatched_stores_name_the_difference(saved) -> None:
    base = AutoCKA.fingerprint(saved("bert"), TEXTS, **OPTIONS)
    cases = {
        "pooling='mean'": AutoCKA.fingerprint(saved("gpt2"), TEXTS, pooling="max", **OPTIONS),
        "other samples": AutoCKA.fingerprint(saved("gpt2"), TEXTS[1:] + TEXTS[:1], **OPTIONS),
        "other batch compositions": AutoCKA.fingerprint(
            saved("gpt2"), TEXTS, batch_size=5, progress=False
        ),
    }
    for match, other in cases.items():
        with pytest.raises(FingerprintMismatchError, match=match):
            combine(base, other)
    revised = AutoCKA.fingerprint(saved("gpt2"), TEXTS, **OPTIONS)
    base.data["data_revision"], revised.data["data_revision"] = "a" * 40, "b" * 40
    with pytest.raises(FingerprintMismatchError, match="other revisions of the data"):
        combine(base, revised)


def test_token_pooling_cannot_be_stored(saved) -> None:
    with pytest.raises(InvalidInputError, match="tokens"):
        AutoCKA.fingerprint(saved("bert"), TEXTS, pooling="tokens", **OPTIONS)


# --------------------------------------------------------------------------- files


def test_save_load_round_trip_and_card(saved, bert_print: str) -> None:
    loaded = Fingerprint.load(bert_print)
    assert is_fingerprint(bert_print) and not is_fingerprint(saved("bert"))
    assert loaded.layers == AutoCKA.from_pretrained(saved("bert")).layers_a
    assert loaded.batch_sizes == [len(b) for b in batch_samples(TEXTS, 6)] == [6] * 6 + [9]
    assert loaded.distances.dtype == torch.float64
    assert loaded.model["model"] == saved("bert") and loaded.model["dtype"] == "float32"
    assert loaded.settings["max_length"] == 128 and loaded.settings["pooling"] == "mean"
    assert loaded.data["dataset"] == "in-memory list"
    assert len(loaded.batch_digests) == 7 and len(loaded.samples_digest) == 64
    card = (Path(bert_print) / "README.md").read_text()
    assert "hf-cka-fingerprint" in card and "| Samples | 45 |" in card
    assert sorted(p.name for p in Path(bert_print).iterdir()) == [
        "README.md", FINGERPRINT_FILE, TENSORS_FILE]  # fmt: skip
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in Path(bert_print).iterdir())


def test_damaged_or_foreign_files_are_refused(bert_print: str, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(bert_print, tmp_path / "copy"))
    blob = bytearray((folder / TENSORS_FILE).read_bytes())
    blob[-1] ^= 1
    (folder / TENSORS_FILE).write_bytes(bytes(blob))
    with pytest.raises(ResultFormatError, match="sha256"):
        Fingerprint.load(folder)
    doc = json.loads((Path(bert_print) / FINGERPRINT_FILE).read_text())
    for change, match in (({"schema": "other"}, "schema"), ({"schema_version": 9}, "version")):
        folder = Path(shutil.copytree(bert_print, tmp_path / uuid.uuid4().hex))
        (folder / FINGERPRINT_FILE).write_text(json.dumps({**doc, **change}))
        with pytest.raises(ResultFormatError, match=match):
            Fingerprint.load(folder)
    folder = Path(shutil.copytree(bert_print, tmp_path / "sizes"))
    (folder / FINGERPRINT_FILE).write_text(json.dumps({**doc, "batch_sizes": [6] * 7 + [8]}))
    with pytest.raises(ResultFormatError, match="expected torch.float64"):
        Fingerprint.load(folder)
    with pytest.raises(ResultFormatError, match="not a fingerprint folder"):
        Fingerprint.load(tmp_path / "missing")


def test_size_of_a_bert_base_fingerprint_on_the_probe_corpus(tmp_path: Path) -> None:
    """13 layers (embeddings + 12 blocks) of a 768-wide model: the store does not grow with
    the width, and is far below 10 MB on the probe corpus."""
    sizes = [len(batch) for batch in batch_samples(probe_corpus(), 32)]
    total = sum(triangle_size(n) for n in sizes)
    fingerprint = Fingerprint(
        layers=[f"encoder.layer.{i}" for i in range(13)],
        distances=torch.rand(13, total, dtype=torch.float64),
        batch_sizes=sizes,
        batch_digests=["0" * 64] * len(sizes),
        samples_digest="0" * 64,
        settings={"pooling": "mean", "max_length": 128, "batch_size": 32, "shuffle_seed": None},
        data={"dataset": "hf_cka/probe_corpus"},
        model={"model": "bert-base-uncased", "dtype": "float32"},
    )
    folder = fingerprint.save(tmp_path / "bert-base")
    size = sum(path.stat().st_size for path in folder.iterdir())
    assert size < 1.1 * 2**20, size  # ~1 MB: the issue allows 10 MB
    assert Fingerprint.load(folder).distances.shape == (13, total)


# ----------------------------------------------------------------------------- Hub


def test_a_failed_push_keeps_a_local_copy_that_hf_cka_push_publishes(
    hub, bert_print: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fingerprint pushes as the results do: saved first, retried, a typed error naming the
    copy; ``hf-cka push`` then publishes that folder as it is."""
    import huggingface_hub

    from hf_cka.cli import main
    from hf_cka.errors import HubPushError

    fingerprint, kept = Fingerprint.load(bert_print), tmp_path / "kept"
    repo_id = f"{hub.user}/fp-{uuid.uuid4().hex[:8]}"
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    with pytest.raises(HubPushError, match=r"fingerprint of .* after 2 attempt\(s\)") as caught:
        fingerprint.push_to_hub(repo_id, local_dir=kept, max_attempts=2, backoff_s=0.01)
    monkeypatch.undo()
    assert caught.value.local_path == str(kept.resolve()) and "hf-cka push" in str(caught.value)
    assert torch.equal(Fingerprint.load(kept).distances, fingerprint.distances)
    written = (kept / FINGERPRINT_FILE).stat().st_mtime_ns
    assert main(["push", str(kept), repo_id]) == 0
    assert (kept / FINGERPRINT_FILE).stat().st_mtime_ns == written  # pushed as it is, not resaved
    assert Fingerprint.from_hub(repo_id).batch_digests == fingerprint.batch_digests


@pytest.mark.parametrize(
    ("model", "folder"),
    [("org/bert", "org--bert"), ("./bert", "bert"), ("/tmp/x/bert@v1", "tmp--x--bert--v1"),
     ("..", "model")],
)  # fmt: skip
def test_the_default_folder_is_a_visible_name(model: str, folder: str) -> None:
    assert default_folder(model) == Path("cka-fingerprints", folder)


def test_push_is_one_commit_and_the_hub_repo_stands_in_for_a_model(
    hub, saved, bert_print: str, forwards_by_name: Counter, tmp_path: Path, monkeypatch
) -> None:
    repo_id = f"{hub.user}/fp-{uuid.uuid4().hex[:8]}"
    fingerprint = Fingerprint.load(bert_print)
    monkeypatch.chdir(tmp_path)
    url = fingerprint.push_to_hub(repo_id)
    local = tmp_path / default_folder(fingerprint.name)
    assert torch.equal(Fingerprint.load(local).distances, fingerprint.distances)  # saved first
    repo = hub.repo(repo_id, "dataset")
    head = repo.commits[repo.branches["main"]]
    assert url and set(head.files) - {".gitattributes"} == {
        "README.md", FINGERPRINT_FILE, TENSORS_FILE}  # fmt: skip
    history = repo.history(head)  # the repo's initial commit, then ONE commit for the push
    assert len(history) == 2 and history[0].title.startswith("Add the hf_cka fingerprint")
    downloaded = Fingerprint.from_hub(repo_id)
    assert torch.equal(downloaded.distances, fingerprint.distances)
    assert downloaded.batch_digests == fingerprint.batch_digests
    assert is_fingerprint(repo_id) and not is_fingerprint(f"{hub.user}/nothing-here")
    result = AutoCKA.from_pretrained(repo_id, saved("gpt2")).compare(TEXTS, **OPTIONS)
    assert dict(forwards_by_name) == {saved("gpt2"): 8}
    expected = AutoCKA.from_pretrained(bert_print, saved("gpt2")).compare(TEXTS, **OPTIONS)
    assert torch.equal(result.matrix, expected.matrix)


def test_extract_features_reads_a_stored_side(saved, tmp_path: Path) -> None:
    stored = AutoCKA.fingerprint(saved("bert"), TEXTS, features=True, **OPTIONS)
    stored.save(tmp_path / "with-features")
    auto = AutoCKA.from_pretrained(str(tmp_path / "with-features"), saved("gpt2"))
    features = auto.extract_features(model="a")
    assert list(features) == stored.layers
    for layer, rows in features.items():
        assert torch.equal(rows, stored.features[layer])
    direct = AutoCKA.from_pretrained(saved("gpt2")).extract_features(TEXTS, batch_size=6)
    extracted = auto.extract_features(TEXTS, model="b", batch_size=6)
    assert all(torch.equal(extracted[k], direct[k]) for k in direct)


def test_hub_dataset_revision_is_recorded_and_reused(hub, saved, tmp_path: Path) -> None:
    """A Hub dataset's commit sha is the fingerprint's data revision, and compare() without data
    reloads the dataset it names."""
    import datasets
    from huggingface_hub import HfApi

    repo_id = f"{hub.user}/texts-{uuid.uuid4().hex[:8]}"
    datasets.Dataset.from_dict({"text": TEXTS}).push_to_hub(repo_id)
    stored = AutoCKA.fingerprint(saved("bert"), repo_id, **OPTIONS)
    assert stored.data["dataset"] == repo_id
    assert stored.data["data_revision"] == HfApi().dataset_info(repo_id).sha
    listed = AutoCKA.fingerprint(saved("bert"), TEXTS, **OPTIONS)
    assert stored.batch_digests == listed.batch_digests  # the same samples, whatever the source
    stored.save(tmp_path / "fp")
    result = AutoCKA.from_pretrained(str(tmp_path / "fp"), saved("gpt2")).compare(**OPTIONS)
    assert result.metadata["dataset"] == repo_id and result.metadata["n_samples"] == 45
