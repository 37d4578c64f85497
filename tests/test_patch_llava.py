"""What is specific to LLaVA-1.5 (CLIP/default and SigLIP/full), LLaVA-NeXT and OneVision:
exact placeholder counts, per-crop projector shapes, non-square budgets. The shared
contract (generate, unpatch, gradients, save/load, mismatch errors, threads, bad budgets)
runs over every family in tests/test_conformance.py."""

import pytest
import torch

import flexproj
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

FAMILIES = ["llava", "llava_siglip", "llava_next", "llava_onevision"]
BUDGETS = [4, 9, 16]  # the tiny towers have an 8x8 grid (64 native tokens per image/crop)
IMAGE_SIZES = [(64, 96), (96, 64)]  # (width, height): different crop layouts for AnyRes


def build(family, seed=0):
    model, processor = tiny_vlm(family, seed=seed)
    texts = [
        f"{IMAGE_PLACEHOLDER[family]} what color is the circle ?",
        f"{IMAGE_PLACEHOLDER[family]} how many",
    ]
    return model, processor, texts


def encode(processor, texts):
    return processor(text=texts, images=tiny_images(IMAGE_SIZES), return_tensors="pt", padding=True)


def placeholders(model, inputs):
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


class ProjectorOutputs:
    """Records the (crops, n, D) shapes the patched projector slot returns."""

    def __init__(self, model):
        self.shapes = []
        slot = model.model.multi_modal_projector
        self.handle = slot.register_forward_hook(lambda m, i, o: self.shapes.append(tuple(o.shape)))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_and_crop_shapes_at_three_budgets(family):
    """Exact placeholder counts and per-crop projector outputs (generate at several budgets:
    tests/test_conformance.py)."""
    model, processor, texts = build(family)
    with torch.no_grad():
        stock_counts = placeholders(model, encode(processor, texts))
    flexproj.patch(model, processor, tokens=16)
    recorder = ProjectorOutputs(model)
    counts = {}
    for n in BUDGETS:
        with flexproj.tokens(n), torch.no_grad():
            inputs = encode(processor, texts)
            model(**inputs)
        counts[n] = placeholders(model, inputs)
        # every crop was pooled to the budget's grid (n is a square here)
        _, tokens_per_crop, width = recorder.shapes[-1]
        assert tokens_per_crop == n and width == model.config.text_config.hidden_size
    recorder.close()
    if family in ("llava", "llava_siglip"):
        assert counts == {n: [n, n] for n in BUDGETS}
    else:
        # AnyRes: base crop + stitched crops + newlines; grows with the budget
        assert counts[4][0] < counts[9][0] < counts[16][0]
    # with a budget equal to the native grid the placeholder count is the stock one
    with flexproj.tokens(64):
        assert placeholders(model, encode(processor, texts)) == stock_counts


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_non_square_budget_uses_target_grid(family):
    model, processor, texts = build(family)
    flexproj.patch(model, processor, tokens=16)
    recorder = ProjectorOutputs(model)
    with flexproj.tokens(20), torch.no_grad():  # 20 tokens on an 8x8 grid -> 4x4
        model(**encode(processor, texts))
    assert recorder.shapes[-1][1] == 16
    recorder.close()


def test_from_pretrained_replaces_a_patched_projector(tmp_path):
    model, processor, texts = build("llava")
    flexproj.patch(model, processor, tokens=9)
    flexproj.save_pretrained(model, tmp_path / "a")
    other, other_processor, _ = build("llava", seed=1)
    flexproj.patch(other, other_processor, tokens=4)
    flexproj.from_pretrained(other, tmp_path / "a")
    assert flexproj.patch_info(other).default_tokens == 4  # kept
    assert torch.equal(
        flexproj.get_projector(other).mlp.w3.weight, flexproj.get_projector(model).mlp.w3.weight
    )
    # the processor patched before is still patched for the new projector
    assert placeholders(other, encode(other_processor, texts)) == [4, 4]


def test_unpatched_processor_with_patched_model_is_a_mismatch():
    model, processor, texts = build("llava")
    flexproj.patch(model, tokens=16)
    with pytest.raises(flexproj.TokenCountMismatch, match=r"carry 128 .* produces 32"):
        model(**encode(processor, texts))


def test_default_budget_and_nested_blocks():
    model, processor, texts = build("llava")
    flexproj.patch(model, processor, tokens=16)
    assert placeholders(model, encode(processor, texts)) == [16, 16]
    with flexproj.tokens(9):
        with flexproj.tokens(4):
            assert placeholders(model, encode(processor, texts)) == [4, 4]
        assert placeholders(model, encode(processor, texts)) == [9, 9]


def test_default_budget_when_none_given_is_capped_at_native():
    model, processor, _ = build("llava")
    flexproj.patch(model, processor)
    assert flexproj.patch_info(model).default_tokens == 64  # min(144, native 64)
