"""Tiny LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision models for tests and demos, and their
real-size bench shapes (read through the registry by :mod:`flexproj.testing`).

* ``llava``: ``LlavaForConditionalGeneration``, CLIP tower, strategy ``"default"``,
  ``LlavaProcessor``. 64 px image, patch 8: 8x8 grid + CLS; the CLS is dropped, so 64 tokens.
  Projector ``model.model.multi_modal_projector`` sees ``(images, 64, 32)``.
* ``llava_siglip``: as ``llava`` with a SigLIP tower (no CLS) and strategy ``"full"``: 64 tokens.
* ``llava_next``: ``LlavaNextForConditionalGeneration`` (CLIP, ``"default"``),
  ``LlavaNextProcessor``. 64 px crops, pinpoints ``[[64, 64], [64, 128], [128, 64], [128, 128]]``
  (height, width): base image + 1..4 crops of 64 tokens, then unpadding and newline tokens
  (a 64x64 image gives 136 tokens, a 64 wide x 96 high one 172). Projector sees
  ``(crops, 64, 32)``.
* ``llava_onevision``: ``LlavaOnevisionForConditionalGeneration`` (SigLIP, ``"full"``,
  ``anyres_max_9``), ``LlavaOnevisionProcessor`` (``num_image_tokens=64``); same crops and
  counts as ``llava_next``.

``num_additional_image_tokens`` is set to 1 for CLIP towers (as real checkpoints do); the
processor default of 0 would emit one placeholder too few under ``"default"``.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

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

__all__ = ["BENCH", "TINY", "ImageOnlyLlavaOnevisionProcessor"]

_PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]
_IMAGE = "<image>"
_NAMED = {"image_token": _IMAGE}

_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _llava_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": CLIPVisionConfig(
            **VISION, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32
        ).to_dict(),
        "text_config": LlamaConfig(**text_config(tok)).to_dict(),
        "image_token_index": tok.convert_tokens_to_ids(_IMAGE),
        "image_seq_length": (IMAGE_SIZE // PATCH) ** 2,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
    }


def _llava_siglip_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        **_llava_config(tok),
        "vision_config": SiglipVisionConfig(
            **VISION, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False
        ).to_dict(),
        "vision_feature_select_strategy": "full",
    }


def _num_additional_tokens(vision: Any) -> int:
    """CLS count of the tower: CLIP has one, SigLIP none."""
    return 1 if vision.model_type == "clip_vision_model" else 0


def _llava_image_processor(vision: Any, **overrides: Any) -> LlavaImageProcessorPil:
    side = vision.image_size
    kwargs: Kwargs
    if vision.model_type == "clip_vision_model":
        kwargs = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    else:  # SigLIP: plain square resize, [-1, 1] normalisation
        kwargs = {
            "size": {"height": side, "width": side},
            "crop_size": {"height": side, "width": side},
            "do_center_crop": False,
            "image_mean": IMAGENET_STANDARD_MEAN,
            "image_std": IMAGENET_STANDARD_STD,
        }
    return LlavaImageProcessorPil(**{**kwargs, **overrides})


def _llava_processor(
    config: Any, tok: PreTrainedTokenizerFast, image_kwargs: Kwargs, proc_kwargs: Kwargs
) -> LlavaProcessor:
    vision = config.vision_config
    kwargs = {
        "patch_size": vision.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": _num_additional_tokens(vision),
        "chat_template": _LLAVA_CHAT_TEMPLATE,
        **proc_kwargs,
    }
    return LlavaProcessor(_llava_image_processor(vision, **image_kwargs), tok, **kwargs)


# --- LLaVA-NeXT (CLIP, anyres) and LLaVA-OneVision (SigLIP, anyres_max_9)


def _llava_next_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {**_llava_config(tok), "image_grid_pinpoints": [list(p) for p in _PINPOINTS]}


def _llava_next_processor(
    config: Any, tok: PreTrainedTokenizerFast, image_kwargs: Kwargs, proc_kwargs: Kwargs
) -> LlavaNextProcessor:
    vision = config.vision_config
    side = vision.image_size
    image_processor = LlavaNextImageProcessorPil(
        **{
            "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side},
            "image_grid_pinpoints": config.image_grid_pinpoints,
            **image_kwargs,
        }
    )
    kwargs = {
        "patch_size": vision.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": _num_additional_tokens(vision),
        "chat_template": _LLAVA_CHAT_TEMPLATE,
        **proc_kwargs,
    }
    return LlavaNextProcessor(image_processor, tok, **kwargs)


def _llava_onevision_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": SiglipVisionConfig(
            **VISION, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False
        ).to_dict(),
        "text_config": Qwen2Config(**text_config(tok)).to_dict(),
        "image_token_index": tok.convert_tokens_to_ids(_IMAGE),
        "video_token_index": tok.convert_tokens_to_ids("<video>"),
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [list(p) for p in _PINPOINTS],
    }


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without a video processor (no torchvision needed).

    The settings are named parameters, as upstream's: ``save_pretrained`` writes only
    the ``__init__`` parameters it can see, and a reloaded processor needs them."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


def _llava_onevision_processor(
    config: Any, tok: PreTrainedTokenizerFast, image_kwargs: Kwargs, proc_kwargs: Kwargs
) -> ImageOnlyLlavaOnevisionProcessor:
    vision = config.vision_config
    side = vision.image_size
    image_processor = LlavaOnevisionImageProcessorPil(
        **{
            "size": {"height": side, "width": side},
            "image_grid_pinpoints": config.image_grid_pinpoints,
            "image_mean": IMAGENET_STANDARD_MEAN,
            "image_std": IMAGENET_STANDARD_STD,
            **image_kwargs,
        }
    )
    kwargs = {
        "num_image_tokens": (side // vision.patch_size) ** 2 + _num_additional_tokens(vision),
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_aspect_ratio": config.vision_aspect_ratio,
        "chat_template": im_chat_template(_IMAGE + "\n"),
        **proc_kwargs,
    }
    return ImageOnlyLlavaOnevisionProcessor(image_processor, tok, **kwargs)


TINY: dict[str, TinySpec] = {
    "llava": TinySpec(
        "llava",
        "llava",
        LlavaConfig,
        LlavaForConditionalGeneration,
        _llava_config,
        _llava_processor,
        placeholder=_IMAGE,
        named_tokens=_NAMED,
    ),
    "llava_siglip": TinySpec(
        "llava_siglip",
        "llava",
        LlavaConfig,
        LlavaForConditionalGeneration,
        _llava_siglip_config,
        _llava_processor,
        placeholder=_IMAGE,
        named_tokens=_NAMED,
    ),
    "llava_next": TinySpec(
        "llava_next",
        "llava_next",
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        _llava_next_config,
        _llava_next_processor,
        placeholder=_IMAGE,
        named_tokens=_NAMED,
    ),
    "llava_onevision": TinySpec(
        "llava_onevision",
        "llava_onevision",
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        _llava_onevision_config,
        _llava_onevision_processor,
        placeholder=_IMAGE,
        named_tokens={**_NAMED, "video_token": "<video>"},
    ),
}

# ----------------------------------------------------------------------------- bench shapes

_CLIP_L336 = {
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "projection_dim": 768,
}
_SIGLIP_SO400M_384 = {
    "image_size": 384,
    "patch_size": 14,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
}
BENCH: dict[str, BenchShape] = {
    "llava": BenchShape(
        "llava",
        image=(336, 336),
        native_budget=576,
        vision=_CLIP_L336,
        text_kind="llama",
        top={"vision_feature_layer": -1, "image_seq_length": 576},
        note="LLaVA-1.5: CLIP-L/336 (24x24 grid, width 1024), Vicuna-like LLM (MHA)",
    ),
    "llava_next": BenchShape(
        "llava_next",
        image=(336, 336),
        native_budget=576,
        vision=_CLIP_L336,
        text_kind="llama",
        top={"vision_feature_layer": -1, "image_grid_pinpoints": [[336, 336]]},
        note="LLaVA-NeXT: CLIP-L/336, pinpoints [[336,336]]: base image + 1 crop, "
        "newline tokens; budget per crop",
    ),
    "llava_onevision": BenchShape(
        "llava_onevision",
        image=(384, 384),
        native_budget=729,
        vision=_SIGLIP_SO400M_384,
        text_kind="qwen2",
        top={"vision_feature_layer": -1, "image_grid_pinpoints": [[384, 384]]},
        note="LLaVA-OneVision: SigLIP-so400m/384 (27x27, width 1152), pinpoints [[384,384]]: "
        "base + 1 crop; Qwen2 LLM (GQA); budget per crop",
    ),
}
