"""N-model grids (N forward-pass sets, one model at a time), their summary, plot, files and Hub
dataset; drift one model at a time equal to the single stream; the CLI commands."""

from __future__ import annotations

import math
import uuid
from collections import Counter
from pathlib import Path

import pytest
import tiny
import torch
from transformers import PreTrainedModel

from hf_cka.auto import AutoCKA
from hf_cka.cli import main
from hf_cka.errors import InvalidInputError, ShapeMismatchError
from hf_cka.fingerprint import Fingerprint
from hf_cka.grid import GridResult, model_summary
from hf_cka.result import CKAResult

TEXTS = tiny.varied_texts(40, seed=4)  # batch_size 8: 5 CKA batches
RUN = {"batch_size": 8, "progress": False}
OPTIONS = {**RUN, "dtype": "float32"}  # grid, drift and fingerprint also load the models
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def three(saved) -> list[str]:
    return [saved("bert"), saved("bert", 1), saved("gpt2")]


@pytest.fixture(scope="module")
def grid(three: list[str]) -> GridResult:
    return AutoCKA.grid(three, TEXTS, null_permutations=1, **OPTIONS)


def test_n_models_cost_n_forward_pass_sets(three: list[str], forwards_by_name) -> None:
    AutoCKA.grid(three, TEXTS, **OPTIONS)
    per_model = math.ceil(40 / 8)  # one length-sorted chunk of 5 CKA batches
    assert dict(forwards_by_name) == {name: per_model for name in three}
    forwards_by_name.clear()
    AutoCKA.from_pretrained(three[0], three[1], dtype="float32").compare(TEXTS, **RUN)
    assert sum(forwards_by_name.values()) == 2 * per_model  # ONE pair costs two sets already


def test_pairs_equal_the_single_stream(grid: GridResult, three: list[str]) -> None:
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        auto = AutoCKA.from_pretrained(three[i], three[j], dtype="float32")
        expected = auto.compare(TEXTS, null_permutations=1, **RUN)
        pair = grid.pair(i, j)
        assert isinstance(pair, CKAResult) and pair.stderr is not None
        for name in ("matrix", "stderr", "null"):
            torch.testing.assert_close(
                getattr(pair, name), getattr(expected, name), atol=1e-8, rtol=0
            )
    flipped = grid.pair(2, 0)
    assert torch.equal(flipped.matrix, grid.pair(0, 2).matrix.T)
    assert (flipped.model_a, flipped.model_b) == (three[2], three[0])
    assert flipped.metadata["model_a"] == three[2]
    assert flipped.layers_a == grid.pair(0, 2).layers_b
    itself = grid.pair(1, 1)
    assert itself.is_self_comparison
    with pytest.raises(InvalidInputError, match="model indices"):
        grid.pair(0, 3)


def test_summary_is_the_mean_best_match(grid: GridResult) -> None:
    summary = grid.summary
    assert summary.shape == (3, 3) and summary.dtype == torch.float64
    for i in range(3):
        for j in range(3):
            best = grid.pair(i, j).matrix.max(dim=1).values.mean().item()
            assert summary[i, j].item() == pytest.approx(best, abs=1e-12)
    torch.testing.assert_close(summary.diagonal(), torch.ones(3, dtype=torch.float64))
    nan = float("nan")
    assert model_summary(torch.tensor([[0.2, nan], [nan, nan]], dtype=torch.float64)) == 0.2


def test_plot_is_a_clustered_heatmap(grid: GridResult, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (tree, heatmap) = grid.plot()
    order = grid.order()
    assert sorted(order) == [0, 1, 2]
    labels = [tick.get_text() for tick in heatmap.get_yticklabels()]
    assert labels == [grid.models[i] for i in order]
    fig.savefig(tmp_path / "grid.png")
    plt.close(fig)
    assert (tmp_path / "grid.png").read_bytes().startswith(PNG_MAGIC)


def test_save_load_round_trip(grid: GridResult, tmp_path: Path) -> None:
    folder = grid.save(tmp_path / "grid")
    grid.save(folder)  # saving again replaces the earlier grid
    loaded = GridResult.load(folder)
    assert loaded.models == grid.models and loaded.grid_id == grid.grid_id
    assert torch.equal(loaded.summary, grid.summary)
    assert torch.equal(loaded.pair(1, 2).stderr, grid.pair(1, 2).stderr)
    assert (folder / "grid.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ShapeMismatchError, match="every pair"):
        GridResult(grid.models, {(0, 1): grid.pair(0, 1)})


def test_grid_is_one_hub_dataset(hub, grid: GridResult, tmp_path: Path) -> None:
    repo_id = f"{hub.user}/grid-{uuid.uuid4().hex[:8]}"
    grid.push_to_hub(repo_id, local_dir=tmp_path / "local")
    repo = hub.repo(repo_id, "dataset")
    history = repo.history(repo.commits[repo.branches["main"]])
    assert len(history) == 2  # the repo's initial commit and ONE commit with every pair
    head = repo.commits[repo.branches["main"]]
    png = head.files[f"plots/{grid.grid_id}.png"]  # the clustered heatmap, in that commit
    assert png.last_commit == head.oid and png.blob.data.startswith(PNG_MAGIC)
    back = GridResult.from_hub(repo_id)
    assert back.models == grid.models and back.grid_id == grid.grid_id
    torch.testing.assert_close(back.summary, grid.summary, atol=0, rtol=0)


def test_grid_takes_fingerprints_and_refuses_other_samples(
    three: list[str], tmp_path: Path, forwards_by_name: Counter
) -> None:
    AutoCKA.fingerprint(three[2], TEXTS, **OPTIONS).save(tmp_path / "gpt2-fp")
    grid = AutoCKA.grid([three[0], str(tmp_path / "gpt2-fp")], TEXTS, **OPTIONS)
    direct = AutoCKA.grid([three[0], three[2]], TEXTS, **OPTIONS)
    torch.testing.assert_close(grid.pair(0, 1).matrix, direct.pair(0, 1).matrix, atol=1e-12, rtol=0)
    from hf_cka.errors import FingerprintMismatchError

    forwards_by_name.clear()
    with pytest.raises(FingerprintMismatchError, match="batch 0 of this data"):
        AutoCKA.grid([three[0], str(tmp_path / "gpt2-fp")], TEXTS[::-1], **OPTIONS)
    assert forwards_by_name == Counter()  # the stored side fixed the batches: no forward
    with pytest.raises(InvalidInputError, match="at least 2 models"):
        AutoCKA.grid([three[0]], TEXTS, **OPTIONS)


# --------------------------------------------------------------------------------- drift


def test_drift_one_model_at_a_time_equals_the_stream(saved, forwards_by_name) -> None:
    base = saved("bert")
    checkpoints = [saved("bert", 1), saved("bert", 2), base]
    options = {"batch_size": 8, "progress": False, "dtype": "float32", "null_permutations": 1}
    streamed = AutoCKA.drift(base, checkpoints, TEXTS, one_model_at_a_time=False, **options)
    forwards_by_name.clear()
    drift = AutoCKA.drift(base, checkpoints, TEXTS, **options)
    # the base once, each checkpoint once (the base named again as a checkpoint runs again)
    assert forwards_by_name[saved("bert", 1)] == forwards_by_name[saved("bert", 2)] == 5
    assert forwards_by_name[base] == 10
    torch.testing.assert_close(drift.similarity, streamed.similarity, atol=1e-8, rtol=0)
    torch.testing.assert_close(drift.stderr, streamed.stderr, atol=1e-8, rtol=0)
    for ours, theirs in zip(drift.results, streamed.results, strict=True):
        torch.testing.assert_close(ours.null, theirs.null, atol=1e-8, rtol=0)
    assert drift.checkpoints == checkpoints and drift.base == base
    for key in ("n_batches", "n_samples", "batch_size", "pooling", "estimator"):
        assert drift.metadata[key] == streamed.metadata[key], key


def test_drift_takes_a_measure_and_labels_its_plot(saved) -> None:
    """One model at a time, a drift reads the stored features for a full-data measure and
    equals the streamed drift; its plot names the measure."""
    import matplotlib.pyplot as plt

    base, checkpoints = saved("bert"), [saved("bert", 1)]
    options = {**OPTIONS, "measure": "procrustes"}
    drift = AutoCKA.drift(base, checkpoints, TEXTS, **options)
    streamed = AutoCKA.drift(base, checkpoints, TEXTS, one_model_at_a_time=False, **options)
    torch.testing.assert_close(drift.similarity, streamed.similarity, atol=1e-10, rtol=0)
    assert drift.stderr is None and drift.results[0].metadata["measure"] == "procrustes"
    fig, (lines, heatmap) = drift.plot()
    assert lines.get_ylabel() == "Procrustes similarity with base (same layer)"
    assert heatmap.images[0].colorbar.ax.get_ylabel() == "Procrustes similarity"
    plt.close(fig)


def test_drift_from_a_fingerprint_base(saved, tmp_path: Path, forwards_by_name) -> None:
    base = AutoCKA.fingerprint(saved("bert"), TEXTS, **OPTIONS)
    base.save(tmp_path / "base-fp")
    forwards_by_name.clear()
    drift = AutoCKA.drift(str(tmp_path / "base-fp"), [saved("bert", 1)], TEXTS, **OPTIONS)
    assert dict(forwards_by_name) == {saved("bert", 1): 5}
    assert drift.similarity.shape == (4, 1)
    with pytest.raises(ShapeMismatchError, match="same layer of the base"):
        AutoCKA.drift(str(tmp_path / "base-fp"), [saved("gpt2")], TEXTS, **OPTIONS)
    with pytest.raises(InvalidInputError, match="checkpoint_dir"):
        AutoCKA.drift(saved("bert"), [saved("bert", 1)], TEXTS, checkpoint_dir=str(tmp_path))


# ----------------------------------------------------------------------------------- CLI


def test_cli_fingerprint_and_grid(three: list[str], tmp_path: Path, hub, capsys) -> None:
    fast = ["--num-samples", "24", "--batch-size", "8", "--no-progress", "--dtype", "float32"]
    repo_id = f"{hub.user}/cli-fp-{uuid.uuid4().hex[:8]}"
    code = main(
        ["fingerprint", three[2], "-o", str(tmp_path / "fp"), "--push-to-hub", repo_id, *fast]
    )
    out = capsys.readouterr().out
    assert code == 0 and "pushed to" in out and "24 in 3 batches" in out
    assert Fingerprint.load(tmp_path / "fp").n_samples == 24
    capsys.readouterr()  # a folder holding a fingerprint is replaced, not refused
    assert main(["fingerprint", three[2], "-o", str(tmp_path / "fp"), *fast]) == 0
    assert Fingerprint.load(tmp_path / "fp").n_samples == 24
    assert (
        Fingerprint.from_hub(repo_id).batch_digests
        == Fingerprint.load(tmp_path / "fp").batch_digests
    )
    code = main(["compare", str(tmp_path / "fp"), three[0], "-o", str(tmp_path / "pair"), *fast])
    assert code == 0 and CKAResult.load(tmp_path / "pair").model_a == three[2]
    capsys.readouterr()
    code = main(["grid", three[0], three[1], repo_id, "-o", str(tmp_path / "grid"), *fast])
    out = capsys.readouterr().out
    assert code == 0 and "mean over the layers of [i]" in out
    grid = GridResult.load(tmp_path / "grid")
    assert grid.models == [three[0], three[1], repo_id]
    assert (tmp_path / "grid" / "grid.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["plot", str(tmp_path / "grid"), "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert main(["grid", three[0], "-o", str(tmp_path / "one"), *fast]) == 2
    assert "at least 2 models" in capsys.readouterr().err


def test_one_model_is_alive_at_a_time(saved, three: list[str]) -> None:
    """At every forward pass of a grid and of a drift, exactly one model exists in the process
    (the one running): each is freed before the next is loaded."""
    import gc

    texts = TEXTS[:16]  # 2 CKA batches: gc.get_objects() at every forward pass is slow
    alive: list[int] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, PreTrainedModel):
            alive.append(sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        AutoCKA.grid(three, texts, **OPTIONS)
        AutoCKA.drift(saved("bert"), [saved("bert", 1), saved("bert", 2)], texts, **OPTIONS)
    finally:
        handle.remove()
    assert len(alive) == 3 * 2 + 3 * 2 and set(alive) == {1}
    alive.clear()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:  # the streamed drift holds the base and both checkpoints together
        AutoCKA.drift(
            saved("bert"), [saved("bert", 1), saved("bert", 2)], texts, one_model_at_a_time=False,
            **OPTIONS,
        )  # fmt: skip
    finally:
        handle.remove()
    assert max(alive) == 3


def test_cli_drift_modes_agree(three: list[str], tmp_path: Path, capsys) -> None:
    from hf_cka.drift import DriftResult

    fast = ["--num-samples", "24", "--batch-size", "8", "--no-progress", "--dtype", "float32"]
    models = [three[0], three[1]]
    assert main(["drift", *models, "-o", str(tmp_path / "one"), *fast]) == 0
    assert main(["drift", *models, "-o", str(tmp_path / "all"), "--all-models-at-once", *fast]) == 0
    one, together = DriftResult.load(tmp_path / "one"), DriftResult.load(tmp_path / "all")
    assert one.results[0].metadata["two_phase"] is True
    assert together.results[0].metadata.get("two_phase") is None
    torch.testing.assert_close(one.similarity, together.similarity, atol=1e-8, rtol=0)
    capsys.readouterr()
    code = main(["drift", *models, "--checkpoint-dir", str(tmp_path / "ck"), *fast])
    assert code == 2 and "--all-models-at-once" in capsys.readouterr().err


def test_grid_and_fingerprints_take_other_measures(three: list[str], tmp_path: Path) -> None:
    """A grid (mutual k-NN), and a compare against a stored fingerprint (RSA), read the stored
    features for a full-data measure and give the single-stream result exactly."""
    import matplotlib.pyplot as plt

    knn = {"measure": "mutual_knn", "measure_params": {"k": 5}}
    grid = AutoCKA.grid([three[0], three[2]], TEXTS, **OPTIONS, **knn)
    expected = AutoCKA.from_pretrained(three[0], three[2], dtype="float32")
    truth = expected.compare(TEXTS, **RUN, **knn)
    pair = grid.pair(0, 1)
    torch.testing.assert_close(pair.matrix, truth.matrix, atol=1e-12, rtol=0)
    assert pair.stderr is None and pair.metadata["measure"] == "mutual_knn"
    assert grid.metadata["measure_params"] == {"k": 5}
    fig, (tree, _) = grid.plot()
    assert fig.axes[-1].get_ylabel() == "mean best-layer mutual k-NN"
    assert tree.get_title() == "models clustered by mean best-layer mutual k-NN"
    plt.close(fig)
    stored = AutoCKA.fingerprint(three[2], TEXTS, features=True, **OPTIONS)
    stored.save(tmp_path / "fp")
    two_phase = AutoCKA.from_pretrained(three[0], str(tmp_path / "fp"), dtype="float32")
    rsa = {"measure": "rsa", "measure_params": {"distance": "cosine"}}
    torch.testing.assert_close(
        two_phase.compare(TEXTS, **RUN, **rsa).matrix,
        expected.compare(TEXTS, **RUN, **rsa).matrix,
        atol=1e-12,
        rtol=0,
    )
    bare = AutoCKA.fingerprint(three[2], TEXTS, **OPTIONS)
    bare.save(tmp_path / "bare")
    with pytest.raises(InvalidInputError, match="holds no pooled features"):
        AutoCKA.from_pretrained(str(tmp_path / "bare"), three[0]).compare(TEXTS, **RUN, **rsa)


def test_paired_columns_need_the_single_stream(three: list[str]) -> None:
    """A grid or a fingerprint reads one column for every model: column_a/column_b are refused
    before any model is loaded, with a message that names the way to compare paired data."""
    paired = {"column_a": "image", "column_b": "caption"}
    for run in (
        lambda: AutoCKA.grid(three, TEXTS, **OPTIONS, **paired),
        lambda: AutoCKA.fingerprint(three[0], TEXTS, **OPTIONS, **paired),
        lambda: AutoCKA.drift(three[0], three[1:2], TEXTS, **OPTIONS, **paired),
    ):
        with pytest.raises(InvalidInputError, match="reads ONE column for every model"):
            run()


def test_cli_grid_takes_a_measure(three: list[str], tmp_path: Path, capsys) -> None:
    fast = ["--num-samples", "24", "--batch-size", "8", "--no-progress", "--dtype", "float32"]
    args = ["--measure", "mutual_knn", "--measure-param", "k=3", "-o", str(tmp_path / "g")]
    assert main(["grid", three[0], three[2], *args, *fast]) == 0
    assert "of their best mutual k-NN in [j]" in capsys.readouterr().out
    grid = GridResult.load(tmp_path / "g")
    assert grid.metadata["measure_params"] == {"k": 3}
    assert grid.pair(0, 1).metadata["measure"] == "mutual_knn"
