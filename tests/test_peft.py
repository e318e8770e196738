"""LoRA adapters compared with their base: one copy of the weights, exact 1 below the adapter."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import tiny
import torch
from huggingface_hub import HfApi
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer

from hf_cka import AutoCKA
from hf_cka.models import ModelLoader

TOP_BLOCK = {"bert": (r".*encoder\.layer\.2\.attention\.self\.(query|value)", 2),
             "llama": (r".*layers\.2\.self_attn\.(q_proj|v_proj)", 2)}  # fmt: skip
TEXTS = tiny.probe_corpus()[:48]


def make_adapter(base: Path, kind: str, folder: Path, seed: int = 0) -> Path:
    """A LoRA adapter on the attention of the top block only, with random (non-zero) weights."""
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=TOP_BLOCK[kind][0], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def merged_copy(base: Path, adapter: Path, folder: Path) -> Path:
    """The adapter merged into a full copy of the base model (the two-model reference)."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["bert", "llama"])
def setup(request, tmp_path_factory) -> tuple[str, Path, Path]:
    kind = request.param
    root = tmp_path_factory.mktemp(f"peft-{kind}")
    base = tiny.save(kind, root / "base")
    return kind, base, make_adapter(base, kind, root / "lora")


def test_lone_adapter_is_compared_with_its_base_on_one_copy(setup) -> None:
    kind, base, adapter = setup
    cka = AutoCKA.from_pretrained(str(adapter))
    assert cka.model_a.name == str(base) and cka.model_b.name == str(adapter)
    assert cka.model_a.model is cka.model_b.model  # one copy of the weights
    assert cka.layers_a == cka.layers_b  # the base model's block paths on both sides
    result = cka.compare(TEXTS, batch_size=8, progress=False)
    diagonal = result.matrix.diagonal()
    adapted = TOP_BLOCK[kind][1] + 1  # layer list index of the adapted block's output
    assert torch.all((diagonal[:adapted] - 1).abs() < 1e-12), diagonal
    assert torch.all(diagonal[adapted:] < 1 - 1e-6), diagonal
    meta = result.metadata
    assert meta["adapter_b"] == str(adapter) and meta["base_model_b"] == str(base)


def test_single_copy_equals_two_full_models(setup, tmp_path: Path) -> None:
    _, base, adapter = setup
    single = AutoCKA.from_pretrained(str(base), str(adapter), dtype="float32")
    reference = AutoCKA.from_pretrained(
        str(base), str(merged_copy(base, adapter, tmp_path / "merged")), dtype="float32"
    )
    assert reference.model_a.model is not reference.model_b.model
    got = single.compare(TEXTS, batch_size=8, progress=False).matrix
    want = reference.compare(TEXTS, batch_size=8, progress=False).matrix
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()


def test_base_side_runs_with_adapters_disabled_after_adapter_forward(setup) -> None:
    _, base, adapter = setup
    loader = ModelLoader()
    adapted = loader.load(str(adapter))
    plain = AutoCKA.from_pretrained(str(base)).extract_features(TEXTS[:8], batch_size=8)
    cka = AutoCKA(adapted.base, adapted)
    cka.extract_features(TEXTS[:8], model="b", batch_size=8)  # adapter active
    shared = cka.extract_features(TEXTS[:8], model="a", batch_size=8)  # must be disabled again
    for layer, rows in plain.items():
        assert torch.allclose(shared[layer], rows, atol=1e-6), layer


def test_drift_over_adapters_and_full_checkpoints(setup, tmp_path: Path) -> None:
    kind, base, adapter = setup
    second = make_adapter(base, kind, tmp_path / "lora2", seed=1)
    full = tiny.save(kind, tmp_path / "full", seed=3)
    drift = AutoCKA.drift(
        str(base), [str(adapter), str(second), str(full)], TEXTS, batch_size=8, progress=False
    )
    similarity = drift.similarity
    adapted = TOP_BLOCK[kind][1] + 1
    assert similarity.shape == (len(drift.layers), 3)
    assert torch.all((similarity[:adapted, :2] - 1).abs() < 1e-12)
    assert torch.all(similarity[adapted:, :2] < 1 - 1e-6)
    assert similarity[-1, 2] < 0.999  # an independent full model differs everywhere


def test_adapter_by_repo_id_and_revision_from_the_hub(hub, tmp_path: Path) -> None:
    api = HfApi()
    base_repo = f"{hub.user}/tiny-llama-{uuid.uuid4().hex[:6]}"
    model, tokenizer = tiny.build("llama")
    model.push_to_hub(base_repo)
    tokenizer.push_to_hub(base_repo)
    hub_base = AutoModel.from_pretrained(base_repo)
    config = LoraConfig(r=4, target_modules=TOP_BLOCK["llama"][0], init_lora_weights=False)
    adapter_repo = f"{hub.user}/lora-{uuid.uuid4().hex[:6]}"
    get_peft_model(hub_base, config).push_to_hub(adapter_repo)
    api.create_tag(adapter_repo, tag="v1")
    sha = api.model_info(adapter_repo, revision="v1").sha
    result = AutoCKA.from_pretrained(f"{adapter_repo}@v1").compare(
        TEXTS, batch_size=8, progress=False
    )
    meta = result.metadata
    assert meta["adapter_b"] == adapter_repo and meta["revision_b"] == "v1"
    assert meta["commit_sha_b"] == sha
    assert meta["base_model_b"] == base_repo
    assert meta["base_commit_sha_b"] == api.model_info(base_repo).sha
    assert (result.matrix.diagonal()[:3] - 1).abs().max() < 1e-12


def test_missing_peft_names_the_extra(setup, monkeypatch) -> None:
    import builtins

    from hf_cka.errors import MissingDependencyError

    _, _, adapter = setup
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(MissingDependencyError, match=r"hf_cka\[peft\]"):
        ModelLoader().load(str(adapter))


def test_pickle_only_adapter_is_refused_and_never_unpickled(setup, tmp_path: Path) -> None:
    """An adapter saved only as ``adapter_model.bin`` is refused before peft could unpickle it."""
    import shutil

    from hf_cka.errors import UnsafeWeightsError

    _, _, adapter = setup
    pickled = Path(shutil.copytree(adapter, tmp_path / "pickled"))
    (pickled / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (pickled / "adapter_model.bin").write_bytes(tiny.code_running_pickle(marker))
    with pytest.raises(UnsafeWeightsError, match=r"only as pickles \(adapter_model\.bin\)"):
        ModelLoader().load(str(pickled))
    assert not marker.exists()


def test_a_broken_adapter_config_or_a_missing_base_is_typed(tmp_path: Path) -> None:
    from hf_cka.errors import ModelFormatError, ModelNotFoundError

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{garbage")
    with pytest.raises(ModelFormatError, match="adapter_config.json of adapter .* is unreadable"):
        ModelLoader().load(str(broken))
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "gone"), "r": 4}
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelNotFoundError, match="names the base model .*gone.* which was not found"
    ):
        ModelLoader().load(str(orphan))
