"""Qwen3.5: what is specific to the family (the shared contract runs in test_conformance).

The tower is Qwen3-VL's without deepstack, the LLM a hybrid of linear-attention (Gated
DeltaNet) and full-attention layers. Checked here: the features that reach the LLM are the
projected average pool of the row-major patch grid (rebuilt from the tower's block-major
rows); ``projector="stock"`` pools the merger outputs on the merged grid; M-RoPE positions
are laid out on the pooled grid; fewer vision tokens shorten the full-attention KV cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flexproj
from flexproj.adapters.qwen_vl import MergerPassThrough
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

FAMILY = "qwen3_5"
MERGE = 2
SIZES = [(64, 96), (128, 64)]  # (width, height): merged grids 6x4 and 4x8


def encode(processor, n_images: int = 2):
    images = " and ".join([IMAGE_PLACEHOLDER[FAMILY]] * n_images)
    return processor(
        text=[f"{images} what is this ?"], images=tiny_images(SIZES[:n_images]), return_tensors="pt"
    )


def pool(rows: torch.Tensor, grid: tuple[int, int], budget: int) -> torch.Tensor:
    """``(H*W, C)`` row-major -> ``F.adaptive_avg_pool2d`` to ``target_grid(budget, grid)``."""
    (H, W), (h, w) = grid, flexproj.target_grid(budget, grid)
    return F.adaptive_avg_pool2d(rows.T.reshape(1, -1, H, W), (h, w)).reshape(-1, h * w).T


def test_the_tiny_model_is_the_hybrid_without_deepstack():
    model, _ = tiny_vlm(FAMILY)
    assert model.config.text_config.layer_types == ["linear_attention", "full_attention"]
    assert not hasattr(model.model.visual, "deepstack_merger_list")


@pytest.mark.parametrize("budget", [6, 16, 32])  # 6: uneven bins; 32: native for image 0
def test_llm_receives_the_pooled_patch_grid(budget):
    model, processor = tiny_vlm(FAMILY)
    inputs = encode(processor)
    pixel_values, grid_thw = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        tower = model.model.visual(pixel_values, grid_thw=grid_thw).last_hidden_state
    flexproj.patch(model, processor)
    assert isinstance(model.model.visual.merger, MergerPassThrough)
    projector = flexproj.get_projector(model)
    with torch.no_grad(), flexproj.tokens(budget):
        got = model.model.get_image_features(pixel_values, grid_thw).pooler_output
    start = 0
    for i, (t, H, W) in enumerate(grid_thw.tolist()):
        rows = tower[start : start + t * H * W]
        start += t * H * W
        # block-major row k holds patch (bh*m + i, bw*m + j), k = ((bh*W/m + bw)*m + i)*m + j
        index = torch.arange(H * W).view(H // MERGE, MERGE, W // MERGE, MERGE)
        grid = torch.empty_like(rows)
        grid[index.permute(0, 2, 1, 3).reshape(-1)] = rows
        h, w = flexproj.target_grid(budget, (H // MERGE, W // MERGE))
        with torch.no_grad():
            want = projector.project(
                F.adaptive_avg_pool2d(grid.T.reshape(1, -1, H, W), (h, w)).reshape(-1, h * w).T
            )
        torch.testing.assert_close(got[i], want)


@pytest.mark.parametrize("budget", [1, 6, 16])
def test_stock_mode_pools_the_merger_outputs(budget):
    model, processor = tiny_vlm(FAMILY)
    flexproj.patch(model, processor, projector="stock")
    with flexproj.tokens(budget):
        inputs = encode(processor)
    pixel_values, grid_thw = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        with flexproj.disabled(model):
            stock = model.model.get_image_features(pixel_values, grid_thw).pooler_output
        with flexproj.tokens(budget):
            got = model.model.get_image_features(pixel_values, grid_thw).pooler_output
            model(**inputs)  # placeholders and features agree
    merged = (grid_thw[:, 1:] // MERGE).tolist()
    for s, g, out in zip(stock, merged, got, strict=True):
        torch.testing.assert_close(out, pool(s, tuple(g), budget), rtol=0, atol=0)


def test_mrope_positions_follow_the_pooled_grid():
    """At budget 4 image 0 (merged 6x4) becomes h x w = target_grid(4, (6, 4)): its
    positions are those the stock get_rope_index gives an image of h x w merged units."""
    model, processor = tiny_vlm(FAMILY)
    flexproj.patch(model, processor)
    with flexproj.tokens(4):
        inputs = encode(processor, n_images=1)
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    with flexproj.tokens(4):
        got, _ = model.model.get_rope_index(ids, types, image_grid_thw=inputs["image_grid_thw"])
    h, w = flexproj.target_grid(4, (6, 4))
    with flexproj.disabled(model):
        want, _ = model.model.get_rope_index(
            ids, types, image_grid_thw=torch.tensor([[1, h * MERGE, w * MERGE]])
        )
    assert int((ids == model.config.image_token_id).sum()) == h * w < 24
    assert torch.equal(got, want)


def test_fewer_tokens_shorten_the_full_attention_cache():
    model, processor = tiny_vlm(FAMILY)
    flexproj.patch(model, processor)
    lengths = {}
    for n in (4, 16):
        with flexproj.tokens(n):
            inputs = encode(processor)
            with torch.no_grad():
                cache = model(**inputs, use_cache=True).past_key_values
        full = model.config.text_config.layer_types.index("full_attention")
        lengths[n] = (cache.get_seq_length(full), inputs["input_ids"].shape[1])
    assert lengths[4][0] == lengths[4][1] < lengths[16][0] == lengths[16][1]
