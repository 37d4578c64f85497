"""SmolVLM: what is specific to the family (the shared contract runs in test_conformance).

Every tile (the ``rows x cols`` split and the global view) takes the budget: the features
that reach the LLM are rebuilt here per tile from the vision model's own 8x8 grid
(``F.adaptive_avg_pool2d``, then ``project``), or, with ``projector="stock"``, from the
stock connector's 4x4 outputs; the prompt keeps upstream's row/column markers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flexproj
from flexproj.testing import tiny_images, tiny_vlm

FAMILY = "smolvlm"
try:
    flexproj.registry.get_adapter(FAMILY)
except flexproj.registry.FamilyUnavailable as exc:  # transformers 5.19: see adapters/smolvlm.py
    pytest.skip(str(exc), allow_module_level=True)
G, T = 8, 4  # tower grid side per 64 px tile (patch 8); stock side after pixel shuffle 2


def encode(processor, images):
    text = " and ".join(["<image>"] * len(images)) + " what is this ?"
    return processor(text=[text], images=[images], return_tensors="pt")


def pool(rows: torch.Tensor, side: int, budget: int) -> torch.Tensor:
    """``(tiles, side*side, C)`` row-major -> adaptive average pool to the budget's grid."""
    h, w = flexproj.target_grid(budget, (side, side))
    tiles, _, channels = rows.shape
    image = rows.transpose(1, 2).reshape(tiles, channels, side, side)
    return F.adaptive_avg_pool2d(image, (h, w)).reshape(tiles, channels, h * w).transpose(1, 2)


def tiles_of(inputs) -> torch.Tensor:
    """The real tiles, in order (the processor zero-pads each sample to the longest)."""
    pixels = inputs["pixel_values"].flatten(0, 1)
    return pixels[(pixels != 0).flatten(1).any(1)]


def llm_image_rows(model, inputs) -> torch.Tensor:
    seen = []
    hook = model.model.text_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen[0][inputs["input_ids"] == model.config.image_token_id]


@pytest.mark.parametrize("budget", [4, 9, 64])
def test_flex_features_are_the_projected_pool_of_each_tile(budget):
    model, processor = tiny_vlm(FAMILY)
    flexproj.patch(model, processor)
    with flexproj.tokens(budget):
        inputs = encode(processor, tiny_images([(64, 96)]))
        got = llm_image_rows(model, inputs)
    tiles = tiles_of(inputs)
    assert tiles.shape[0] == 5  # 2x2 tiles + the global view
    with torch.no_grad():
        grid = model.model.vision_model(pixel_values=tiles).last_hidden_state  # (5, 64, C)
        want = flexproj.get_projector(model).project(pool(grid, G, budget))
    torch.testing.assert_close(got, want.reshape(-1, want.shape[-1]))


@pytest.mark.parametrize("budget", [1, 4, 9])
def test_stock_mode_pools_the_connector_outputs(budget):
    model, processor = tiny_vlm(FAMILY)
    images = tiny_images([(96, 64), (64, 64)])
    with torch.no_grad():
        stock = model.model.connector(
            model.model.vision_model(
                pixel_values=tiles_of(encode(processor, images))
            ).last_hidden_state
        )  # (tiles, 16, D) from the unpatched model
    flexproj.patch(model, processor, projector="stock")
    with flexproj.tokens(budget):
        got = llm_image_rows(model, encode(processor, images))
    want = pool(stock, T, budget)
    torch.testing.assert_close(got, want.reshape(-1, want.shape[-1]), rtol=0, atol=0)


def test_prompt_keeps_the_tile_markers_with_fewer_tokens():
    model, processor = tiny_vlm(FAMILY)
    image = tiny_images([(64, 96)])
    stock = processor.tokenizer.decode(encode(processor, image)["input_ids"][0])
    flexproj.patch(model, processor)
    with flexproj.tokens(4):
        patched = processor.tokenizer.decode(encode(processor, image)["input_ids"][0])
    markers = ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>", "<global-img>"]
    for text in (stock, patched):
        assert [m for m in markers if m in text] == markers
    assert stock.count("<image>") == 5 * 16 and patched.count("<image>") == 5 * 4
    assert patched.count("<fake_token_around_image>") == stock.count("<fake_token_around_image>")


def test_per_image_budgets_map_onto_each_images_tiles():
    """Image 0 at 4, image 1 at 9, in one sample: 5 tiles each (both are resized to a
    128 px longest edge: 2x2 tiles + the global view)."""
    model, processor = tiny_vlm(FAMILY)
    flexproj.patch(model, processor)
    images = tiny_images([(64, 96), (64, 64)])
    with flexproj.tokens([4, 9]):
        inputs = encode(processor, images)
        got = llm_image_rows(model, inputs)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    tiles = tiles_of(inputs)
    assert tiles.shape[0] == 10
    with torch.no_grad():
        grid = model.model.vision_model(pixel_values=tiles).last_hidden_state
        project = flexproj.get_projector(model).project
        want = torch.cat([project(pool(grid[:5], G, 4)).flatten(0, 1),
                          project(pool(grid[5:], G, 9)).flatten(0, 1)])  # fmt: skip
    torch.testing.assert_close(got, want)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
