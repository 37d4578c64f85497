"""Tiny Gemma 3 models for tests and demos, and the real-size bench shape (read through the
registry by :mod:`flexproj.testing`).

``gemma3``: ``Gemma3ForConditionalGeneration``, ``Gemma3Processor`` with the Pillow
``Gemma3ImageProcessorPil``. A SigLIP tower (no CLS) on 64 px images, patch 8: an 8x8 grid
of width 32; the stock projector average-pools it 2x2 to ``mm_tokens_per_image`` = 16
(4x4), then RMSNorm and one linear to the LLM width. A prompt writes ``<start_of_image>``
per image; the processor expands it to ``\\n\\n<start_of_image>`` + 16 ``<image_soft_token>``
+ ``<end_of_image>\\n\\n``. Pan-and-scan is off by default (the real processor's default);
``image_processor={"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}`` cuts wide
images into crops, each with its own image sequence. The Gemma 3 text tower: layer 0
sliding-window (window 8), layer 1 global.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from flexproj.testing.tiny_models import (
    IMAGE_SIZE,
    PATCH,
    TEXT,
    VISION,
    BenchShape,
    Kwargs,
    TinySpec,
    text_config,
)

__all__ = ["BENCH", "TINY"]

_BOI, _EOI, _SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
_HEAD_DIM = TEXT["hidden_size"] // TEXT["num_attention_heads"]  # 16
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _layer_types(layers: int, every: int) -> list[str]:
    """One global layer in every ``every`` (and the last), sliding-window else."""
    return [
        "full_attention" if (i + 1) % every == 0 or i == layers - 1 else "sliding_attention"
        for i in range(layers)
    ]


def _config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": SiglipVisionConfig(
            **VISION, image_size=IMAGE_SIZE, patch_size=PATCH
        ).to_dict(),
        "text_config": Gemma3TextConfig(
            **text_config(
                tok,
                head_dim=_HEAD_DIM,
                query_pre_attn_scalar=_HEAD_DIM,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
            )
        ).to_dict(),
        "mm_tokens_per_image": 16,
        "boi_token_index": tok.convert_tokens_to_ids(_BOI),
        "eoi_token_index": tok.convert_tokens_to_ids(_EOI),
        "image_token_index": tok.convert_tokens_to_ids(_SOFT),
    }


def _fit(config_kwargs: Kwargs, text_overrides: Kwargs, vision_overrides: Kwargs) -> None:
    """Layer types follow the text depth (every second layer global, the last one too)."""
    text = config_kwargs["text_config"]
    if "layer_types" not in text_overrides:
        text["layer_types"] = _layer_types(int(text["num_hidden_layers"]), 2)


def _processor(
    config: Any, tok: PreTrainedTokenizerFast, image_kwargs: Kwargs, proc_kwargs: Kwargs
) -> Gemma3Processor:
    side = int(config.vision_config.image_size)
    image_processor = Gemma3ImageProcessorPil(
        **{"size": {"height": side, "width": side}, **image_kwargs}
    )
    kwargs = {
        "image_seq_length": config.mm_tokens_per_image,
        "chat_template": _CHAT_TEMPLATE,
        **proc_kwargs,
    }
    return Gemma3Processor(image_processor, tok, **kwargs)


def _init(model: Any) -> None:
    """A random projector weight (upstream's init is zeros: every image would project to
    zeros), at the scale of a linear layer's init."""
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.normal_(std=weight.shape[0] ** -0.5)


TINY: dict[str, TinySpec] = {
    "gemma3": TinySpec(
        "gemma3",
        "gemma3",
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        _config,
        _processor,
        placeholder=_BOI,
        named_tokens={
            "boi_token": _BOI,
            "eoi_token": _EOI,
            "image_token": _SOFT,
            "sot_token": "<start_of_turn>",
            "eot_token": "<end_of_turn>",
        },
        fit=_fit,
        init=_init,
    ),
}


def _adjust(vision: Kwargs, text: Kwargs, vision_layers: int, head_dim: int) -> None:
    text["head_dim"] = head_dim
    text["query_pre_attn_scalar"] = head_dim
    text["layer_types"] = _layer_types(int(text["num_hidden_layers"]), 6)  # as Gemma 3's


BENCH: dict[str, BenchShape] = {
    "gemma3": BenchShape(
        "gemma3",
        image=(896, 896),
        native_budget=256,
        vision={
            "image_size": 896,
            "patch_size": 14,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_attention_heads": 16,
        },
        text_kind="qwen2",
        top={"mm_tokens_per_image": 256},
        adjust=_adjust,
        note="Gemma 3: 896 px image, patch 14: 64x64 SigLIP grid (width 1152), 4x4 average "
        "pool to 256 tokens stock; 5 sliding-window layers per global one",
    ),
}
