"""Gemma 3: what is specific to the family (the shared contract runs in test_conformance).

Values are rebuilt here from the SigLIP tower's own output grid: the FlexProjector path
(``F.adaptive_avg_pool2d`` of the 8x8 grid, then ``project``), and the two training-free
ways, ``stock_pooling="after"`` (the stock 4x4 outputs pooled) and ``"first"`` (the 8x8
grid pooled, then Gemma's RMSNorm ``x / rms(x) * (1 + w)`` and the projection matrix,
written out here). Pan-and-scan crops each take the image's budget.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flexproj
from flexproj.testing import tiny_images, tiny_vlm

FAMILY = "gemma3"
G, T = 8, 4  # tower grid side (64 px / patch 8), stock output side (mm_tokens_per_image 16)


def encode(processor, images, text: str = "<start_of_image> what is this ?"):
    return processor(text=[text], images=[images], return_tensors="pt")


def grid_pool(rows: torch.Tensor, side: int, budget: int) -> torch.Tensor:
    """``(crops, side*side, C)`` row-major -> adaptive average pool to the budget's grid."""
    h, w = flexproj.target_grid(budget, (side, side))
    crops, _, channels = rows.shape
    image = rows.transpose(1, 2).reshape(crops, channels, side, side)
    return F.adaptive_avg_pool2d(image, (h, w)).reshape(crops, channels, h * w).transpose(1, 2)


def rms_norm_project(model, x: torch.Tensor) -> torch.Tensor:
    """Gemma 3's stock projector after its pooling, written out: RMSNorm(1 + w), matmul."""
    stock = model.model.multi_modal_projector
    norm = stock.mm_soft_emb_norm
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight)
    return normed @ stock.mm_input_projection_weight


def tower(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.vision_tower(pixel_values=pixel_values).last_hidden_state


def features(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.model.get_image_features(inputs["pixel_values"]).pooler_output


@pytest.mark.parametrize("budget", [4, 9, 16, 64])
def test_flex_features_are_the_projected_pool_of_the_tower_grid(budget):
    model, processor = tiny_vlm(FAMILY)
    flexproj.patch(model, processor)
    with flexproj.tokens(budget):
        inputs = encode(processor, tiny_images([(96, 64)]))
        got = features(model, inputs)
        with torch.no_grad():
            want = flexproj.get_projector(model).project(
                grid_pool(tower(model, inputs["pixel_values"]), G, budget)
            )
    torch.testing.assert_close(got, want)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == want.shape[1]


@pytest.mark.parametrize("budget", [1, 4, 9])
def test_the_two_training_free_poolings(budget):
    model, processor = tiny_vlm(FAMILY)
    inputs = encode(processor, tiny_images([(96, 64)]))
    stock = features(model, inputs)  # (1, T*T, D) from the unpatched model
    grid = tower(model, inputs["pixel_values"])  # (1, G*G, C)
    got = {}
    for pooling in ("after", "first"):
        flexproj.patch(model, processor, projector="stock", stock_pooling=pooling)
        assert flexproj.patch_info(model).stock_pooling == pooling
        with flexproj.tokens(budget):
            got[pooling] = features(model, encode(processor, tiny_images([(96, 64)])))
        flexproj.unpatch(model)
    torch.testing.assert_close(got["after"], grid_pool(stock, T, budget), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            got["first"], rms_norm_project(model, grid_pool(grid, G, budget))
        )
    assert not torch.allclose(got["first"], got["after"])  # two different models below T*T


def test_pool_first_at_the_stock_count_is_the_stock_model():
    """AvgPool2d(G/T) is adaptive pooling to T x T: at N = T*T the pool-first path is the
    stock projector (same tokens, same logits up to float summation order)."""
    model, processor = tiny_vlm(FAMILY)
    inputs = encode(processor, tiny_images([(64, 64)]))
    with torch.no_grad():
        want = model(**inputs).logits
    flexproj.patch(model, processor, projector="stock", stock_pooling="first")
    assert flexproj.patch_info(model).default_tokens == T * T
    native = encode(processor, tiny_images([(64, 64)]))
    assert torch.equal(native["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**native).logits, want, rtol=1e-5, atol=1e-5)


def test_stock_pooling_is_checked_before_anything_changes():
    model, processor = tiny_vlm(FAMILY)
    for kwargs in ({"stock_pooling": "first"}, {"projector": "stock", "stock_pooling": "middle"}):
        with pytest.raises(flexproj.PatchError, match="stock_pooling"):
            flexproj.patch(model, processor, **kwargs)
        assert not flexproj.is_patched(model)
    llava, llava_processor = tiny_vlm("llava")
    with pytest.raises(flexproj.PatchError, match="offers 'after'"):
        flexproj.patch(llava, llava_processor, projector="stock", stock_pooling="first")
    assert not flexproj.is_patched(llava)


def test_the_image_sequence_keeps_its_markers():
    model, processor = tiny_vlm(FAMILY)
    flexproj.patch(model, processor)
    tok = processor.tokenizer
    with flexproj.tokens(4):
        ids = encode(processor, tiny_images([(64, 64)]))["input_ids"][0].tolist()
    soft = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    assert len(soft) == 4 and soft == list(range(soft[0], soft[0] + 4))
    assert ids[soft[0] - 1] == tok.convert_tokens_to_ids("<start_of_image>")
    assert ids[soft[-1] + 1] == tok.convert_tokens_to_ids("<end_of_image>")


@pytest.mark.parametrize("mode", ["flex", "stock"])
def test_pan_and_scan_crops_each_take_the_budget(mode):
    """A 2:1 image is cut into 2 crops besides the original: 3 image sequences of h*w soft
    tokens each; per-image budgets map onto the crops of each image."""
    model, processor = tiny_vlm(FAMILY)
    crops = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}
    flexproj.patch(model, processor, projector="stock" if mode == "stock" else None)
    wide, square = tiny_images([(128, 64), (64, 64)])
    text = "<start_of_image> and <start_of_image> what ?"
    with flexproj.tokens([4, 9]):
        inputs = processor(text=[text], images=[[wide, square]], return_tensors="pt", **crops)
        assert inputs["pixel_values"].shape[0] == 4  # wide: original + 2 crops; square: 1
        with torch.no_grad():
            hidden = model(**inputs).image_hidden_states  # what the LLM received
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3 * 4 + 9
    assert hidden.reshape(-1, hidden.shape[-1]).shape[0] == 3 * 4 + 9
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
