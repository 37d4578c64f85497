"""Tiny InternVL models for tests and demos, and the real-size bench shape (read through the
registry by :mod:`flexproj.testing`).

``internvl``: ``InternVLForConditionalGeneration``, ``InternVLProcessor``. 64 px tiles,
patch 8: 8x8 grid (+CLS, dropped under ``"default"``), pixel shuffle 0.5 -> 4x4 = 16 tokens
per tile; 1..4 tiles plus a thumbnail when there is more than one tile. Projector sees
``(tiles, 16, 128)``.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from flexproj.testing.tiny_models import (
    IMAGE_SIZE,
    PATCH,
    VISION,
    BenchShape,
    Kwargs,
    TinySpec,
    im_chat_template,
    text_config,
)

__all__ = ["BENCH", "TINY", "ImageOnlyInternVLProcessor"]

_CONTEXT = "<IMG_CONTEXT>"


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` without a video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, **kwargs)


def _internvl_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": InternVLVisionConfig(
            **VISION, image_size=IMAGE_SIZE, patch_size=PATCH
        ).to_dict(),
        "text_config": Qwen2Config(**text_config(tok)).to_dict(),
        "image_token_id": tok.convert_tokens_to_ids(_CONTEXT),
        "downsample_ratio": 0.5,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }


def _internvl_seq_length(config: Any) -> int:
    vision = config.vision_config
    grid = (vision.image_size[0] // vision.patch_size[0]) * (
        vision.image_size[1] // vision.patch_size[1]
    )
    return int(grid * config.downsample_ratio**2)


def _internvl_processor(
    config: Any, tok: PreTrainedTokenizerFast, image_kwargs: Kwargs, proc_kwargs: Kwargs
) -> ImageOnlyInternVLProcessor:
    height, width = config.vision_config.image_size
    image_processor = GotOcr2ImageProcessorPil(
        **{
            "size": {"height": height, "width": width},
            "crop_to_patches": True,
            "min_patches": 1,
            "max_patches": 4,
            **image_kwargs,
        }
    )
    kwargs = {
        "image_seq_length": config.image_seq_length,
        "chat_template": im_chat_template(_CONTEXT + "\n"),
        **proc_kwargs,
    }
    return ImageOnlyInternVLProcessor(image_processor, tok, **kwargs)


def _finish(config: Any, overrides: Kwargs) -> None:
    if "image_seq_length" not in overrides:
        config.image_seq_length = _internvl_seq_length(config)  # tokens per tile, from the geometry


TINY: dict[str, TinySpec] = {
    "internvl": TinySpec(
        "internvl",
        "internvl",
        InternVLConfig,
        InternVLForConditionalGeneration,
        _internvl_config,
        _internvl_processor,
        placeholder=_CONTEXT,
        named_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": _CONTEXT,
            "video_token": "<video>",
        },
        finish=_finish,
    ),
}

BENCH: dict[str, BenchShape] = {
    "internvl": BenchShape(
        "internvl",
        image=(448, 448),
        native_budget=256,
        vision={
            "image_size": [448, 448],
            "patch_size": [14, 14],
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
        },
        text_kind="qwen2",
        image_processor={"max_patches": 1},
        note="InternVL: one 448 px tile, patch 14: 32x32 grid (InternViT-300M width 1024), "
        "256 tokens after pixel shuffle stock; Qwen2 LLM",
    ),
}
