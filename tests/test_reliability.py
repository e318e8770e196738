"""Reliability and security, end to end: typed errors for faults inside real runs, no lost work
(hooks, modes, checkpoints and resume, failed and concurrent pushes), no pickles, safetensors
first, validated downloads and a Hub token that never leaks.

Input errors already covered elsewhere (see docs/errors.md) are not repeated here.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import subprocess_env
from hub_server import user_for_token
from huggingface_hub import HfApi
from safetensors.torch import load_file
from torch import nn

from hf_cka import CKA, AutoCKA, CKAResult, MinibatchCKA
from hf_cka.data import probe_corpus
from hf_cka.errors import (
    ConstantLayerWarning,
    DeviceMismatchError,
    HubPushError,
    InvalidInputError,
    ModelNotFoundError,
    NonFiniteActivationError,
    ResultFormatError,
)

TEXTS = probe_corpus()[:24]  # batch_size 4: six CKA batches, samples 4b..4b+3 in batch b
SECRET = f"hf_reliability_{uuid.uuid4().hex}"  # unique to this session: any hit is a leak
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def auto(bert_and_gpt2: dict[str, str]) -> AutoCKA:
    """BERT against GPT-2, for tests that do not change the models."""
    return AutoCKA.from_pretrained(bert_and_gpt2["bert"], bert_and_gpt2["gpt2"])


def fresh(bert_and_gpt2: dict[str, str]) -> AutoCKA:
    """A newly loaded pair, for tests that change weights or modes."""
    return AutoCKA.from_pretrained(bert_and_gpt2["bert"], bert_and_gpt2["gpt2"])


def run(auto: AutoCKA, data=TEXTS, **options) -> CKAResult:
    return auto.compare(data, **{"batch_size": 4, "progress": False, **options})


def hooked(auto: AutoCKA) -> list[str]:
    """Names of the modules of either model that still carry a forward (pre-)hook."""
    return [
        name
        for model in (auto.model_a.model, auto.model_b.model)
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks
    ]


def modes(auto: AutoCKA) -> list[bool]:
    models = (auto.model_a.model, auto.model_b.model)
    return [module.training for model in models for module in model.modules()]


def interrupt_at(batch: int, fault: type[BaseException] = KeyboardInterrupt):
    """A compare callback raising ``fault`` after ``batch`` batches."""

    def callback(batch_idx: int, total: int, matrix: torch.Tensor) -> None:
        if batch_idx == batch:
            raise fault(f"stopped after batch {batch}")

    return callback


def token_only_in(tokenizer, texts: list[str], index: int) -> int:
    """A token id that occurs in ``texts[index]`` and in no other text."""
    ids = [set(tokenizer(text)["input_ids"]) - set(tokenizer.all_special_ids) for text in texts]
    counts = collections.Counter(i for found in ids for i in found)
    return min(i for i in ids[index] if counts[i] == 1)


class Stack(nn.Module):
    """Two linear blocks (an ``nn.ModuleList``), for the seed-compatible ``CKA`` engine."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


# ----------------------------------------------------------------------------- faults in a run


def test_nan_activations_name_the_layer_and_the_batch_and_leave_no_hook(bert_and_gpt2) -> None:
    auto = fresh(bert_and_gpt2)
    poisoned = token_only_in(auto.model_a.processor, TEXTS, 9)  # sample 9: CKA batch 2 of 0..5
    with torch.no_grad():
        auto.model_a.model.get_input_embeddings().weight[poisoned] = float("nan")
    with pytest.raises(NonFiniteActivationError) as caught:
        run(auto)
    message = str(caught.value)
    assert isinstance(caught.value, FloatingPointError)
    assert "'encoder.layer.0:input'" in message  # the first layer that saw the NaN
    assert re.search(r"\bbatch [23]\b", message), message  # batch 2 counted from 0, 3 from 1
    assert "dtype" in message  # what to try
    assert hooked(auto) == []


def test_engine_names_the_loader_batch_even_after_a_skipped_small_batch() -> None:
    """The third batch of the loader holds an Inf; the first (3 samples) is skipped."""
    loader = [torch.randn(3, 6), torch.randn(8, 6), torch.randn(8, 6)]
    loader[2][5, 0] = float("inf")
    model1, model2 = Stack(0), Stack(1)
    with pytest.raises(NonFiniteActivationError, match="'blocks.0:input'") as caught:
        CKA(model1, model2, progress=False)(loader)
    message = str(caught.value)
    assert re.search(r"\bbatch [23]\b", message), message  # index 2 from 0, 3 from 1 (callback)


def test_constant_layer_gives_nan_cells_and_one_warning_end_to_end(bert_and_gpt2, tmp_path) -> None:
    """Zeroing a LayerNorm makes block 1's output, and so block 2's, the same for every text."""
    auto = fresh(bert_and_gpt2)
    norm = auto.model_a.model.encoder.layer[1].output.LayerNorm
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.zero_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(auto)
    constant = [w for w in caught if issubclass(w.category, ConstantLayerWarning)]
    assert len(constant) == 1
    assert "'encoder.layer.1', 'encoder.layer.2'" in str(constant[0].message)
    rows = [result.layers_a.index(name) for name in ("encoder.layer.1", "encoder.layer.2")]
    assert torch.isnan(result.matrix[rows]).all() and torch.isnan(result.stderr[rows]).all()
    assert torch.isfinite(result.matrix[:2]).all()
    loaded = CKAResult.load(result.save(tmp_path / "run"))
    assert torch.equal(loaded.matrix.isnan(), result.matrix.isnan())


def test_device_and_device_map_together_are_refused(bert_and_gpt2) -> None:
    with pytest.raises(DeviceMismatchError, match="device.*device_map") as caught:
        AutoCKA.from_pretrained(bert_and_gpt2["bert"], device="cpu", device_map="auto")
    assert isinstance(caught.value, RuntimeError)


@needs_cuda
def test_features_on_two_devices_meet_on_side_a_device() -> None:
    """Models on different devices are fine: side B's features join side A's device."""
    x, y = torch.randn(8, 3), torch.randn(8, 3)
    mixed, plain = MinibatchCKA(1, 1), MinibatchCKA(1, 1)
    mixed.update([x.cuda()], [y])
    plain.update([x], [y])
    torch.testing.assert_close(mixed.compute(), plain.compute(), rtol=0, atol=1e-12)


@needs_cuda
def test_engine_on_cuda_matches_cpu() -> None:
    loader = [torch.randn(8, 6) for _ in range(3)]
    on_cpu = CKA(Stack(0), Stack(1), progress=False)(loader)
    on_gpu = CKA(Stack(0), Stack(1), device="cuda", progress=False)(loader)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- no lost work


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_compare_leaves_no_hook_and_keeps_modes(bert_and_gpt2, fault) -> None:
    auto = fresh(bert_and_gpt2)
    before = modes(auto)
    with pytest.raises(fault, match="after batch 2"):
        run(auto, callback=interrupt_at(2, fault))
    assert hooked(auto) == []
    assert modes(auto) == before


def test_compare_runs_in_eval_mode_and_restores_train_mode(bert_and_gpt2) -> None:
    """A model left in train mode (say, between fine-tuning steps) must not run with dropout,
    and must get its per-module modes back, also after an interrupt."""
    auto = fresh(bert_and_gpt2)
    reference = run(auto).matrix
    auto.model_a.model.train()
    auto.model_a.model.pooler.eval()  # mixed modes must come back module by module
    before = modes(auto)
    torch.testing.assert_close(run(auto).matrix, reference, rtol=0, atol=1e-12)
    assert modes(auto) == before
    with pytest.raises(KeyboardInterrupt):
        run(auto, callback=interrupt_at(2))
    assert modes(auto) == before


def make_result(seed: int) -> CKAResult:
    gen = torch.Generator().manual_seed(seed)
    layers = ["h.0", "h.1", "h.2"]
    return CKAResult(
        torch.rand(3, 3, generator=gen, dtype=torch.float64),
        layers,
        layers,
        "org/base",
        f"org/ckpt-{seed}",
        {"pooling": "mean"},
    )


def test_a_push_to_an_unreachable_hub_is_retried_then_keeps_the_local_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    result, local = make_result(1), tmp_path / "kept"
    with (
        caplog.at_level(logging.WARNING, logger="hf_cka.hub"),
        pytest.raises(HubPushError, match=r"after 3 attempt\(s\)") as caught,
    ):
        result.push_to_hub("someone/unreachable", local_dir=local, max_attempts=3, backoff_s=0.01)
    assert caplog.text.count("network error") == 2  # two retries, then the error
    assert isinstance(caught.value, OSError)
    assert str(local.resolve()) in str(caught.value) and "hf-cka push" in str(caught.value)
    assert torch.equal(CKAResult.load(local).matrix, result.matrix)


PUSH = """
import sys, time
from pathlib import Path
import torch
from hf_cka.result import CKAResult

repo_id, seed, local, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
gen = torch.Generator().manual_seed(seed)
result = CKAResult(torch.rand(3, 3, generator=gen, dtype=torch.float64), ["h.0", "h.1", "h.2"],
                   ["h.0", "h.1", "h.2"], "org/base", f"org/ckpt-{seed}")
result.plot()  # warm up matplotlib so that both pushes start together
Path(local + ".ready").touch()
while not go.exists():
    time.sleep(0.01)
result.push_to_hub(repo_id, local_dir=local, backoff_s=0.05)
print(result.run_id)
"""


def test_two_processes_pushing_to_one_repo_both_land(hub, tmp_path: Path) -> None:
    repo_id = f"{hub.user}/cka-race-{uuid.uuid4().hex[:8]}"
    make_result(0).push_to_hub(repo_id, local_dir=tmp_path / "seed")  # the repo exists
    go = tmp_path / "go"
    env = subprocess_env()  # HF_ENDPOINT, HF_TOKEN and HF_HOME point at the loopback Hub
    locals_ = [str(tmp_path / f"run{i}") for i in (1, 2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUSH, repo_id, str(i), local, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, local in zip((1, 2), locals_, strict=True)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{local}.ready").exists() for local in locals_):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the pushing processes did not start"
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    run_ids = [out.strip().splitlines()[-1] for out, _ in outputs]
    repo = hub.repo(repo_id, "dataset")
    files = repo.commits[repo.branches["main"]].files
    readme = files["README.md"].blob.data.decode()
    for run_id in run_ids:
        assert f"data/runs/{run_id}.parquet" in files and f"plots/{run_id}.png" in files
        assert run_id.replace("_", r"\_") in readme
    assert sum(path.startswith("data/runs/") for path in files) == 3
    for run_id, local in zip(run_ids, locals_, strict=True):
        assert CKAResult.load(local).run_id == run_id


# ----------------------------------------------------------------------------- security


def test_results_and_checkpoints_never_use_pickle(
    auto: AutoCKA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pickle or torch.load was used")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):  # fmt: skip
        monkeypatch.setattr(module, name, refuse)
    checkpoints = str(tmp_path / "checkpoints")
    with pytest.raises(KeyboardInterrupt):
        run(auto, checkpoint_dir=checkpoints, checkpoint_every=2, callback=interrupt_at(3))
    result = run(auto, checkpoint_dir=checkpoints)  # the resume reads the checkpoint
    loaded = CKAResult.load(result.save(tmp_path / "result"))
    assert torch.equal(loaded.matrix, result.matrix)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} == {".json", ".safetensors"}, written
    for path in written:
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", path  # pickle, torch zip


def test_weights_load_from_safetensors_when_a_pickle_sits_beside_them(
    bert_and_gpt2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(shutil.copytree(bert_and_gpt2["bert"], tmp_path / "both"))
    weights = load_file(folder / "model.safetensors")
    torch.save({k: torch.zeros_like(v) for k, v in weights.items()}, folder / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load read the pickle")

    monkeypatch.setattr(torch, "load", refuse)
    state = AutoCKA.from_pretrained(str(folder)).model_a.model.state_dict()
    shared = sorted(weights.keys() & state.keys())
    assert len(shared) > 10
    for key in shared:
        assert torch.equal(state[key], weights[key]), key


def hub_files(hub, repo_id: str) -> dict[str, bytes]:
    repo = hub.repo(repo_id, "dataset")
    return {p: e.blob.data for p, e in repo.commits[repo.branches["main"]].files.items()}


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_from_hub_validates_what_it_downloads(hub, tmp_path: Path) -> None:
    repo_id = f"{hub.user}/cka-hostile-{uuid.uuid4().hex[:8]}"
    result = make_result(3)
    result.push_to_hub(repo_id, local_dir=tmp_path / "run")
    runs_path, scores_path = (f"data/{kind}/{result.run_id}.parquet" for kind in ("runs", "scores"))
    pristine = hub_files(hub, repo_id)
    runs, scores = (pq.read_table(pa.BufferReader(pristine[p])) for p in (runs_path, scores_path))

    def swap(table: pa.Table, name: str, values: list) -> pa.Table:
        return table.set_column(table.schema.get_field_index(name), name, pa.array(values))

    corruptions = {
        "a run id that climbs out of the repo": (
            runs_path,
            swap(runs, "run_id", ["../../escape"]),
            "holds run '../../escape'",
        ),
        "a missing column": (runs_path, runs.drop_columns(["metadata_json"]), "metadata_json"),
        "metadata that is not JSON": (
            runs_path,
            swap(runs, "metadata_json", ["{oops"]),
            "not valid JSON",
        ),
        "scores of the wrong type": (scores_path, swap(scores, "cka", ["x"] * 9), "wrong type"),
    }
    api = HfApi()
    for case, (path, table, match) in corruptions.items():
        api.upload_file(
            path_or_fileobj=parquet_bytes(table),
            path_in_repo=path,
            repo_id=repo_id,
            repo_type="dataset",
        )
        with pytest.raises(ResultFormatError, match=re.escape(match)):
            CKAResult.from_hub(repo_id)
        api.upload_file(
            path_or_fileobj=pristine[path], path_in_repo=path, repo_id=repo_id, repo_type="dataset"
        )
        assert torch.equal(CKAResult.from_hub(repo_id).matrix, result.matrix), case
    with pytest.raises(InvalidInputError, match="invalid run id"):
        CKAResult.from_hub(repo_id, "../escape")


def test_the_token_never_leaks_from_a_compare_or_a_push(
    hub, bert_and_gpt2, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    user, tag = user_for_token(SECRET), uuid.uuid4().hex[:8]
    api = HfApi(token=SECRET)
    models = {}
    for kind, folder in bert_and_gpt2.items():
        models[kind] = api.create_repo(f"{user}/leak-{kind}-{tag}").repo_id
        api.upload_folder(repo_id=models[kind], folder_path=folder)
    caplog.set_level(logging.DEBUG)
    start = len(hub.requests)

    auto = AutoCKA.from_pretrained(models["bert"], models["gpt2"], token=SECRET)
    result = auto.compare(TEXTS[:8], batch_size=4)  # with its progress bar
    result.save(tmp_path / "saved")
    dataset = f"{user}/leak-results-{tag}"
    result.push_to_hub(dataset, token=SECRET, local_dir=tmp_path / "pushed")
    hub.fail_next(50, 500, match=dataset)
    with pytest.raises(HubPushError) as push_failure:
        result.push_to_hub(
            dataset, token=SECRET, local_dir=tmp_path / "kept", max_attempts=2, backoff_s=0.01
        )
    with pytest.raises(ModelNotFoundError) as load_failure:
        AutoCKA.from_pretrained(f"{user}/no-such-model-{tag}", token=SECRET)

    sent = [
        r.path for r in hub.requests[start:] if r.headers.get("authorization") == f"Bearer {SECRET}"
    ]
    assert any(models["bert"] in path for path in sent)  # the token was really used
    out, err = capfd.readouterr()
    texts = {
        "repr": repr(auto) + repr(result),
        "metadata": json.dumps(result.metadata, default=str),
        "logs": caplog.text,
        "stdout": out,
        "stderr": err,
        **{
            f"exception {e.typename}": "".join(traceback.format_exception(e.value))
            for e in (push_failure, load_failure)
        },
    }
    for where, text in texts.items():
        assert SECRET not in text, where
    pushed = hub_files(hub, dataset)
    assert len(pushed) >= 5
    for path, data in pushed.items():
        assert SECRET.encode() not in data, path
    roots = (tmp_path, Path(os.environ["HF_HOME"]))
    written = [p for root in roots for p in root.rglob("*") if p.is_file()]
    assert len(written) >= 10
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
