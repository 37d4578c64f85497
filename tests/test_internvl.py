"""flexproj.patch on InternVL: N vision tokens per tile (crops and thumbnail alike).

The tiny InternVL has 64 px tiles and patch 8: an 8x8 native grid (64 tokens) plus CLS;
stock pixel shuffle makes 16 tokens per tile. A 64x64 image is 1 tile, 64 wide x 96 high
is 2 crops + thumbnail = 3 tiles, 128x128 is 4 crops + thumbnail = 5 tiles.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import flexproj
from flexproj.adapters.internvl import InternVLAdapter, TileGridProjector
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

IMG = IMAGE_PLACEHOLDER["internvl"]
# sample 0: one image; sample 1: two images. (width, height) -> tiles: 3, then 1 and 5.
TEXTS = [f"{IMG} what color is the circle ?", f"{IMG} and {IMG} how many shapes ?"]
SIZES = [(64, 96), (64, 64), (128, 128)]
IMAGES_PER_SAMPLE = [1, 2]
NATIVE = 64  # 8x8 patch grid per tile


def encode(processor, texts=TEXTS, sizes=SIZES):
    return processor(
        text=texts,
        images=tiny_images(sizes),
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )


def tiles_per_image(processor, sizes=SIZES) -> list[int]:
    """Tile counts straight from the image processor (the processor pops ``num_patches``)."""
    return [int(t) for t in processor.image_processor(tiny_images(sizes))["num_patches"]]


def image_spans(processor, ids: torch.Tensor) -> list[int]:
    """Context tokens inside each ``<img>...</img>`` span of one sample, in order."""
    spans, inside, count = [], False, 0
    for token in ids.tolist():
        if token == processor.start_image_token_id:
            assert not inside, "nested <img>"
            inside, count = True, 0
        elif token == processor.end_image_token_id:
            assert inside, "</img> without <img>"
            spans.append(count)
            inside = False
        elif token == processor.image_token_id:
            assert inside, "context token outside <img>...</img>"
            count += 1
    assert not inside, "unclosed <img>"
    return spans


class SlotCalls:
    """Records (input shape, output shape) of every call of the projector slot."""

    def __init__(self, model):
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        slot = model.model.multi_modal_projector
        self.handle = slot.register_forward_hook(
            lambda m, args, out: self.calls.append((tuple(args[0].shape), tuple(out.shape)))
        )

    def close(self):
        self.handle.remove()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_tile_counts_of_the_fixture():
    _, processor = tiny_vlm("internvl")
    assert tiles_per_image(processor) == [3, 1, 5]
    # stock: 16 context tokens per tile
    inputs = encode(processor)
    spans = [image_spans(processor, ids) for ids in inputs["input_ids"]]
    assert spans == [[3 * 16], [1 * 16, 5 * 16]]


def test_generate_at_three_budgets_tiles_and_thumbnail():
    model, processor = tiny_vlm("internvl")
    tiles = tiles_per_image(processor)
    flexproj.patch(model, processor, tokens=16)
    calls = SlotCalls(model)
    width = model.config.text_config.hidden_size
    for n in (4, 16, 64):
        with flexproj.tokens(n):
            inputs = encode(processor)
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        # pixel_values hold every tile of every image, in prompt order
        assert inputs["pixel_values"].shape[0] == sum(tiles)
        # one <img> span per image, each with tiles x N context tokens
        spans = [image_spans(processor, ids) for ids in inputs["input_ids"]]
        assert [len(s) for s in spans] == IMAGES_PER_SAMPLE
        assert spans == [[tiles[0] * n], [tiles[1] * n, tiles[2] * n]]
        # left padding: the shorter sample (one image) starts with pads
        assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1, 0] == 1
        # the model pooled every tile (crops and thumbnails) to N tokens, once (pre-encoding)
        assert calls.calls[-1][1] == (sum(tiles), n, width)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    calls.close()


@pytest.mark.parametrize(("budget", "side"), [(10, 3), (20, 4), (63, 7), (1, 1)])
def test_non_square_budget_uses_target_grid(budget, side):
    assert flexproj.target_grid(budget, (8, 8)) == (side, side)
    per_tile = side * side
    model, processor = tiny_vlm("internvl")
    flexproj.patch(model, processor)
    calls = SlotCalls(model)
    with flexproj.tokens(budget):
        inputs = encode(processor)
        logits(model, inputs)
    assert [image_spans(processor, ids) for ids in inputs["input_ids"]] == [
        [3 * per_tile],
        [1 * per_tile, 5 * per_tile],
    ]
    assert calls.calls[-1][1][1] == per_tile
    calls.close()


def test_default_budget_is_capped_by_native_grid():
    model, processor = tiny_vlm("internvl")
    flexproj.patch(model, processor)  # min(144, 64)
    assert flexproj.patch_info(model).default_tokens == NATIVE
    assert InternVLAdapter().native_tokens(model) == NATIVE


def test_448px_tiles_pool_the_32x32_grid():
    """At the real geometry (448 px, patch 14) the native grid is 32x32 = 1024 tokens per
    tile and N = 256 reproduces the stock count (pixel shuffle gives 16x16)."""
    model, processor = tiny_vlm("internvl", vision_config={"image_size": 448, "patch_size": 14})
    assert processor.image_seq_length == 256
    texts, sizes = [f"{IMG} what"], [(448, 448)]
    stock = encode(processor, texts, sizes)
    flexproj.patch(model, processor, tokens=256)
    assert InternVLAdapter().native_tokens(model) == 1024
    inputs = encode(processor, texts, sizes)
    assert torch.equal(inputs["input_ids"], stock["input_ids"])
    calls = SlotCalls(model)
    logits(model, inputs)
    assert calls.calls[-1] == ((1, 1024, 32), (1, 256, model.config.text_config.hidden_size))
    with flexproj.tokens(1024):  # the whole native grid: no pooling, no upsampling
        logits(model, encode(processor, texts, sizes))
    assert calls.calls[-1][1][1] == 1024
    calls.close()
    with pytest.raises(flexproj.BudgetError, match="1024"), flexproj.tokens(1025):
        encode(processor, texts, sizes)


def test_gradient_flows_through_the_pooling_into_the_vision_tower():
    """(Only the projector with the rest frozen: tests/test_conformance.py.)"""
    model, processor = tiny_vlm("internvl")
    flexproj.patch(model, processor, tokens=4)
    model.requires_grad_(False)
    flexproj.get_projector(model).requires_grad_(True)
    model.train()
    inputs = encode(processor)
    model.model.vision_tower.requires_grad_(True)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    patch_embed = model.model.vision_tower.embeddings.patch_embeddings.projection.weight
    assert patch_embed.grad is not None and patch_embed.grad.abs().sum() > 0


def test_unpatched_processor_inputs_are_a_mismatch_per_tile():
    """(Patched inputs at another budget, both counts named: tests/test_conformance.py.)"""
    model, processor = tiny_vlm("internvl")
    stock_inputs = encode(processor)  # 16 per tile
    flexproj.patch(model, processor, tokens=16)
    # inputs from an unpatched processor: 16 per tile against the model's 9
    with flexproj.tokens(9), pytest.raises(flexproj.TokenCountMismatch, match="per tile"):
        logits(model, stock_inputs)


def test_stock_full_strategy_cannot_run_but_patched_can():
    """Stock InternVL reshapes CLS + grid into a square before pixel shuffle, so "full"
    crashes; patched, the CLS (not a grid cell) is dropped explicitly and "full" gives
    exactly the features of "default"."""
    model, processor = tiny_vlm("internvl", vision_feature_select_strategy="full")
    with pytest.raises(RuntimeError):
        logits(model, encode(processor))

    default_model, default_processor = tiny_vlm("internvl")
    flexproj.patch(default_model, default_processor, tokens=9)
    projector = copy.deepcopy(flexproj.get_projector(default_model))
    flexproj.patch(model, processor, tokens=9, projector=projector)
    full_calls, default_calls = SlotCalls(model), SlotCalls(default_model)
    inputs = encode(processor)
    assert torch.equal(inputs["input_ids"], encode(default_processor)["input_ids"])
    assert torch.equal(logits(model, inputs), logits(default_model, inputs))
    assert full_calls.calls[-1][0] == (9, NATIVE + 1, 32)  # CLS reached the slot ...
    assert default_calls.calls[-1][0] == (9, NATIVE, 32)  # ... upstream dropped it
    assert full_calls.calls[-1][1] == default_calls.calls[-1][1] == (9, 9, 64)
    out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    full_calls.close()
    default_calls.close()


def test_get_image_features_keeps_signature_and_config_defaults():
    model, processor = tiny_vlm("internvl")
    base = model.model
    stock_signature = inspect.signature(base.get_image_features)
    pixels = encode(processor)["pixel_values"]
    with torch.no_grad():
        layer1 = base.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    flexproj.patch(model, processor, tokens=4)
    assert inspect.signature(base.get_image_features) == stock_signature
    assert inspect.signature(model.get_image_features) == stock_signature
    calls = SlotCalls(model)
    slot_inputs = []
    hook = base.multi_modal_projector.register_forward_hook(
        lambda m, args, out: slot_inputs.append(args[0])
    )
    with torch.no_grad():
        out = base.get_image_features(pixels)  # strategy "default" and layer -1 from the config
        assert out.pooler_output.shape == (9, 4, 64)
        assert calls.calls[-1][0] == (9, NATIVE, 32)
        assert isinstance(base.get_image_features(pixels, return_dict=False), tuple)
        # an explicit strategy wins over the config (positional too); "full" keeps the CLS
        # for the slot to drop, so the features are the same
        full = base.get_image_features(pixels, -1, "full").pooler_output
        assert calls.calls[-1][0] == (9, NATIVE + 1, 32)
        assert torch.equal(full, out.pooler_output)
        # another vision layer is read from hidden_states
        earlier = base.get_image_features(pixels, vision_feature_layer=1).pooler_output
        assert torch.equal(slot_inputs[-1], layer1[:, 1:])
        assert earlier.shape == (9, 4, 64) and not torch.equal(earlier, out.pooler_output)
        with pytest.raises(ValueError, match="select feature strategy"):
            base.get_image_features(pixels, vision_feature_select_strategy="cls")
    hook.remove()
    calls.close()


def test_bare_internvl_model_can_be_patched():
    model, processor = tiny_vlm("internvl")
    base = model.model
    flexproj.patch(base, processor, tokens=4)
    inputs = encode(processor)
    with torch.no_grad():
        out = base(**inputs)
    assert out.image_hidden_states.shape == (9, 4, 64)
    flexproj.unpatch(base)
    assert not isinstance(base.multi_modal_projector, TileGridProjector)


def test_video_and_vllm_counts_follow_the_budget():
    model, processor = tiny_vlm("internvl")
    flexproj.patch(model, processor, tokens=4)
    # videos need torchvision to be processed; the placeholder builder is called directly
    video_inputs = {"pixel_values_videos": torch.zeros(1, 3, 3, 64, 64)}  # 1 video, 3 frames
    text = processor.replace_video_token(video_inputs, video_idx=0)
    assert text.count("Frame") == 3 and text.count("<img>") == 3
    assert text.count(IMG) == 3 * 4
    sizes = [(96, 64), (64, 64), (128, 128)]
    with flexproj.disabled(model):  # what upstream counts besides the context tokens
        stock = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
        stock_spans = [
            s for ids in encode(processor)["input_ids"] for s in image_spans(processor, ids)
        ]
    extra = {r - s for r, s in zip(stock, stock_spans, strict=True)}
    assert len(extra) == 1 and extra <= {0, 2}  # <img></img> (5.23) or not (5.25)
    with flexproj.tokens(16):
        data = processor._get_num_multimodal_tokens(image_sizes=sizes)
        inputs = encode(processor)
    assert data.num_image_patches == [3, 1, 5]
    spans = [s for ids in inputs["input_ids"] for s in image_spans(processor, ids)]
    offset = extra.pop()
    assert (
        data.num_image_tokens == [offset + s for s in spans] == [offset + n for n in (48, 16, 80)]
    )


def test_wrong_processor_is_rejected():
    model, _ = tiny_vlm("internvl")
    _, llava_processor = tiny_vlm("llava")
    with pytest.raises(flexproj.UnsupportedModelError, match="InternVLProcessor"):
        flexproj.patch(model, llava_processor)
    assert not flexproj.is_patched(model)  # all-or-nothing: the model is as it was
    assert not isinstance(model.model.multi_modal_projector, TileGridProjector)
    assert "get_image_features" not in vars(model.model)
