"""OneVision's ``anyres_max_N`` rule at its thresholds, against the stock model and processor.

Upstream keeps the unpadded grid of crops when ``ratio = sqrt(h * w / (N * side**2))`` is at
most 1.1 and shrinks it by ``ratio`` above. Cases sit at ratio exactly 1.0, inside
(1.0, 1.1] (kept by upstream, shrunk by a rule that cut at 1.0) and just above 1.1, at the
real model's size (384 px crops, ``anyres_max_9``, a 27 x 27 grid per crop, e.g. a 3 x 4 crop
layout unpadded to 81 x 90) and through the tiny model's forward. The oracle is always the
stock class: the processor's own ``_get_unpadded_features`` and the unpatched model's
``pack_image_features``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_onevision_anyres_max import PackedLengths  # the shared recorder
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

import flexproj
from flexproj.registry import get_adapter
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

REAL_CROP, REAL_SIDE = 384, 27  # LLaVA-OneVision (SigLIP 384 px, patch 14)
REAL_PINPOINTS = [[REAL_CROP * r, REAL_CROP * c] for r in range(1, 7) for c in range(1, 7)]
# (height, width) of images: unpadded 3 x 4 crop grids of 81 x 82 ... 81 x 98 (ratio 1.006
# to 1.0999), 81 x 100 and 81 x 102 (above 1.1), a 2 x 6 layout at 42 x 162 (1.018)
THRESHOLD_IMAGES = [(1136, 1157), (1031, 1157), (947, 1157), (926, 1157), (905, 1157),
                    (492, 1927)]  # fmt: skip
SWEEP = [(h, w) for h in range(120, 2400, 97) for w in range(120, 2400, 89)]


def upstream_ratio(orig, rows, cols, side, max_patches):
    """The ratio upstream compares with 1.1, from upstream's own unpadding."""
    empty = torch.empty((0, rows * side, cols * side))
    height, width = unpad_image(empty, list(orig)).shape[1:]
    return math.sqrt(height * width / (max_patches * side**2))


@pytest.fixture(scope="module")
def real_size_processor():
    _, processor = tiny_vlm(
        "llava_onevision", image_grid_pinpoints=REAL_PINPOINTS, vision_aspect_ratio="anyres_max_9"
    )
    return processor


def test_the_real_size_count_is_the_stock_processors_at_every_side_of_the_threshold(
    real_size_processor,
):
    processor = real_size_processor
    adapter = get_adapter("llava_onevision")
    ratios = []
    for orig in THRESHOLD_IMAGES + SWEEP:
        best_h, best_w = select_best_resolution(orig, REAL_PINPOINTS)
        rows, cols = best_h // REAL_CROP, best_w // REAL_CROP
        side = (REAL_SIDE, REAL_SIDE)
        expected = processor._get_unpadded_features(*orig, *side, rows, cols)  # the oracle
        got = adapter.unpadded_count(processor, side, orig, (REAL_CROP, REAL_CROP))
        assert got == expected, f"image {orig}: {got} tokens + newlines, stock {expected}"
        ratios.append(upstream_ratio(orig, rows, cols, REAL_SIDE, 9))
    assert upstream_ratio((1031, 1157), 3, 4, REAL_SIDE, 9) == pytest.approx(1.054, abs=1e-3)
    # the cases cover every side of the rule
    assert any(r < 1.0 for r in ratios) and any(r > 1.1 for r in ratios)
    assert sum(1.0 < r <= 1.1 for r in ratios) >= 5


# --------------------------------------------------------------------------- through the model

# 64 px crops of the tiny model (8 x 8 grid each), layouts up to 4 x 1 and 3 x 3
PINPOINTS = [[64 * r, 64 * c] for r in range(1, 5) for c in range(1, 5) if r * c <= 9]
# ((width, height), anyres_max_N, upstream's ratio), found by a search over sizes:
TINY_CASES = [
    ((8, 193), 1, 1.0),  # 4 x 1 crops unpadded to 32 x 2
    ((48, 65), 1, math.sqrt(80 / 64)),  # 2 x 1 crops, 10 x 8: shrunk
    ((19, 193), 2, 1.0),  # 32 x 4
    ((27, 129), 2, math.sqrt(144 / 128)),  # 3 x 1 crops, 24 x 6: kept (1.061 <= 1.1)
    ((50, 129), 2, math.sqrt(160 / 128)),  # 20 x 8: shrunk
]


def run(model, processor, sizes):
    prompt = f"{IMAGE_PLACEHOLDER['llava_onevision']} what is it ?"
    inputs = processor(
        text=[prompt] * len(sizes), images=tiny_images(sizes), return_tensors="pt", padding=True
    )
    recorder = PackedLengths(model.model)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        recorder.close()
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    return placeholders, recorder.lengths


@pytest.mark.parametrize("max_patches", [1, 2])
def test_the_tiny_model_at_native_budget_packs_as_the_stock_model(max_patches):
    cases = [(size, ratio) for size, m, ratio in TINY_CASES if m == max_patches]
    for (w, h), ratio in cases:  # the cases are where the search put them
        best_h, best_w = select_best_resolution((h, w), PINPOINTS)
        assert upstream_ratio((h, w), best_h // 64, best_w // 64, 8, max_patches) == ratio
    sizes = [size for size, _ in cases]
    kwargs = {"vision_aspect_ratio": f"anyres_max_{max_patches}", "image_grid_pinpoints": PINPOINTS}
    stock_model, stock_processor = tiny_vlm("llava_onevision", **kwargs)
    expected = run(stock_model, stock_processor, sizes)  # the oracle: never patched

    model, processor = tiny_vlm("llava_onevision", **kwargs)
    flexproj.patch(model, processor, tokens=64)  # the tiny tower's native 8 x 8 grid
    assert run(model, processor, sizes) == expected
