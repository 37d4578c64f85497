"""LLaVA-OneVision's ``anyres_max_N`` downsampling at tiny budgets: tall and wide images
must neither crash the model (a zero-sized interpolate) nor leave the processor's count
apart from the features, over a grid of image sizes and budgets."""

import pytest
import torch

import flexproj
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

# 64 px crops in layouts up to 4 x 1 and 3 x 3, so anyres_max_2 has grids to shrink too
PINPOINTS = [[64 * r, 64 * c] for r in range(1, 5) for c in range(1, 5) if r * c <= 9]
SIDES = [8, 12, 20, 32, 48, 64, 96, 128, 200, 256]
SIZES = [(w, h) for w in SIDES for h in SIDES]  # (width, height): tall, square and wide
BUDGETS = [1, 2, 3, 4, 9]
PROMPT = f"{IMAGE_PLACEHOLDER['llava_onevision']} what is it ?"


class PackedLengths:
    """Records the per-image feature counts ``pack_image_features`` returns (the patched
    one, or the stock one of an unpatched model)."""

    def __init__(self, base):
        self.base, self.lengths = base, []
        self.override = vars(base).get("pack_image_features")  # flexproj's, on the instance
        inner = base.pack_image_features

        def recording(*args, **kwargs):
            packed, lens = inner(*args, **kwargs)
            self.lengths.extend(lens.tolist())
            return packed, lens

        base.pack_image_features = recording

    def close(self):
        if self.override is None:
            del self.base.pack_image_features
        else:
            self.base.pack_image_features = self.override


@pytest.fixture(scope="module", params=["anyres_max_1", "anyres_max_2"])
def patched(request):
    model, processor = tiny_vlm(
        "llava_onevision", vision_aspect_ratio=request.param, image_grid_pinpoints=PINPOINTS
    )
    flexproj.patch(model, processor, tokens=16)
    return model, processor


@pytest.mark.parametrize("budget", BUDGETS)
def test_forward_over_sizes_matches_placeholders(patched, budget):
    model, processor = patched
    recorder = PackedLengths(model.model)
    try:
        with flexproj.tokens(budget), torch.no_grad():
            inputs = processor(
                text=[PROMPT] * len(SIZES),
                images=tiny_images(SIZES),
                return_tensors="pt",
                padding=True,
            )
            logits = model(**inputs).logits
    finally:
        recorder.close()
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert recorder.lengths == placeholders
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_generate_on_tall_and_wide_images(patched, budget):
    model, processor = patched
    sizes = [(8, 256), (256, 8), (20, 128), (128, 20)]
    with flexproj.tokens(budget):
        inputs = processor(
            text=[PROMPT] * len(sizes), images=tiny_images(sizes), return_tensors="pt", padding=True
        )
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (len(sizes), inputs["input_ids"].shape[1] + 2)


def test_native_budget_counts_as_the_stock_processor(patched):
    model, processor = patched
    _, stock = tiny_vlm(
        "llava_onevision",
        vision_aspect_ratio=processor.vision_aspect_ratio,
        image_grid_pinpoints=PINPOINTS,
    )

    def counts(proc):
        inputs = proc(text=[PROMPT] * len(SIZES), images=tiny_images(SIZES), padding=True)
        return [row.count(model.config.image_token_id) for row in inputs["input_ids"]]

    with flexproj.tokens(64):  # the tiny tower's native 8 x 8 grid
        assert counts(processor) == counts(stock)
