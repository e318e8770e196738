"""``Provenance``: built once by ``AutoCKA``, saved as the plain metadata dict with the same keys
as before it existed, and read back by attribute, also from older or newer metadata."""

from __future__ import annotations

from pathlib import Path

import tiny

from hf_cka.auto import AutoCKA
from hf_cka.cards import render_dataset_card
from hf_cka.provenance import DRIFT_KEYS, DataProvenance, ModelProvenance, Provenance
from hf_cka.result import CKAResult

TEXTS = tiny.varied_texts(16)

# The saved schema of a result's metadata (result.json and the Hub): keys and their order.
SAVED_KEYS = [
    "model_a", "revision_a", "commit_sha_a", "model_b", "revision_b", "commit_sha_b",
    "dtype", "pooling", "estimator", "dataset", "dataset_config", "split",
    "n_samples", "n_batches", "num_processes", "batch_size", "max_length", "measure",
    "measure_params", "kernel",
    "threshold", "sort_by_length", "null_permutations", "target_stderr", "stopped_early",
    "wall_time_s", "versions", "run_id", "created_at",
]  # fmt: skip


def test_compare_saves_the_metadata_schema_and_reads_it_back(saved, tmp_path: Path) -> None:
    auto = AutoCKA.from_pretrained(saved("bert"), saved("gpt2"))
    result = auto.compare(TEXTS, batch_size=8, kernel="rbf", threshold=0.5, progress=False)
    assert list(result.metadata) == SAVED_KEYS
    provenance = Provenance.from_dict(result.metadata)
    assert provenance.to_dict() == result.metadata  # nothing lost, nothing added
    assert provenance.model_a == ModelProvenance(name=saved("bert"))
    assert provenance.data == DataProvenance(dataset="in-memory list")
    assert (provenance.kernel, provenance.threshold, provenance.n_batches) == ("rbf", 0.5, 2)
    assert provenance.run_id == result.run_id
    result.save(tmp_path / "run")
    assert Provenance.from_dict(CKAResult.load(tmp_path / "run").metadata) == provenance


def test_drift_metadata_is_the_shared_part_of_its_runs(saved) -> None:
    drift = AutoCKA.drift(saved("bert"), [saved("bert", 1)], TEXTS, batch_size=8, progress=False)
    assert list(drift.metadata) == [*DRIFT_KEYS, "drift_id", "created_at"]
    first = drift.results[0].metadata
    assert all(drift.metadata[key] == first[key] for key in DRIFT_KEYS)


def test_old_and_newer_metadata_read_back_by_attribute() -> None:
    old = {"model_a": "bert", "model_b": "gpt2", "pooling": "mean"}  # fewer keys
    provenance = Provenance.from_dict({**old, "some_future_key": 1})  # and an unknown one
    assert provenance.model_a == ModelProvenance(name="bert")
    assert provenance.pooling == "mean" and provenance.n_samples is None
    assert provenance.data.label() is None
    assert "some_future_key" not in provenance.to_dict()


def test_an_adapter_side_records_its_base_and_the_text_column_its_column() -> None:
    adapter = ModelProvenance(
        name="me/lora", commit_sha="abc", base_model="bert", base_commit_sha="d"
    )
    flat = Provenance(
        model_a=ModelProvenance(name="bert", revision="main"),
        model_b=adapter,
        data=DataProvenance(dataset="imdb", dataset_config="plain", split="test", text_column="t"),
    ).to_dict()
    assert {key: flat[key] for key in flat if key.endswith("_b")} == {
        "model_b": "me/lora",
        "revision_b": None,
        "commit_sha_b": "abc",
        "adapter_b": "me/lora",
        "base_model_b": "bert",
        "base_commit_sha_b": "d",
    }
    assert "adapter_a" not in flat and flat["text_column"] == "t"
    back = Provenance.from_dict(flat)
    assert back.model_b == adapter and back.data.label() == "imdb/plain:test"


def test_the_card_reads_the_provenance() -> None:
    metadata = Provenance(
        model_a=ModelProvenance(name="bert", revision="v1", commit_sha="0123456789abcdef"),
        model_b=ModelProvenance(name="gpt2"),
        data=DataProvenance(dataset="imdb", split="test"),
        wall_time_s=12.345,
    ).to_dict()
    run = {"run_id": "r1", "model_a": "bert", "model_b": "gpt2", "metadata": metadata}
    text = str(render_dataset_card("me/cka", [run]))
    assert "bert @ v1 (0123456789ab)" in text and "imdb:test" in text and "12.3" in text


def test_towers_paired_columns_and_measures_are_fields_that_round_trip() -> None:
    """A CLIP tower (``part_*``), paired columns and a non-CKA measure are saved and read back;
    a two-tower self-comparison of one model is not symmetric, and the card names the measure."""
    metadata = Provenance(
        model_a=ModelProvenance(name="clip", part="vision"),
        model_b=ModelProvenance(name="clip", part="text"),
        data=DataProvenance(dataset="pairs", columns=("image", "caption")),
        measure="mutual_knn",
        measure_params={"k": 5},
    ).to_dict()
    assert (metadata["part_a"], metadata["part_b"]) == ("vision", "text")
    assert (metadata["column_a"], metadata["column_b"]) == ("image", "caption")
    assert (metadata["measure"], metadata["measure_params"]) == ("mutual_knn", {"k": 5})
    back = Provenance.from_dict(metadata)
    assert back.to_dict() == metadata
    assert not back.model_a.same_weights(back.model_b) and not back.data.same_column()
    result = CKAResult([[1.0, 0.5], [0.5, 1.0]], ["0", "1"], ["0", "1"], "clip", "clip", metadata)
    assert not result.is_self_comparison
    run = {"run_id": "r1", "model_a": "clip", "model_b": "clip", "metadata": metadata}
    assert r"| mutual\_knn (k=5) |" in str(render_dataset_card("me/cka", [run]))


def test_two_phase_fields_are_saved_only_for_a_two_phase_run() -> None:
    plain = Provenance(model_a=ModelProvenance(name="a"), model_b=ModelProvenance(name="b"))
    assert not {"shuffle_seed", "samples_digest", "two_phase", "data_revision"} & set(
        plain.to_dict()
    )
    combined = Provenance(
        model_a=ModelProvenance(name="a"),
        model_b=ModelProvenance(name="b"),
        data=DataProvenance(dataset="hf_cka/probe_corpus", data_revision="sha256:00"),
        shuffle_seed=3,
        samples_digest="f" * 64,
        two_phase=True,
    ).to_dict()
    assert combined["two_phase"] is True and combined["shuffle_seed"] == 3
    assert combined["data_revision"] == "sha256:00"
    assert Provenance.from_dict(combined).to_dict() == combined
