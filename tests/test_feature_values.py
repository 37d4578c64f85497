"""Values, not just shapes: what the patched model feeds the LLM, rebuilt independently.

For every LLaVA-family and InternVL tiny model, the image features that reach the
language model under ``flexproj.tokens(n)`` must equal a reference built here from the
vision tower's own hidden states: the family's CLS rule applied, the row-major patch grid
rebuilt, pooled with ``F.adaptive_avg_pool2d`` to ``flexproj.target_grid(n, grid)``, then
``flexproj.get_projector(model).project``. LLaVA-NeXT / OneVision crops are then packed by
the *stock* ``pack_image_features`` (the upstream class method, not flexproj's override),
told the pooled crop side. Qwen-VL has the same check in ``test_qwen_vl.test_pooling_layout``.

Images are non-square (96 wide x 64 high, 64 wide x 128 high): on the AnyRes families
they give 1x2 and 2x1 crop grids, so a crop stitched transposed or in the wrong order
changes the values while every shape stays the same.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import flexproj
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

SIZES = [(96, 64), (64, 128)]  # (width, height)
ANYRES = ("llava_next", "llava_onevision")
# (family, overrides): every tiny family but Qwen-VL, plus the "full" strategy on CLS towers
CASES = {
    "llava": ("llava", {}),
    "llava_full": ("llava", {"vision_feature_select_strategy": "full"}),
    "llava_siglip": ("llava_siglip", {}),
    "llava_next": ("llava_next", {}),
    "llava_onevision": ("llava_onevision", {}),
    "internvl": ("internvl", {}),
    "internvl_full": ("internvl", {"vision_feature_select_strategy": "full"}),
}


@functools.cache
def patched(case: str):
    family, overrides = CASES[case]
    model, processor = tiny_vlm(family, **overrides)
    flexproj.patch(model, processor)
    return family, model, processor


def prompt(family: str, n_images: int = 1) -> str:
    images = " and ".join([IMAGE_PLACEHOLDER[family]] * n_images)
    return f"user : {images} what is this ?"


# ----------------------------------------------------------------------------- reference


def tower_grid(family: str, model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Row-major patch features ``(crops, side*side, C)`` of square crops, CLS removed."""
    base, config = model.model, model.config
    vision = config.vision_config
    if family == "internvl":
        hidden = base.vision_tower(pixel_values=pixel_values).last_hidden_state
        side = pixel_values.shape[-1] // vision.patch_size[-1]
        has_cls = True  # InternViT always prepends one; both strategies drop it once patched
    else:
        out = base.vision_tower(pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[config.vision_feature_layer]
        side = vision.image_size // vision.patch_size
        has_cls = vision.model_type.startswith("clip")  # SigLIP has no CLS
    if has_cls:
        assert hidden.shape[1] == side * side + 1
        hidden = hidden[:, 1:]
    assert hidden.shape[1] == side * side
    return hidden, side


def pooled_projection(model, rows: torch.Tensor, side: int, budget: int) -> torch.Tensor:
    """``(crops, side*side, C)`` -> adaptive-avg-pool to the target grid -> project."""
    h, w = flexproj.target_grid(budget, (side, side))
    crops, _, channels = rows.shape
    image = rows.transpose(1, 2).reshape(crops, channels, side, side)
    pooled = F.adaptive_avg_pool2d(image, (h, w)).reshape(crops, channels, h * w).transpose(1, 2)
    return flexproj.get_projector(model).project(pooled)


def stock_pack(model, crops: list[torch.Tensor], image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Upstream ``pack_image_features`` (the class's, not the patched instance's) on per-crop
    features whose side may be pooled: upstream reads the side from
    ``image_size // patch_size``, so it runs on a config copy with a patch size that gives
    the pooled side (the real model at the native side)."""
    base = model.model
    pooled_side = round(crops[0].shape[1] ** 0.5)
    owner = base
    vision = model.config.vision_config
    if pooled_side != vision.image_size // vision.patch_size:
        config = copy.deepcopy(model.config)
        config.vision_config.patch_size = vision.image_size // pooled_side
        assert config.vision_config.image_size // config.vision_config.patch_size == pooled_side
        owner = SimpleNamespace(config=config)
    pack = type(base).pack_image_features
    if model.config.model_type == "llava_onevision":
        packed, _ = pack(owner, crops, image_sizes, image_newline=base.image_newline,
                         vision_aspect_ratio=model.config.vision_aspect_ratio)  # fmt: skip
    else:
        packed, _ = pack(owner, crops, image_sizes, model.config.vision_feature_select_strategy,
                         image_newline=base.image_newline)  # fmt: skip
    return list(packed)


def reference_features(
    family: str, model, processor, images, inputs, budget: int, crops: list[int] | None = None
) -> list[torch.Tensor]:
    """Per image, the features the LLM should receive, rebuilt from the tower."""
    pixel_values = inputs["pixel_values"]
    if family == "internvl":  # (tiles, 3, S, S); every tile pooled on its own
        rows, side = tower_grid(family, model, pixel_values)
        tiles = pooled_projection(model, rows, side, budget)
        counts = processor.image_processor(images, return_tensors="pt")["num_patches"]
        return [t.flatten(0, 1) for t in torch.split(tiles, [int(c) for c in counts])]
    if family not in ANYRES:  # (images, 3, S, S): one grid per image
        rows, side = tower_grid(family, model, pixel_values)
        return list(pooled_projection(model, rows, side, budget))
    per_image = []
    for i, k in enumerate(crops or anyres_crops(model, inputs["image_sizes"])):
        rows, side = tower_grid(family, model, pixel_values[i, :k])
        per_image.append(pooled_projection(model, rows, side, budget))
    return stock_pack(model, per_image, inputs["image_sizes"])


def anyres_crops(model, image_sizes: torch.Tensor) -> list[int]:
    """Base image + the crops tiling the best-fit resolution, per image."""
    from transformers.image_processing_utils import select_best_resolution

    side = model.config.vision_config.image_size
    counts = []
    for h, w in image_sizes.tolist():
        best_h, best_w = select_best_resolution((h, w), model.config.image_grid_pinpoints)
        counts.append(1 + (best_h // side) * (best_w // side))
    return counts


# ----------------------------------------------------------------------------- helpers


def placeholder_runs(input_ids: torch.Tensor, image_id: int) -> list[int]:
    """Lengths of the consecutive image-placeholder runs, sample by sample (one per image)."""
    runs = []
    for row in input_ids.tolist():
        length = 0
        for tok in [*row, None]:
            if tok == image_id:
                length += 1
            elif length:
                runs.append(length)
                length = 0
    return runs


@contextmanager
def llm_inputs(model) -> Iterator[list[torch.Tensor]]:
    """``inputs_embeds`` the language model receives, one entry per call."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def flat(features) -> torch.Tensor:
    """Per-image (or per-tile) features as one ``(tokens, D)`` tensor, in order."""
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])


def image_features(model, inputs):
    kwargs = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
    return model.model.get_image_features(inputs["pixel_values"], **kwargs).pooler_output


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("budget", [9, 36, 64])  # 3x3, 6x6 (uneven bins), native 8x8
@pytest.mark.parametrize("case", list(CASES))
def test_llm_receives_the_reference_features(case, budget):
    """get_image_features and the LLM's input embeddings at the image positions equal the
    reference; on NeXT / OneVision at 64 (the native side) the reference packing is the
    real model's stock ``pack_image_features`` on the per-crop projector outputs."""
    family, model, processor = patched(case)
    images = tiny_images(SIZES)
    with torch.no_grad(), flexproj.tokens(budget):
        inputs = processor(
            text=[prompt(family)] * 2, images=images, return_tensors="pt", padding=True
        )
        want = reference_features(family, model, processor, images, inputs, budget)
        got = image_features(model, inputs)
        with llm_inputs(model) as seen:
            model(**inputs)
    image_id = model.config.image_token_id
    assert placeholder_runs(inputs["input_ids"], image_id) == [len(f) for f in want]
    torch.testing.assert_close(flat(got), flat(want))
    torch.testing.assert_close(seen[0][inputs["input_ids"] == image_id], flat(want))


@pytest.mark.parametrize("budget", [9, 36])
def test_onevision_multi_image_sample_uses_the_base_crop_only(budget):
    """Sample 0 has one image (AnyRes: base + crops), sample 1 two (base crop + newline
    each): placeholders per image = features per image = the reference, and generate runs."""
    family, model, processor = patched("llava_onevision")
    a, b, c = tiny_images([(96, 64), (64, 128), (128, 96)])
    with torch.no_grad(), flexproj.tokens(budget):
        inputs = processor(
            text=[prompt(family), prompt(family, 2)],
            images=[[a], [b, c]],
            return_tensors="pt",
            padding=True,
        )
        assert inputs["batch_num_images"].tolist() == [1, 2]
        crops = [anyres_crops(model, inputs["image_sizes"][:1])[0], 1, 1]
        assert crops[0] == 3  # 96 x 64 px: base + 1x2 crops
        want = reference_features(family, model, processor, None, inputs, budget, crops)
        got = image_features(model, inputs)
        with llm_inputs(model) as seen:
            model(**inputs)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    h, w = flexproj.target_grid(budget, (8, 8))
    runs = placeholder_runs(inputs["input_ids"], model.config.image_token_id)
    assert runs == [len(f) for f in want] == [len(f) for f in got]
    assert runs[1:] == [h * w + 1] * 2  # base crop + one newline per multi-image image
    torch.testing.assert_close(flat(got), flat(want))
    image_positions = inputs["input_ids"] == model.config.image_token_id
    torch.testing.assert_close(seen[0][image_positions], flat(want))
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


# ----------------------------------------------------------------------------- projector="stock"


def pool_rows(rows: torch.Tensor, grid: tuple[int, int], budget: int) -> torch.Tensor:
    """``(units, H*W, D)`` row-major -> ``F.adaptive_avg_pool2d`` to the target grid."""
    (H, W), (h, w) = grid, flexproj.target_grid(budget, grid)
    units, _, channels = rows.shape
    image = rows.transpose(1, 2).reshape(units, channels, H, W)
    return F.adaptive_avg_pool2d(image, (h, w)).reshape(units, channels, h * w).transpose(1, 2)


@contextmanager
def slot_outputs(model) -> Iterator[list[torch.Tensor]]:
    """What the projector slot returns, one entry per call."""
    seen: list[torch.Tensor] = []
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, out: seen.append(out.detach().clone())
    )
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("budget", [1, 4, 6])
@pytest.mark.parametrize(
    "family",
    ["llava", "llava_siglip", "llava_next", "llava_onevision", "internvl", "qwen2_vl",
     "qwen2_5_vl", "qwen3_vl"],
)  # fmt: skip
def test_pool_after_equals_the_pooled_stock_outputs(family, budget):
    """projector="stock": what the model produces at budget N is the stock projector's
    output (read inside flexproj.disabled) average-pooled on its own output grid here."""
    model, processor = tiny_vlm(family)
    model.eval()
    flexproj.patch(model, processor, projector="stock")
    images = tiny_images(SIZES)
    with flexproj.tokens(budget):
        inputs = processor(text=[prompt(family, 2)], images=images, return_tensors="pt")
    with torch.no_grad():
        if family.startswith("qwen"):
            grids = (inputs["image_grid_thw"][:, 1:] // 2).tolist()  # merged (H/m, W/m)
            with flexproj.disabled(model):
                stock = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_grid_thw"]
                ).pooler_output
            want = [pool_rows(s[None], tuple(g), budget)[0] for s, g in zip(stock, grids)]
            with flexproj.tokens(budget):
                got = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_grid_thw"]
                ).pooler_output
        elif family == "internvl":
            with flexproj.disabled(model):
                stock = image_features(model, inputs)  # (tiles, 4*4, D) after pixel shuffle
            want = [pool_rows(stock, (4, 4), budget)]
            with flexproj.tokens(budget):
                got = [image_features(model, inputs)]
        else:  # LLaVA family: per crop, at the slot (NeXT / OneVision pack afterwards)
            with flexproj.disabled(model), slot_outputs(model) as stock:
                image_features(model, inputs)
            want = [pool_rows(stock[0], (8, 8), budget)]
            with flexproj.tokens(budget), slot_outputs(model) as got:
                image_features(model, inputs)
        with flexproj.tokens(budget):
            model(**inputs)  # and the placeholders match what is produced
    torch.testing.assert_close(flat(got), flat(want), rtol=0, atol=0)
