"""Tiny SmolVLM models for tests and demos, and the real-size bench shape (read through the
registry by :mod:`flexproj.testing`).

``smolvlm``: ``SmolVLMForConditionalGeneration``, ``SmolVLMProcessor`` with the Pillow
``SmolVLMImageProcessorPil``. 64 px tiles, patch 8: an 8x8 grid of width 32 per tile, pixel
shuffle scale 2 -> 4x4 = 16 tokens per tile. Images are resized to a longest edge of 128 px
and cut into up to 2x2 tiles, plus the global view (a 64x96 image: 2x2 tiles + global = 5
tiles, 80 tokens). Llama text tower. The tokenizer knows the processor's markers
(``<fake_token_around_image>``, ``<global-img>``, ``<row_i_col_j>``) as special tokens.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    LlamaConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
    SmolVLMVisionConfig,
)

from flexproj.testing.tiny_models import (
    IMAGE_SIZE,
    PATCH,
    VISION,
    BenchShape,
    Kwargs,
    TinySpec,
    text_config,
)

__all__ = ["BENCH", "TINY", "ImageOnlySmolVLMProcessor"]

_MAX_TILES_PER_SIDE = 2
_NAMED = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
    **{
        f"row_{r}_col_{c}_token": f"<row_{r}_col_{c}>"
        for r in range(1, _MAX_TILES_PER_SIDE + 1)
        for c in range(1, _MAX_TILES_PER_SIDE + 1)
    },
}


#: SmolVLM-Instruct's template (``User:<image>...<end_of_utterance>\nAssistant:``)
_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """``SmolVLMProcessor`` without a video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):  # type: ignore[override]
        """Upstream's, minus the video frame defaults it reads from the video processor."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


def _config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": SmolVLMVisionConfig(
            **VISION, image_size=IMAGE_SIZE, patch_size=PATCH
        ).to_dict(),
        "text_config": LlamaConfig(**text_config(tok)).to_dict(),
        "image_token_id": tok.convert_tokens_to_ids("<image>"),
        "scale_factor": 2,
    }


def _processor(
    config: Any, tok: PreTrainedTokenizerFast, image_kwargs: Kwargs, proc_kwargs: Kwargs
) -> ImageOnlySmolVLMProcessor:
    tile = int(config.vision_config.image_size)
    image_processor = SmolVLMImageProcessorPil(
        **{
            "size": {"longest_edge": _MAX_TILES_PER_SIDE * tile},
            "max_image_size": {"longest_edge": tile},
            **image_kwargs,
        }
    )
    side = tile // int(config.vision_config.patch_size) // int(config.scale_factor)
    kwargs = {
        "image_seq_len": side * side,
        "chat_template": _CHAT_TEMPLATE,
        **proc_kwargs,
    }
    return ImageOnlySmolVLMProcessor(image_processor, tok, **kwargs)


TINY: dict[str, TinySpec] = {
    "smolvlm": TinySpec(
        "smolvlm",
        "smolvlm",
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        _config,
        _processor,
        placeholder="<image>",
        named_tokens=_NAMED,
    ),
}

BENCH: dict[str, BenchShape] = {
    "smolvlm": BenchShape(
        "smolvlm",
        image=(512, 512),
        native_budget=64,
        vision={
            "image_size": 512,
            "patch_size": 16,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
        },
        text_kind="llama",
        top={"scale_factor": 4},
        image_processor={"size": {"longest_edge": 512}, "max_image_size": {"longest_edge": 512}},
        note="SmolVLM-256M/500M: one 512 px tile, patch 16: 32x32 grid (width 768), pixel "
        "shuffle 4 to 64 tokens stock; Llama LLM",
    ),
}
