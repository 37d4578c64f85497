"""``flexproj export`` (no vLLM needed): the served directory still loads in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

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
