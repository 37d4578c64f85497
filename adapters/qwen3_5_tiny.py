"""Tiny Qwen3.5 models for tests and demos, and the real-size bench shape (read through the
registry by :mod:`flexproj.testing`).

``qwen3_5``: ``Qwen3_5ForConditionalGeneration`` with ``Qwen3VLProcessor`` (what the
transformers auto table gives ``qwen3_5``). The vision geometry is the tiny Qwen3-VL's:
patch 8, temporal patch 2, merge 2, an 8x8 learned position grid; one LLM token per
16x16 px after ``smart_resize`` (64x64 px: 4x4 = 16 tokens, 64x96 px: 4x6 = 24). No
deepstack. The text model is Qwen3.5's hybrid: layer 0 linear attention (Gated DeltaNet,
the torch fallback on CPU), layer 1 full attention (``full_attention_interval`` 2), partial
rotary 0.5 with interleaved M-RoPE.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast, Qwen3_5Config, Qwen3_5ForConditionalGeneration

from flexproj.adapters.qwen_vl_tiny import (
    _NAMED,
    _PLACEHOLDER,
    _QWEN2_5_VISION,
    ImageOnlyQwen3VLProcessor,
    _fit_qwen,
    _mrope_section,
    _qwen_ids,
    _qwen_processor_factory,
)
from flexproj.testing.tiny_models import TEXT, BenchShape, Kwargs, TinySpec, text_config

__all__ = ["BENCH", "TINY"]

_HEAD_DIM = TEXT["hidden_size"] // TEXT["num_attention_heads"]  # 16
_PARTIAL_ROTARY = 0.5  # the real checkpoints' 0.25 of head_dim 256 is 64; here 8 of 16


def _rope(head_dim: int) -> dict[str, Any]:
    rotary = int(head_dim * _PARTIAL_ROTARY)
    return {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": _PARTIAL_ROTARY,
        "mrope_section": _mrope_section(rotary, interleaved=True),
        "mrope_interleaved": True,
    }


def _layer_types(layers: int, every: int) -> list[str]:
    """One full-attention layer in every ``every`` (and the last), linear attention else."""
    return [
        "full_attention" if (i + 1) % every == 0 or i == layers - 1 else "linear_attention"
        for i in range(layers)
    ]


def _linear_attention(heads: int, head_dim: int) -> dict[str, Any]:
    """Gated DeltaNet sizes: as many key / value heads as attention heads, head_dim wide."""
    return {
        "linear_num_key_heads": heads,
        "linear_num_value_heads": heads,
        "linear_key_head_dim": head_dim,
        "linear_value_head_dim": head_dim,
        "linear_conv_kernel_dim": 4,
    }


def _config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": {**_QWEN2_5_VISION, "num_position_embeddings": 64},
        "text_config": text_config(
            tok,
            head_dim=_HEAD_DIM,
            rope_parameters=_rope(_HEAD_DIM),
            layer_types=["linear_attention", "full_attention"],
            **_linear_attention(TEXT["num_attention_heads"], _HEAD_DIM),
        ),
        **_qwen_ids(tok),
    }


def _fit(config_kwargs: Kwargs, text_overrides: Kwargs, vision_overrides: Kwargs) -> None:
    """Qwen's fit (merger width follows the LLM), then this family's rotary and layer types."""
    _fit_qwen(config_kwargs, text_overrides, vision_overrides)
    text = config_kwargs["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if "rope_parameters" not in text_overrides:
        text["rope_parameters"] = _rope(head_dim)
    if "layer_types" not in text_overrides:
        text["layer_types"] = _layer_types(int(text["num_hidden_layers"]), 2)


TINY: dict[str, TinySpec] = {
    "qwen3_5": TinySpec(
        "qwen3_5",
        "qwen3_5",
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        _config,
        _qwen_processor_factory(ImageOnlyQwen3VLProcessor),
        placeholder=_PLACEHOLDER,
        named_tokens=_NAMED,
        fit=_fit,
    ),
}


def _adjust(vision: Kwargs, text: Kwargs, vision_layers: int, head_dim: int) -> None:
    text["head_dim"] = head_dim
    text.update(_linear_attention(text["num_attention_heads"], head_dim))
    text["layer_types"] = _layer_types(int(text["num_hidden_layers"]), 4)  # as the real ones


BENCH: dict[str, BenchShape] = {
    "qwen3_5": BenchShape(
        "qwen3_5",
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
        adjust=_adjust,
        note="Qwen3.5: 512x512 image, patch 16: 32x32 patches (width 1152), 256 merged "
        "tokens stock; hybrid LLM (3 linear-attention layers per full-attention layer)",
    ),
}
