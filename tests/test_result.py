"""CKAResult / DriftResult: validation, atomic save/load, tables, dataset card."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import DatasetCard
from safetensors.torch import save_file

import hf_cka.storage as storage_module
from hf_cka.cards import escape_markdown, render_dataset_card
from hf_cka.drift import DriftResult
from hf_cka.errors import InvalidInputError, ResultFormatError, ShapeMismatchError
from hf_cka.result import CKAResult, new_run_id, validate_run_id

INJECTION = "evil | name\n---\n{{ 7*7 }}<script>alert(1)</script>"


def make_result(
    seed: int = 0,
    la: int = 3,
    lb: int = 4,
    *,
    model_a: str = "org/model-a",
    model_b: str = "org/model-b",
    stderr: bool = True,
    null: bool = False,
    layers: list[str] | None = None,
    **metadata: object,
) -> CKAResult:
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.rand(la, lb, generator=gen, dtype=torch.float64)
    matrix[0, -1] = float("nan")  # an undefined cell is legitimate
    meta = {
        "pooling": "mean",
        "estimator": "minibatch_unbiased",
        "n_samples": 64,
        "versions": {"torch": torch.__version__},
        **metadata,
    }
    return CKAResult(
        matrix,
        layers or [f"encoder.layer.{i}" for i in range(la)],
        layers or [f"encoder.layer.{j}" for j in range(lb)],
        model_a,
        model_b,
        meta,
        stderr=torch.rand(la, lb, generator=gen, dtype=torch.float64) / 10 if stderr else None,
        null=torch.rand(la, lb, generator=gen, dtype=torch.float64) / 10 if null else None,
    )


def assert_bit_identical(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert a is not None and b is not None
    assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape
    assert torch.equal(a.view(torch.int64), b.view(torch.int64))  # NaN-aware, bit for bit


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


# ----------------------------------------------------------------------------- construction


def test_post_init_converts_to_float64_cpu_and_fills_identity() -> None:
    result = CKAResult(np.ones((2, 3), dtype=np.float32), ["a", "b"], ["x", "y", "z"], "m", "n")
    assert result.matrix.dtype == torch.float64 and result.matrix.device.type == "cpu"
    assert re.fullmatch(r"r\d{8}T\d{6}Z_[0-9a-f]{4}", result.run_id)
    assert result.metadata["created_at"].endswith("+00:00")
    assert "tensor" not in repr(result) and result.run_id in repr(result)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"matrix": torch.zeros(3)}, "must be 2-D"),
        ({"layers_a": ["a", "b"]}, r"matrix has shape \(3, 4\), expected \(2, 4\)"),
        ({"stderr": torch.zeros(4, 3)}, r"stderr has shape \(4, 3\)"),
        ({"null": torch.zeros(3, 5)}, r"null has shape \(3, 5\)"),
    ],
)
def test_post_init_rejects_shape_mismatches(kwargs: dict, match: str) -> None:
    args = {
        "matrix": torch.zeros(3, 4),
        "layers_a": list("abc"),
        "layers_b": list("wxyz"),
        "model_a": "m",
        "model_b": "n",
    } | kwargs
    with pytest.raises(ShapeMismatchError, match=match):
        CKAResult(**args)


def test_run_id_validation() -> None:
    for good in ("r1", "r20261128T174455Z_3f9a", "MyRun_2"):
        assert validate_run_id(good) == good
    for bad in ("../etc", "a/b", "run.1", "1run", "", "all", "x" * 65, None, "r\n"):
        with pytest.raises(InvalidInputError, match="invalid run id"):
            validate_run_id(bad)
    with pytest.raises(InvalidInputError, match="invalid run id"):
        make_result(run_id="../etc")
    run_id = new_run_id()
    assert re.fullmatch(r"\w+(\.\w+)*", run_id) and validate_run_id(run_id) == run_id
    assert new_run_id() != run_id


def test_is_self_comparison_needs_same_model_revision_and_layers() -> None:
    same = make_result(la=3, lb=3, model_a="m", model_b="m")
    assert same.is_self_comparison
    assert not make_result(
        la=3, lb=3, model_a="m", model_b="m", revision_a="v1", revision_b="v2"
    ).is_self_comparison
    assert not make_result(la=3, lb=3).is_self_comparison


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_identical(tmp_path: Path) -> None:
    result = make_result(null=True, dtype="bfloat16", wall_time_s=1.5)
    path = result.save(tmp_path / "run")
    assert path == tmp_path / "run"
    assert sorted(p.name for p in path.iterdir()) == ["result.json", "tensors.safetensors"]
    doc = json.loads((path / "result.json").read_text())
    assert doc["schema"] == "hf_cka.CKAResult" and doc["schema_version"] == 1
    loaded = CKAResult.load(path)
    for name in ("matrix", "stderr", "null"):
        assert_bit_identical(getattr(result, name), getattr(loaded, name))
    assert loaded.metadata == result.metadata
    assert (loaded.layers_a, loaded.layers_b) == (result.layers_a, result.layers_b)
    assert (loaded.model_a, loaded.model_b, loaded.run_id) == (
        result.model_a,
        result.model_b,
        result.run_id,
    )
    assert siblings(path) == ["run"]  # no staging folder left behind


def test_load_without_optional_tensors(tmp_path: Path) -> None:
    loaded = CKAResult.load(make_result(stderr=False).save(tmp_path / "r"))
    assert loaded.stderr is None and loaded.null is None


def test_save_replaces_an_earlier_result(tmp_path: Path) -> None:
    target = tmp_path / "run"
    make_result(seed=1).save(target)
    second = make_result(seed=2, la=2, lb=2)
    second.save(target)
    assert_bit_identical(CKAResult.load(target).matrix, second.matrix)
    assert siblings(target) == ["run"]


def test_save_into_a_file_raises_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(InvalidInputError, match="exists and is not a folder"):
        make_result().save(target)
    assert target.read_text() == "not a folder" and siblings(target) == ["taken"]


def test_save_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(InvalidInputError, match="holds no hf_cka result"):
        make_result().save(target)
    assert (target / "notes.txt").read_text() == "precious" and siblings(target) == ["mine"]


def test_save_with_unserialisable_metadata_raises_cleanly(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="JSON-serialisable"):
        make_result(device=torch.device("cpu")).save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_crash_mid_save_keeps_the_previous_result(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "run"
    first = make_result(seed=1)
    first.save(target)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(storage_module, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        make_result(seed=2).save(target)
    assert_bit_identical(CKAResult.load(target).matrix, first.matrix)
    assert siblings(target) == ["run"]
    with pytest.raises(OSError, match="No space left"):
        make_result(seed=3).save(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and siblings(target) == ["run"]


def _edit_json(path: Path, edit) -> None:
    doc = json.loads((path / "result.json").read_text())
    edit(doc)
    (path / "result.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: (p / "result.json").unlink(), r"result\.json: file not found"),
        (lambda p: (p / "tensors.safetensors").unlink(), r"tensors\.safetensors: file not found"),
        (lambda p: (p / "result.json").write_text("{not json"), r"result\.json: not valid JSON"),
        (lambda p: (p / "result.json").write_text("[1, 2]"), "expected a JSON object"),
        (
            lambda p: _edit_json(p, lambda d: d.update(schema_version=99)),
            "unsupported schema_version 99.*newer hf_cka",
        ),
        (lambda p: _edit_json(p, lambda d: d.update(schema="other")), "expected schema"),
        (lambda p: _edit_json(p, lambda d: d.pop("model_b")), "missing required key 'model_b'"),
        (lambda p: _edit_json(p, lambda d: d.update(layers_a="abc")), "'layers_a' must be list"),
        (lambda p: _edit_json(p, lambda d: d.update(layers_b=[1, 2, 3, 4])), "list of strings"),
        (
            lambda p: _edit_json(p, lambda d: d["layers_a"].pop()),
            r"tensor 'matrix' is torch.float64 \(3, 4\), expected torch.float64 \(2, 4\)",
        ),
        (
            lambda p: _edit_json(p, lambda d: d["metadata"].update(run_id="../../etc")),
            "invalid run id",
        ),
        (
            lambda p: save_file({"matrix": torch.zeros(3, 4)}, p / "tensors.safetensors"),
            r"tensor 'matrix' is torch.float32",
        ),
        (
            lambda p: save_file(
                {"stderr": torch.zeros(3, 4, dtype=torch.float64)}, p / "tensors.safetensors"
            ),
            "missing tensor 'matrix'",
        ),
        (
            lambda p: (p / "tensors.safetensors").write_bytes(b"\x00garbage"),
            "not a readable safetensors file",
        ),
    ],
)
def test_load_rejects_malformed_folders(tmp_path: Path, corrupt, match: str) -> None:
    path = make_result().save(tmp_path / "run")
    corrupt(path)
    with pytest.raises(ResultFormatError, match=match):
        CKAResult.load(path)


def test_push_to_an_invalid_repo_id_fails_before_saving(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for bad in ("not a repo", "a/b/c", None):
        with pytest.raises(InvalidInputError, match="invalid repository id"):
            make_result().push_to_hub(bad)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- tables and plots


def test_to_pandas_long_format() -> None:
    result = make_result(la=3, lb=4, stderr=True, null=False)
    frame = result.to_pandas()
    assert list(frame.columns) == [
        "run_id",
        "model_a",
        "model_b",
        "layer_a",
        "layer_b",
        "index_a",
        "index_b",
        "cka",
        "stderr",
        "null",
    ]
    assert len(frame) == 12 and set(frame["run_id"]) == {result.run_id}
    row = frame[(frame.index_a == 2) & (frame.index_b == 1)].iloc[0]
    assert row.layer_a == "encoder.layer.2" and row.layer_b == "encoder.layer.1"
    assert row.cka == result.matrix[2, 1].item() and row.stderr == result.stderr[2, 1].item()
    assert frame["null"].isna().all()
    assert np.isnan(frame[(frame.index_a == 0) & (frame.index_b == 3)].cka.item())


def test_to_dataset_matches_to_pandas() -> None:
    result = make_result(null=True)
    dataset = result.to_dataset()
    assert dataset.num_rows == 12
    assert dataset.features["cka"].dtype == "float64"
    np.testing.assert_array_equal(np.asarray(dataset["null"]), result.null.numpy().reshape(-1))


def test_plot_uses_names_and_kwargs_override() -> None:
    import matplotlib.pyplot as plt

    fig, ax = make_result().plot(title="custom title")
    try:
        assert ax.get_title() == "custom title"
        assert "org/model-a" in ax.get_ylabel()
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- dataset card


def _front_matter(content: str) -> dict:
    lines = content.splitlines()
    delimiters = [i for i, line in enumerate(lines) if line.strip() == "---"]
    assert delimiters == [0, delimiters[1]] and len(delimiters) == 2  # user text adds none
    return yaml.safe_load("\n".join(lines[1 : delimiters[1]]))


def _runs(*results: CKAResult) -> list[dict]:
    return [{**r._run_record(), "metadata": r.metadata} for r in results]


def test_card_declares_configs_and_lists_runs() -> None:
    first = make_result(seed=1, revision_a="v1.0", commit_sha_a="a" * 40)
    second = make_result(seed=2, model_b="org/other")
    card = render_dataset_card("me/cka-results", _runs(second, first))
    meta = _front_matter(str(card))
    assert {c["config_name"]: c["data_files"][0]["path"] for c in meta["configs"]} == {
        "scores": "data/scores/*.parquet",
        "runs": "data/runs/*.parquet",
    }
    assert {"cka", "representational-similarity", "hf-cka"} <= set(meta["tags"])
    assert DatasetCard(str(card)).data.configs == meta["configs"]
    body = card.text
    rows = [line for line in body.splitlines() if line.startswith("| r")]
    assert len(rows) == 4  # runs table + provenance table, two runs each
    assert body.index(escape_markdown(first.run_id)) < body.index(escape_markdown(second.run_id))
    assert "org/model-a @ v1.0 (aaaaaaaaaaaa)" in body
    assert f"(plots/{second.run_id}.png)" in body  # the newest run's heatmap
    assert f'CKAResult.from_hub("me/cka-results", run_id="{second.run_id}")' in body
    assert "Nguyen et al., 2020" in body and "Kornblith et al., 2019" in body


def test_card_renders_user_strings_as_data() -> None:
    evil = make_result(
        model_a=INJECTION,
        dataset="d|x\n# h",
        run_id="r_evil",
        created_at="2026-11-28T17:44:55+00:00",
    )
    content = str(render_dataset_card("me/cka-results", _runs(evil)))
    _front_matter(content)  # still exactly one, parseable, front matter
    assert "{{ 7*7 }}" not in content and "49" not in content  # never evaluated
    assert "<script>" not in content and "&lt;script&gt;" in content
    row = next(line for line in content.splitlines() if line.startswith("| r\\_evil | 2"))
    cells = re.split(r"(?<!\\) \| ", row.strip("| "))
    assert len(cells) == 9  # the pipes of user text are escaped, the table keeps its columns
    assert cells[2] == r"evil \| name --- \{\{ 7\*7 \}\}&lt;script&gt;alert(1)&lt;/script&gt;"
    assert cells[8] == r"d\|x \# h"


def test_card_rejects_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="invalid repository id"):
        render_dataset_card("bad repo\n---", _runs(make_result()))
    with pytest.raises(InvalidInputError, match="at least one run"):
        render_dataset_card("me/x", [])
    with pytest.raises(InvalidInputError, match="invalid run id"):
        render_dataset_card("me/x", [{**_runs(make_result())[0], "run_id": "../x"}])


# ----------------------------------------------------------------------------- drift


def make_drift(k: int = 3, stderr: bool = True) -> DriftResult:
    layers = [f"h.{i}" for i in range(4)]
    results = [
        make_result(
            seed=s, la=4, lb=4, layers=layers, stderr=stderr, model_a="base", model_b=f"ckpt-{s}"
        )
        for s in range(k)
    ]
    return DriftResult("base", [f"ckpt-{s}" for s in range(k)], results, {"note": "x"})


def test_drift_similarity_is_the_same_layer_diagonal() -> None:
    drift = make_drift(k=3)
    assert drift.similarity.shape == (4, 3) and drift.similarity.dtype == torch.float64
    for c, result in enumerate(drift.results):
        assert_bit_identical(
            drift.similarity[:, c].contiguous(), result.matrix.diagonal().contiguous()
        )
    assert drift.stderr is not None and drift.stderr.shape == (4, 3)
    assert make_drift(stderr=False).stderr is None
    frame = drift.to_pandas()
    assert len(frame) == 12 and frame.iloc[5].checkpoint == "ckpt-1"
    assert frame.iloc[5].cka == drift.similarity[1, 1].item()


def test_drift_plot_and_membership() -> None:
    import matplotlib.pyplot as plt

    drift = make_drift(k=2)
    assert [r.metadata["drift"]["index"] for r in drift.results] == [0, 1]
    assert drift.results[1].metadata["drift"]["metadata"]["drift_id"] == drift.drift_id
    fig, axes = drift.plot()
    try:
        assert fig is not None and len(fig.axes) >= 1
    finally:
        plt.close(fig)


def test_drift_requires_one_layer_list() -> None:
    results = [make_result(la=4, lb=4), make_result(la=3, lb=3)]
    with pytest.raises(ShapeMismatchError, match="same layer list"):
        DriftResult("org/model-a", ["c1", "c2"], results)
    with pytest.raises(ShapeMismatchError, match="one result per checkpoint"):
        DriftResult("org/model-a", ["c1"], [make_result(la=4, lb=4)] * 2)


def test_drift_save_load_round_trip(tmp_path: Path) -> None:
    drift = make_drift()
    path = drift.save(tmp_path / "drift")
    loaded = DriftResult.load(path)
    assert loaded.checkpoints == drift.checkpoints and loaded.metadata == drift.metadata
    assert_bit_identical(loaded.similarity, drift.similarity)
    assert [r.run_id for r in loaded.results] == [r.run_id for r in drift.results]
    assert siblings(path) == ["drift"]


def test_drift_load_rejects_traversal(tmp_path: Path) -> None:
    path = make_drift().save(tmp_path / "drift")
    doc = json.loads((path / "drift.json").read_text())
    doc["runs"][0] = "../../etc"
    (path / "drift.json").write_text(json.dumps(doc))
    with pytest.raises(ResultFormatError, match=r"drift\.json: invalid run id '\.\./\.\./etc'"):
        DriftResult.load(path)


def test_an_error_while_replacing_a_result_puts_the_earlier_one_back(
    tmp_path: Path, monkeypatch
) -> None:
    """The swap moves the earlier result aside, then the new files in; a failure in between
    (here moving the new JSON in, after the new tensors) restores the earlier one."""
    target = make_result(seed=1).save(tmp_path / "run")
    (target / "notes.txt").write_text("precious")
    first = CKAResult.load(target)
    aside: list[list[str]] = []
    rename = Path.rename

    def failing_rename(self: Path, destination: Path) -> Path:
        if self.name == "result.json" and self.parent.name.endswith(".tmp"):  # staged JSON
            aside.extend(
                sorted(p.name for p in f.iterdir()) for f in storage_module.previous_results(target)
            )
            raise OSError("I/O error")
        return rename(self, destination)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="I/O error"):
        make_result(seed=2).save(target)
    # the earlier result was whole, aside, while the new one moved in
    assert aside == [["result.json", "tensors.safetensors"]]
    assert_bit_identical(CKAResult.load(target).matrix, first.matrix)
    assert (target / "notes.txt").read_text() == "precious" and siblings(target) == ["run"]


def test_a_killed_replace_leaves_the_earlier_result_whole_and_load_names_it(
    tmp_path: Path,
) -> None:
    """What a process killed in the middle of the swap leaves: the earlier result in
    ``.run.<hex>.previous``, the new tensors in ``run``. Load refuses the mix and names where the
    earlier result is; moving it back restores it."""
    target = make_result(seed=1).save(tmp_path / "run")
    first = CKAResult.load(target)
    newer = make_result(seed=2).save(tmp_path / "newer")
    aside = tmp_path / ".run.0a1b2c3d.previous"
    aside.mkdir()
    for name in ("result.json", "tensors.safetensors"):
        (target / name).rename(aside / name)
    (newer / "tensors.safetensors").rename(target / "tensors.safetensors")
    assert storage_module.previous_results(target) == [aside]
    with pytest.raises(ResultFormatError, match="was interrupted: the earlier result is whole in"):
        CKAResult.load(target)
    for entry in aside.iterdir():
        entry.replace(target / entry.name)
    assert_bit_identical(CKAResult.load(target).matrix, first.matrix)


def test_save_over_an_earlier_result_keeps_other_files(tmp_path: Path) -> None:
    target = make_result(seed=1).save(tmp_path / "run")
    (target / "notes.txt").write_text("precious")
    (target / "figs").mkdir()
    (target / "figs" / "a.png").write_bytes(b"png")
    second = make_result(seed=2, la=2, lb=2)
    second.save(target)
    assert (target / "notes.txt").read_text() == "precious"
    assert (target / "figs" / "a.png").read_bytes() == b"png"
    assert_bit_identical(CKAResult.load(target).matrix, second.matrix)
    drift = make_drift(k=2)
    drift.save(tmp_path / "drift")
    (tmp_path / "drift" / "notes.txt").write_text("mine")
    again = make_drift(k=3)
    again.save(tmp_path / "drift")
    names = sorted(p.name for p in (tmp_path / "drift").iterdir())
    assert names == ["01-ckpt-0", "02-ckpt-1", "03-ckpt-2", "drift.json", "notes.txt"]
    assert DriftResult.load(tmp_path / "drift").drift_id == again.drift_id


def test_a_tensors_file_of_another_save_is_refused(tmp_path: Path) -> None:
    first = make_result(seed=1).save(tmp_path / "first")
    second = make_result(seed=2).save(tmp_path / "second")
    (second / "tensors.safetensors").write_bytes((first / "tensors.safetensors").read_bytes())
    with pytest.raises(ResultFormatError, match="sha256 differs"):
        CKAResult.load(second)


def test_drift_folders_are_named_by_checkpoint(tmp_path: Path) -> None:
    layers = ["h.0", "h.1"]
    checkpoints = ["org/model@step-100", "./out/checkpoint-500", "org/model@step-100"]
    results = [make_result(seed=s, la=2, lb=2, layers=layers) for s in range(3)]
    path = DriftResult("org/model", checkpoints, results).save(tmp_path / "drift")
    names = sorted(p.name for p in path.iterdir() if p.is_dir())
    assert names == ["01-org-model-step-100", "02-out-checkpoint-500", "03-org-model-step-100"]
    assert DriftResult.load(path).checkpoints == checkpoints


def test_saved_files_share_one_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = make_drift(k=2).save(tmp_path / "drift")
    finally:
        os.umask(old)
    modes = {
        p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in path.rglob("*")
        if p.is_file()
    }
    assert len(modes) == 5 and set(modes.values()) == {0o644}, modes
