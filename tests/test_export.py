"""``flexproj export`` (no vLLM needed): the served directory still loads in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import flexproj
from flexproj.cli import main
from flexproj.testing import tiny_images, tiny_vlm


def test_export_loads_back_in_transformers_with_the_same_ids(tmp_path):
    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    flexproj.patch(model, processor, tokens=9)
    flexproj.save_pretrained(model, tmp_path / "proj")
    assert (
        main(["export", str(tmp_path / "base"), str(tmp_path / "proj"), str(tmp_path / "out")]) == 0
    )

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["FlexprojLlavaForConditionalGeneration"]
    assert config["flexproj"]["default_tokens"] == 9
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path / "out")
    flexproj.from_pretrained(loaded, tmp_path / "out", loaded_processor)
    image = tiny_images([(64, 64)])
    for proc, m in ((processor, model), (loaded_processor, loaded)):
        inputs = proc(text=["<image> what ?"], images=image, return_tensors="pt")
        assert (inputs["input_ids"] == 4).sum() == 9  # the checkpoint's default budget
        with torch.no_grad():
            logits = m(**inputs).logits
        if m is model:
            want = logits
    torch.testing.assert_close(logits, want, rtol=0, atol=0)


def test_export_refuses_a_projector_of_another_family(tmp_path, capsys):
    model, _ = tiny_vlm("llava")
    model.save_pretrained(tmp_path / "base")
    qwen, _ = tiny_vlm("qwen2_5_vl")
    flexproj.patch(qwen)
    flexproj.save_pretrained(qwen, tmp_path / "proj")
    args = ["export", str(tmp_path / "base"), str(tmp_path / "proj"), str(tmp_path / "out")]
    capsys.readouterr()  # save_pretrained's progress bars, not export's
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qwen2_5_vl" in err


def test_import_flexproj_and_its_serving_modules_do_not_import_vllm():
    code = (
        "import sys, flexproj, flexproj.serving.export, flexproj.serving.vllm_plugin, "
        "flexproj.serving.budget, flexproj.cli; flexproj.cli.build_parser(); "
        "assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _base_and_projector(tmp_path, family, **overrides):
    model, processor = tiny_vlm(family, **overrides)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    flexproj.patch(model, processor, tokens=4)
    flexproj.save_pretrained(model, tmp_path / "proj")
    return model, processor


def test_export_prints_the_full_serve_command(tmp_path, capsys):
    _base_and_projector(tmp_path, "llava")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "proj"), str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    command = printed[1].split()
    assert command[:3] == ["vllm", "serve", str(out)]
    assert "--trust-request-mm-kwargs" in command
    assert command[command.index("--dtype") + 1] == "float32"  # tiny_vlm saves float32
    if not torch.cuda.is_available():
        assert command[command.index("--gpu-memory-utilization") + 1] == "0.2"
        assert "head_dim is 16" in printed[2]  # tiny_vlm's LLM: 4 heads of 16


def test_export_refuses_a_default_budget_above_the_native_count(tmp_path, capsys):
    _base_and_projector(tmp_path, "llava")  # 64 px / patch 8: an 8x8 grid, 64 tokens
    args = ["export", str(tmp_path / "base"), str(tmp_path / "proj"), str(tmp_path / "out")]
    assert main([*args, "--tokens", "64"]) == 0
    capsys.readouterr()
    assert main([*args, "--tokens", "65", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "native 64" in err
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["flexproj"]["default_tokens"] == 64  # the first export, untouched


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_export_gives_qwen_the_video_processor_and_still_loads(tmp_path, family):
    _base_and_projector(tmp_path, family)
    _, processor = tiny_vlm(family)  # unpatched, as the one loaded back
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "proj"), str(out)]) == 0
    saved = json.loads((out / "processor_config.json").read_text())
    image, video = saved["image_processor"], saved["video_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std"):
        assert video[key] == image[key], key
    loaded = type(processor).from_pretrained(out)  # transformers reads the directory still
    text = "<|vision_start|><|image_pad|><|vision_end|> what ?"
    image_in = tiny_images([(64, 48)])
    a = loaded(text=[text], images=image_in, return_tensors="pt")
    b = processor(text=[text], images=image_in, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    # (transformers 5.19 reloads a fast image processor: float noise of 1e-7, not a bug)
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=1e-5)


def test_export_of_onevision_keeps_the_processor_settings_and_adds_a_video_processor(tmp_path):
    """Regression: the tiny OneVision processor saved without num_image_tokens &c., so the
    reloaded processor (vLLM's included) failed on the first image."""
    _base_and_projector(tmp_path, "llava_onevision")
    _, processor = tiny_vlm("llava_onevision")  # unpatched, as the one loaded back
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "proj"), str(out)]) == 0
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["video_processor"]["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    loaded = type(processor).from_pretrained(out)
    for key in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"):
        assert getattr(loaded, key) == getattr(processor, key), key
    image = tiny_images([(128, 64)])
    a = loaded(text=["<image> what ?"], images=image, return_tensors="pt")
    b = processor(text=["<image> what ?"], images=image, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
