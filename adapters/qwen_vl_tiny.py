"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models for tests and demos, and their real-size
bench shapes (read through the registry by :mod:`flexproj.testing`).

``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``: ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` and their
processors. Patch 8, temporal patch 2, merge 2: one LLM token per 16x16 px after
``smart_resize`` (min 32x32, max 128x128 px), so 64x64 px gives 4x4 = 16 tokens and 64x96 px
4x6 = 24. The merger ``model.model.visual.merger`` sees packed patches ``(sum h*w, 32)``.
Qwen2.5-VL: 32 px windows (2x2 merged units), layer 0 windowed, layer 1 full attention.
Qwen3-VL: deepstack layers ``[0, 1]`` (``visual.deepstack_merger_list``), an 8x8 learned
position grid (interpolated), interleaved M-RoPE.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from flexproj.testing.tiny_models import (
    PATCH,
    TEXT,
    BenchShape,
    Kwargs,
    ProcessorBuilder,
    TinySpec,
    im_chat_template,
    text_config,
)

__all__ = [
    "BENCH",
    "TINY",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen2_5_VLProcessor",
    "ImageOnlyQwen3VLProcessor",
]

_HEAD_DIM = TEXT["hidden_size"] // TEXT["num_attention_heads"]  # 16
_QWEN_MIN_PIXELS = 32 * 32  # >= one merged 16x16 cell; a 64x96 image stays 64x96
_QWEN_MAX_PIXELS = 128 * 128  # at most 8x8 = 64 merged tokens per image
_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
_NAMED = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without a video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, **kwargs)


def _qwen_image_processor(vision: Any, **overrides: Any) -> Qwen2VLImageProcessorPil:
    kwargs = {
        "patch_size": vision.patch_size,
        "merge_size": vision.spatial_merge_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "min_pixels": _QWEN_MIN_PIXELS,
        "max_pixels": _QWEN_MAX_PIXELS,
        **overrides,
    }
    return Qwen2VLImageProcessorPil(**kwargs)


def _qwen_ids(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }


def _mrope_section(head_dim: int, interleaved: bool) -> list[int]:
    """T/H/W rotary split summing to ``head_dim // 2``, in the real checkpoints' proportions.

    Qwen2/2.5-VL: [16, 24, 24] of 64 (here [2, 3, 3] of 8); Qwen3-VL (interleaved):
    [24, 20, 20] of 64 (here [4, 2, 2] of 8).
    """
    half = head_dim // 2
    hw = (5 * half) // 16 if interleaved else (3 * half) // 8
    return [half - 2 * hw, hw, hw]


def _qwen_rope(head_dim: int, interleaved: bool = False) -> dict[str, Any]:
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(head_dim, interleaved),
    }
    return {**rope, "mrope_interleaved": True} if interleaved else rope


def _fit_qwen(config_kwargs: Kwargs, text_overrides: Kwargs, vision_overrides: Kwargs) -> None:
    """Keep a Qwen config consistent after ``text_config`` overrides (in place).

    The vision merger must output the LLM width, and the M-RoPE sections must sum to
    ``head_dim // 2``; both are re-derived unless the caller set them explicitly.
    """
    text, vision = config_kwargs["text_config"], config_kwargs["vision_config"]
    width_key = "hidden_size" if "embed_dim" in vision else "out_hidden_size"  # Qwen2-VL vs 2.5/3
    if width_key not in vision_overrides:
        vision[width_key] = text["hidden_size"]
    if "rope_parameters" not in text_overrides:
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        interleaved = bool(text["rope_parameters"].get("mrope_interleaved"))
        text["rope_parameters"] = _qwen_rope(head_dim, interleaved)


def _qwen2_vl_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": TEXT["hidden_size"],  # merger output = LLM width
            "mlp_ratio": 2,
            "num_heads": 4,
            "patch_size": PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "text_config": text_config(tok, rope_parameters=_qwen_rope(_HEAD_DIM)),
        **_qwen_ids(tok),
    }


#: the Qwen2.5-VL / Qwen3-VL vision tower (Qwen2-VL's names its widths differently)
_QWEN2_5_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 4,
    "out_hidden_size": TEXT["hidden_size"],
    "patch_size": PATCH,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def _qwen2_5_vl_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": {
            **_QWEN2_5_VISION,
            "window_size": 32,  # pixels: 32 // merge 2 // patch 8 = 2x2 merged units per window
            "fullatt_block_indexes": [1],  # layer 0 windowed, layer 1 full
        },
        "text_config": text_config(tok, rope_parameters=_qwen_rope(_HEAD_DIM)),
        **_qwen_ids(tok),
    }


def _qwen3_vl_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": {
            **_QWEN2_5_VISION,
            "num_position_embeddings": 64,  # 8x8 learned grid, bilinearly interpolated
            "deepstack_visual_indexes": [0, 1],
        },
        "text_config": text_config(
            tok,
            head_dim=_HEAD_DIM,
            rope_parameters=_qwen_rope(_HEAD_DIM, interleaved=True),
        ),
        **_qwen_ids(tok),
    }


def _qwen_processor_factory(cls: type[ProcessorMixin]) -> ProcessorBuilder:
    def build(
        config: PreTrainedConfig, tok, image_kwargs: dict, proc_kwargs: dict
    ) -> ProcessorMixin:
        kwargs = {"chat_template": im_chat_template(_PLACEHOLDER), **proc_kwargs}
        return cls(_qwen_image_processor(config.vision_config, **image_kwargs), tok, **kwargs)

    return build


def _qwen_spec(name: str, config_cls: type, model_cls: type, config: Any, proc: type) -> TinySpec:
    return TinySpec(
        name,
        name,
        config_cls,
        model_cls,
        config,
        _qwen_processor_factory(proc),
        placeholder=_PLACEHOLDER,
        named_tokens=_NAMED,
        fit=_fit_qwen,
    )


TINY: dict[str, TinySpec] = {
    "qwen2_vl": _qwen_spec(
        "qwen2_vl",
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        _qwen2_vl_config,
        ImageOnlyQwen2VLProcessor,
    ),
    "qwen2_5_vl": _qwen_spec(
        "qwen2_5_vl",
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        _qwen2_5_vl_config,
        ImageOnlyQwen2_5_VLProcessor,
    ),
    "qwen3_vl": _qwen_spec(
        "qwen3_vl",
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        _qwen3_vl_config,
        ImageOnlyQwen3VLProcessor,
    ),
}

# ----------------------------------------------------------------------------- bench shapes


def _adjust_qwen2_5(vision: Kwargs, text: Kwargs, vision_layers: int, head_dim: int) -> None:
    vision["fullatt_block_indexes"] = [vision_layers - 1] if vision_layers > 1 else []


def _adjust_qwen3(vision: Kwargs, text: Kwargs, vision_layers: int, head_dim: int) -> None:
    vision["deepstack_visual_indexes"] = [0]
    text["head_dim"] = head_dim


_QWEN_448 = {"min_pixels": 56 * 56, "max_pixels": 448 * 448}

BENCH: dict[str, BenchShape] = {
    "qwen2_vl": BenchShape(
        "qwen2_vl",
        image=(448, 448),
        native_budget=256,
        vision={
            "embed_dim": 1280,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        depth_key="depth",
        text_kind="qwen2",
        image_processor=_QWEN_448,
        note="Qwen2-VL: 448x448 image, patch 14: 32x32 patches (width 1280), 256 merged "
        "tokens stock",
    ),
    "qwen2_5_vl": BenchShape(
        "qwen2_5_vl",
        image=(448, 448),
        native_budget=256,
        vision={
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
        },
        depth_key="depth",
        text_kind="qwen2",
        image_processor=_QWEN_448,
        adjust=_adjust_qwen2_5,
        note="Qwen2.5-VL-7B-like: 448x448, patch 14: 32x32 patches (width 1280), window "
        "attention, 256 merged tokens stock",
    ),
    "qwen3_vl": BenchShape(
        "qwen3_vl",
        image=(512, 512),
        native_budget=256,
        vision={
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
        },
        depth_key="depth",
        text_kind="qwen2",
        image_processor={"min_pixels": 64 * 64, "max_pixels": 512 * 512},
        adjust=_adjust_qwen3,
        note="Qwen3-VL: 512x512 image, patch 16: 32x32 patches (width 1152), deepstack, "
        "256 merged tokens stock",
    ),
}
