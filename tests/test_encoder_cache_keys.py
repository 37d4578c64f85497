"""The vision cache answers a call only with the features the tower would compute for it:
pixels with the same bytes but another dtype (float16 read as bfloat16), or Qwen's patch
rows under another ``grid_thw`` (other positions), are encoded, not taken from the cache.
The oracle is the stock tower outside any cache."""

from __future__ import annotations

import torch

import flexproj
from flexproj.encoder_cache import vision_cache
from flexproj.registry import adapter_for
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm


def first_tensor(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def test_same_bytes_in_another_dtype_are_encoded_again():
    model, processor = tiny_vlm("llava")
    flexproj.patch(model)  # the cache serves patched models
    tower = adapter_for(model).vision_tower(model)
    pixels = processor(text=["<image> a"], images=tiny_images([(64, 64)]), return_tensors="pt")[
        "pixel_values"
    ]
    half = pixels.to(torch.float16)
    relabelled = half.view(torch.bfloat16)  # the same bytes, other numbers
    with torch.no_grad():
        expected = first_tensor(tower(relabelled))
        assert not torch.equal(expected, first_tensor(tower(half)))
        with vision_cache(model) as cache:
            tower(half)
            got = first_tensor(tower(relabelled))
    assert cache.reused == 0 and cache.computed == 2
    assert torch.equal(got, expected)


def test_qwen_patch_rows_under_another_grid_are_encoded_again():
    model, processor = tiny_vlm("qwen2_vl")
    flexproj.patch(model)
    tower = adapter_for(model).vision_tower(model)
    inputs = processor(
        text=[f"{IMAGE_PLACEHOLDER['qwen2_vl']} a"],
        images=tiny_images([(64, 64)]),
        return_tensors="pt",
    )
    rows, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    t, h, w = grid[0].tolist()
    other = torch.tensor([[t, h // 2, w * 2]])  # the same rows, other positions
    assert int(other.prod()) == rows.shape[0]
    with torch.no_grad():
        expected = first_tensor(tower(rows, grid_thw=other))
        assert not torch.equal(expected, first_tensor(tower(rows, grid_thw=grid)))
        with vision_cache(model) as cache:
            tower(rows, grid_thw=grid)
            got = first_tensor(tower(rows, grid_thw=other))
    assert cache.reused == 0 and cache.computed == 2
    assert torch.equal(got, expected)
