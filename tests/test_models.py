"""Model loading through ``AutoCKA.from_pretrained``: every tiny family, local folders, the
loopback Hub (``repo@revision``, commit shas), dtype, pad tokens and the typed loading errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from huggingface_hub import HfApi
from PIL import Image

from hf_cka.auto import AutoCKA
from hf_cka.errors import LayerNotFoundError, ModelNotFoundError, RemoteCodeError

TEXT_KINDS = ("bert", "roberta", "distilbert", "gpt2", "gpt_neox", "llama", "t5")


TEXTS = tiny.varied_texts(20)


def assert_self_similarity(matrix: torch.Tensor, num_layers: int) -> None:
    assert matrix.dtype == torch.float64
    assert matrix.shape == (num_layers + 1, num_layers + 1)
    torch.testing.assert_close(
        matrix.diagonal(), torch.ones(num_layers + 1, dtype=torch.float64), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(matrix, matrix.T, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------ families


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_every_text_family_gives_a_unit_diagonal_self_matrix(saved, kind: str) -> None:
    auto = AutoCKA.from_pretrained(saved(kind))
    result = auto.compare(TEXTS, batch_size=8, progress=False)
    assert_self_similarity(result.matrix, tiny.LAYERS[kind])
    assert result.layers_a == result.layers_b == auto.layers_a
    assert auto.layers_a[0].endswith(":input")  # the embedding output comes first
    off_diagonal = result.matrix[~torch.eye(len(auto.layers_a), dtype=torch.bool)]
    assert bool((off_diagonal < 1 - 1e-6).all())  # distinct layers are not identical


def test_t5_decoder_layers(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("t5"), part_a="decoder", part_b="decoder")
    assert auto.layers_a == ["decoder.block.0:input", "decoder.block.0", "decoder.block.1"]
    result = auto.compare(TEXTS, batch_size=8, progress=False)
    assert_self_similarity(result.matrix, tiny.LAYERS["t5"])


def test_t5_encoder_against_decoder(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("t5"), saved("t5", 1), part_a="decoder")
    assert auto.layers_a[0].startswith("decoder.") and auto.layers_b[0].startswith("encoder.")
    matrix = auto.compare(TEXTS, batch_size=8, progress=False).matrix
    assert matrix.shape == (3, 3) and bool(torch.isfinite(matrix).all())


def random_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_vit_with_pil_images_and_tensors(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("vit"))
    arrays = random_images(12)
    pil = auto.compare([Image.fromarray(a) for a in arrays], batch_size=6, progress=False)
    assert_self_similarity(pil.matrix, tiny.LAYERS["vit"])
    assert pil.metadata["n_samples"] == 12 and pil.metadata["n_batches"] == 2
    tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    from_tensors = auto.compare(tensors, batch_size=6, progress=False)
    torch.testing.assert_close(from_tensors.matrix, pil.matrix, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("other", "layers"), [("gpt2", 2), ("llama", 3)])
def test_bert_against_a_model_with_another_tokenizer(saved, other: str, layers: int) -> None:
    auto = AutoCKA.from_pretrained(saved("bert"), saved(other))
    result = auto.compare(TEXTS, batch_size=8, progress=False)
    assert result.matrix.shape == (tiny.LAYERS["bert"] + 1, layers + 1)
    assert result.matrix.dtype == torch.float64
    assert bool(torch.isfinite(result.matrix).all())
    assert (result.metadata["n_samples"], result.metadata["n_batches"]) == (20, 3)  # 8, 8, 4
    assert (result.model_a, result.model_b) == (saved("bert"), saved(other))


# ------------------------------------------------------------------------- dtype & pad token


def test_bfloat16_weights_give_a_float64_matrix(saved) -> None:
    auto = AutoCKA.from_pretrained(saved("gpt2"), dtype="bfloat16")
    assert {p.dtype for p in auto.model_a.model.parameters()} == {torch.bfloat16}
    result = auto.compare(TEXTS, batch_size=8, progress=False)
    assert result.matrix.dtype == torch.float64
    assert result.metadata["dtype"] == "bfloat16"
    torch.testing.assert_close(
        result.matrix.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_missing_pad_token_is_added_without_resizing_embeddings(saved, kind: str) -> None:
    model, tokenizer = tiny.build(kind)
    assert tokenizer.pad_token is None
    auto = AutoCKA.from_pretrained(saved(kind))
    processor = auto.model_a.processor
    assert processor.pad_token is not None and processor.padding_side == "right"
    assert len(processor) == len(tokenizer)  # borrowed, not added
    rows = model.get_input_embeddings().weight.shape[0]
    assert auto.model_a.model.get_input_embeddings().weight.shape[0] == rows
    assert processor.pad_token_id < rows


# ------------------------------------------------------------------------------ loopback Hub


@pytest.fixture(scope="module")
def hub_models(hub) -> dict[str, object]:
    """``user/tiny-a`` (bert, tagged ``v1`` then overwritten) and ``user/tiny-b`` (gpt2)."""
    api = HfApi()
    repo_a, repo_b = f"{hub.user}/cka-tiny-a", f"{hub.user}/cka-tiny-b"
    first, tokenizer = tiny.build("bert", seed=0)
    first.push_to_hub(repo_a)
    tokenizer.push_to_hub(repo_a)
    api.create_tag(repo_a, tag="v1")
    tiny.build("bert", seed=1)[0].push_to_hub(repo_a)  # main moves on past v1
    model_b, tokenizer_b = tiny.build("gpt2", seed=0)
    model_b.push_to_hub(repo_b)
    tokenizer_b.push_to_hub(repo_b)
    return {"a": repo_a, "b": repo_b, "first": first, "api": api}


def test_hub_models_at_a_tag_record_their_commit_shas(hub_models) -> None:
    api, repo_a, repo_b = hub_models["api"], hub_models["a"], hub_models["b"]
    auto = AutoCKA.from_pretrained(f"{repo_a}@v1", repo_b, revision_b="main")
    (tag,) = api.list_repo_refs(repo_a).tags
    sha_b = api.model_info(repo_b).sha
    assert tag.target_commit != api.model_info(repo_a).sha  # v1 is not main
    for name, tensor in hub_models["first"].state_dict().items():
        torch.testing.assert_close(auto.model_a.model.state_dict()[name], tensor, msg=name)

    metadata = auto.compare(TEXTS, batch_size=8, progress=False).metadata
    assert (metadata["model_a"], metadata["model_b"]) == (repo_a, repo_b)
    assert (metadata["revision_a"], metadata["revision_b"]) == ("v1", "main")
    assert metadata["commit_sha_a"] == tag.target_commit
    assert metadata["commit_sha_b"] == sha_b
    for sha in (metadata["commit_sha_a"], metadata["commit_sha_b"]):
        assert len(sha) == 40 and int(sha, 16) >= 0


def test_hub_revision_keyword_equals_at_syntax(hub_models) -> None:
    repo_a = hub_models["a"]
    auto = AutoCKA.from_pretrained(repo_a, revision_a="v1")
    (tag,) = hub_models["api"].list_repo_refs(repo_a).tags
    assert (auto.model_a.revision, auto.model_a.commit_sha) == ("v1", tag.target_commit)


def test_unknown_hub_repo_raises_model_not_found(hub) -> None:
    missing = f"{hub.user}/no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model") as err:
        AutoCKA.from_pretrained(missing)
    assert isinstance(err.value, OSError)
    assert "local folder" in str(err.value)  # says what was expected and what to check
    assert (err.value.model_id, err.value.revision) == (missing, None)
    assert pickle.loads(pickle.dumps(err.value)).model_id == missing  # crosses processes whole


def test_unknown_revision_raises_model_not_found(hub_models) -> None:
    with pytest.raises(ModelNotFoundError, match="'no-such-tag'") as err:
        AutoCKA.from_pretrained(f"{hub_models['a']}@no-such-tag")
    assert (err.value.model_id, err.value.revision) == (hub_models["a"], "no-such-tag")


def test_a_cached_hub_model_loads_offline_with_one_warning(hub_models) -> None:
    """Offline, a Hub model already in the cache loads from its cached snapshot (whose file list
    passes the weight checks, and whose folder name is the commit sha recorded), with one
    warning. Models are downloaded at their commit sha, which writes no ``refs/main``: offline,
    name the sha."""
    sha = AutoCKA.from_pretrained(hub_models["b"]).model_a.commit_sha  # online: fills the cache
    script = (
        "import warnings\n"
        "from hf_cka.models import ModelLoader\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    loaded = ModelLoader().load({hub_models['b']!r}, {sha!r})\n"
        "print(type(loaded.model).__name__, loaded.commit_sha)\n"
        "print('; '.join(str(w.message) for w in caught))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded, warned = done.stdout.splitlines()
    assert loaded == f"GPT2Model {sha}"
    assert warned.startswith("could not reach the Hub to resolve") and sha in warned, warned
    assert warned.count("could not reach") == 1, warned


# ----------------------------------------------------------------------------- other errors


def test_unknown_layer_name_suggests_a_valid_one(saved) -> None:
    with pytest.raises(LayerNotFoundError, match=r"Did you mean 'encoder\.layer\.2'"):
        AutoCKA.from_pretrained(saved("bert"), layers_a=["encoder.layer.13"])
    with pytest.raises(LayerNotFoundError, match=r"Did you mean 'encoder\.layer\.1'"):
        AutoCKA.from_pretrained(saved("bert"), layers_b=["encoder.layr.1"])


def test_custom_code_needs_trust_remote_code(saved, tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "configuration_custom.py").write_text(
        "from transformers import PretrainedConfig\n\n\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom-cka'\n"
    )
    (folder / "modeling_custom.py").write_text(
        "raise RuntimeError('remote code ran without consent')\n"
    )
    config = {
        "model_type": "custom-cka",
        "architectures": ["CustomModel"],
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModel": "modeling_custom.CustomModel",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeError, match="trust_remote_code") as err:
        AutoCKA.from_pretrained(str(folder))
    assert isinstance(err.value, ValueError)
