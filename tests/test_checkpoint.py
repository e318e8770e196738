"""Checkpoints and resume: one atomic file per process, verified against itself, the run's
settings, the models' weights and dtype, and the data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_cka import AutoCKA, CKAResult
from hf_cka.data import probe_corpus
from hf_cka.errors import InvalidInputError, ResultFormatError

TEXTS = probe_corpus()[:24]  # batch_size 4: six CKA batches


@pytest.fixture(scope="module")
def auto(bert_and_gpt2: dict[str, str]) -> AutoCKA:
    return AutoCKA.from_pretrained(bert_and_gpt2["bert"], bert_and_gpt2["gpt2"])


def run(auto: AutoCKA, data=TEXTS, **options) -> CKAResult:
    return auto.compare(data, **{"batch_size": 4, "progress": False, **options})


def interrupt_at(batch: int):
    """A compare callback interrupting the run after ``batch`` batches."""

    def callback(batch_idx: int, total: int, matrix: torch.Tensor) -> None:
        if batch_idx == batch:
            raise KeyboardInterrupt

    return callback


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and the states of a checkpoint file."""
    with safe_open(str(path), framework="pt") as handle:
        states = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        return json.loads(handle.metadata()["manifest"]), states


def batches_done(folder: Path) -> int | None:
    """What the rank-0 checkpoint in ``folder`` records as done (None: no checkpoint yet)."""
    path = folder / "rank0.safetensors"
    return read(path)[0]["batches_done"] if path.exists() else None


def assert_same_run(got: CKAResult, expected: CKAResult, atol: float) -> None:
    for name in ("matrix", "stderr"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=atol)
    for key in ("n_samples", "n_batches"):
        assert got.metadata[key] == expected.metadata[key], key


def test_checkpoints_are_written_every_n_batches(auto: AutoCKA, tmp_path: Path) -> None:
    seen: list[int | None] = []
    run(
        auto,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=2,
        callback=lambda batch_idx, total, matrix: seen.append(batches_done(tmp_path)),
    )
    assert seen == [None, None, 2, 2, 4, 4]  # the callback runs before batch k's checkpoint
    assert batches_done(tmp_path) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.safetensors"]


@pytest.mark.parametrize(
    ("sort_by_length", "atol"),
    # with length sorting a resumed run regroups the padded forward batches, so the float32
    # activations (not the samples of a CKA batch) differ by rounding
    [(False, 0.0), (True, 1e-7)],  # the tolerance docs/distributed.md states
)
def test_resume_after_an_interrupt_or_a_kill_equals_an_uninterrupted_run(
    auto: AutoCKA, tmp_path: Path, sort_by_length: bool, atol: float
) -> None:
    options = {"sort_by_length": sort_by_length, "checkpoint_every": 2}
    reference = run(auto, sort_by_length=sort_by_length)
    live, killed = tmp_path / "live", tmp_path / "killed"

    def stop(batch_idx: int, total: int, matrix: torch.Tensor) -> None:
        if batch_idx == 5:
            shutil.copytree(live, killed)  # the disk as a kill -9 right now would leave it
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(auto, checkpoint_dir=str(live), callback=stop, **options)
    assert (batches_done(live), batches_done(killed)) == (5, 4)
    for folder in (live, killed):
        assert_same_run(run(auto, checkpoint_dir=str(folder), **options), reference, atol)
    assert_same_run(run(auto, checkpoint_dir=str(live), **options), reference, atol)  # finished


def test_a_checkpoint_of_other_settings_or_damaged_is_refused(auto, tmp_path: Path) -> None:
    folder = str(tmp_path)
    run(auto, checkpoint_dir=folder, checkpoint_every=2)
    with pytest.raises(ResultFormatError, match="same arguments") as caught:
        run(auto, checkpoint_dir=folder, checkpoint_every=2, batch_size=6)
    assert isinstance(caught.value, ValueError)
    path = tmp_path / "rank0.safetensors"
    saved = path.read_bytes()
    manifest, tensors = read(path)
    save_file(tensors, path, metadata={"manifest": json.dumps({**manifest, "schema": "x/0"})})
    with pytest.raises(ResultFormatError, match="delete the folder"):
        run(auto, checkpoint_dir=folder)
    save_file(tensors, path, metadata={"manifest": "{not json"})
    with pytest.raises(ResultFormatError, match="unreadable.*delete the folder"):
        run(auto, checkpoint_dir=folder)
    path.write_bytes(saved[:40])  # a truncated file, as a full disk leaves it
    with pytest.raises(ResultFormatError, match="unreadable"):
        run(auto, checkpoint_dir=folder)


def test_a_checkpoint_of_other_data_is_refused(auto: AutoCKA, tmp_path: Path) -> None:
    """Same settings, same number of texts, other texts: resuming would return the old data's
    matrix for the new data."""
    other = probe_corpus()[100:124]
    run(auto, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(ResultFormatError):
        run(auto, other, checkpoint_dir=str(tmp_path), checkpoint_every=2)


def test_a_later_file_of_the_same_run_resumes_exactly_and_a_spliced_one_is_refused(
    auto: AutoCKA, tmp_path: Path
) -> None:
    plain = {"sort_by_length": False, "checkpoint_every": 2}  # regrouping would round
    reference = run(auto, sort_by_length=False)
    live, snapshots = tmp_path / "live", {}

    def keep(batch_idx: int, total: int, matrix: torch.Tensor) -> None:
        if batch_idx in (3, 5):  # after the saves of 2 and 4 batches
            snapshots[batch_idx - 1] = (live / "rank0.safetensors").read_bytes()
        if batch_idx == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(auto, checkpoint_dir=str(live), callback=keep, **plain)
    early = tmp_path / "early"
    early.mkdir()
    (early / "rank0.safetensors").write_bytes(snapshots[2])
    assert batches_done(early) == 2
    (early / "rank0.safetensors").write_bytes(snapshots[4])  # the same file, from a later save
    assert_same_run(run(auto, checkpoint_dir=str(early), **plain), reference, atol=0.0)

    spliced = tmp_path / "spliced"
    spliced.mkdir()
    (spliced / "rank0.safetensors").write_bytes(snapshots[2])
    manifest, _ = read(spliced / "rank0.safetensors")
    _, later_states = read(live / "rank0.safetensors")  # 4 batches' sums under a 2-batch manifest
    save_file(
        later_states, spliced / "rank0.safetensors", metadata={"manifest": json.dumps(manifest)}
    )
    with pytest.raises(ResultFormatError, match="disagrees with the states"):
        run(auto, checkpoint_dir=str(spliced), **plain)


def test_changed_weights_or_dtype_are_refused(bert_and_gpt2, tmp_path: Path) -> None:
    bert = Path(shutil.copytree(bert_and_gpt2["bert"], tmp_path / "bert"))
    checkpoints = str(tmp_path / "checkpoints")
    with pytest.raises(KeyboardInterrupt):
        run(
            AutoCKA.from_pretrained(str(bert), bert_and_gpt2["gpt2"]),
            checkpoint_dir=checkpoints,
            checkpoint_every=2,
            callback=interrupt_at(3),
        )
    with pytest.raises(ResultFormatError, match="weights, dtype"):
        run(
            AutoCKA.from_pretrained(str(bert), bert_and_gpt2["gpt2"], dtype="float64"),
            checkpoint_dir=checkpoints,
        )
    tiny.save("bert", tmp_path / "other", seed=7)  # the same architecture, other weights
    shutil.copy(tmp_path / "other" / "model.safetensors", bert / "model.safetensors")
    with pytest.raises(ResultFormatError, match="weights, dtype"):
        run(AutoCKA.from_pretrained(str(bert), bert_and_gpt2["gpt2"]), checkpoint_dir=checkpoints)


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_any_batch(auto, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("mine")
    seen = []
    with pytest.raises(InvalidInputError, match="is an existing file; pass a folder"):
        run(auto, checkpoint_dir=str(taken), callback=lambda *args: seen.append(args))
    assert seen == [] and taken.read_text() == "mine"
