"""Bad input gets one clear error and loses nothing."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flexproj
from flexproj.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from flexproj.testing import tiny_vlm


def tiny_llama():
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def test_unsupported_model_names_the_supported_types():
    with pytest.raises(
        flexproj.UnsupportedModelError, match=r"LlamaForCausalLM \(model_type='llama'\).*llava"
    ):
        flexproj.patch(tiny_llama())
    assert isinstance(flexproj.UnsupportedModelError("x"), TypeError)


def test_failed_patch_leaves_the_model_as_it_was():
    model, _ = tiny_vlm("llava")
    _, wrong_processor = tiny_vlm("llava_next")  # a processor of another family
    original = model.model.multi_modal_projector
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(flexproj.UnsupportedModelError, match="LlavaProcessor"):
        flexproj.patch(model, wrong_processor, tokens=16)
    assert model.model.multi_modal_projector is original
    assert not flexproj.is_patched(model)
    assert "get_placeholder_mask" not in vars(model.model)
    assert set(model.state_dict()) == set(state_before)
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert "replace_image_token" not in vars(wrong_processor)


def test_patching_twice_is_an_error_and_keeps_the_first_patch():
    model, processor = tiny_vlm("llava")
    flexproj.patch(model, processor, tokens=16)
    slot = model.model.multi_modal_projector
    with pytest.raises(flexproj.PatchError, match="already patched"):
        flexproj.patch(model, processor, tokens=9)
    assert model.model.multi_modal_projector is slot
    assert flexproj.patch_info(model).default_tokens == 16


def test_unpatch_of_an_unpatched_model_raises():
    model, _ = tiny_vlm("llava")
    with pytest.raises(flexproj.PatchError, match="not patched"):
        flexproj.unpatch(model)


def test_projector_of_the_wrong_width_is_rejected():
    model, _ = tiny_vlm("llava")
    with pytest.raises(flexproj.PatchError, match=r"maps 16 -> 64 but this model needs 32 -> 64"):
        flexproj.patch(model, projector=flexproj.FlexProjector(16, 64))


@pytest.fixture
def saved(tmp_path):
    model, _ = tiny_vlm("llava")
    flexproj.patch(model, tokens=16)
    return flexproj.save_pretrained(model, tmp_path / "ckpt")


def test_checkpoint_contents(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    assert config["model_type"] == "llava"
    assert config["projector"] == {
        "in_dim": 32,
        "out_dim": 64,
        "hidden_dim": 96,
        "bias": True,
        "eps": 1e-5,
    }
    assert config["pooling"] == "adaptive_avg_pool2d" and config["default_tokens"] == 16
    assert config["flexproj_version"] == flexproj.__version__
    assert sorted(p.name for p in saved.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]


def test_loading_onto_another_family_raises(saved):
    model, _ = tiny_vlm("llava_next")
    with pytest.raises(
        flexproj.CheckpointError, match="for model_type 'llava', this model is 'llava_next'"
    ):
        flexproj.from_pretrained(model, saved)
    assert not flexproj.is_patched(model)


def test_loading_onto_another_width_raises(saved):
    model, _ = tiny_vlm("llava", text_config={"hidden_size": 96})
    with pytest.raises(
        flexproj.CheckpointError, match="maps 32 -> 64 but this model needs 32 -> 96"
    ):
        flexproj.from_pretrained(model, saved)
    assert not flexproj.is_patched(model)


def test_missing_checkpoint_raises(tmp_path):
    model, _ = tiny_vlm("llava")
    with pytest.raises(flexproj.CheckpointError, match=r"flexproj\.safetensors is missing"):
        flexproj.from_pretrained(model, tmp_path / "nowhere")


def test_truncated_checkpoint_raises(saved):
    weights = saved / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:200])
    model, _ = tiny_vlm("llava")
    with pytest.raises(flexproj.CheckpointError, match="damaged or not a safetensors file"):
        flexproj.from_pretrained(model, saved)
    assert not flexproj.is_patched(model)


def test_failed_save_leaves_the_old_checkpoint_whole(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model, _ = tiny_vlm("llava", seed=3)
    flexproj.patch(model, tokens=4)

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(flexproj.checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        flexproj.save_pretrained(model, saved)
    after = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert after == before  # no temp file left behind either
    fresh, _ = tiny_vlm("llava")
    flexproj.from_pretrained(fresh, saved)
    assert flexproj.patch_info(fresh).default_tokens == 16


def test_save_needs_a_patched_model(tmp_path):
    model, _ = tiny_vlm("llava")
    with pytest.raises(flexproj.PatchError, match="patched model"):
        flexproj.save_pretrained(model, tmp_path)
