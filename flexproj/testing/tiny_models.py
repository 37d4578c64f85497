"""Tiny, randomly initialised VLMs with real processors, built entirely offline.

Every family flexproj supports gets a model of the *real* transformers class (so adapters
patch exactly the modules they will meet in the wild) and the family's *real* processor
class, at sizes that make a CPU forward pass take milliseconds. Default geometry:

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
* ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``: ``Qwen2VLForConditionalGeneration`` /
  ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` and their
  processors. Patch 8, temporal patch 2, merge 2: one LLM token per 16x16 px after
  ``smart_resize`` (min 32x32, max 128x128 px), so 64x64 px gives 4x4 = 16 tokens and 64x96 px
  4x6 = 24. The merger ``model.model.visual.merger`` sees packed patches ``(sum h*w, 32)``.
  Qwen2.5-VL: 32 px windows (2x2 merged units), layer 0 windowed, layer 1 full attention.
  Qwen3-VL: deepstack layers ``[0, 1]`` (``visual.deepstack_merger_list``), an 8x8 learned
  position grid (interpolated), interleaved M-RoPE.
* ``internvl``: ``InternVLForConditionalGeneration``, ``InternVLProcessor``. 64 px tiles,
  patch 8: 8x8 grid (+CLS, dropped under ``"default"``), pixel shuffle 0.5 -> 4x4 = 16 tokens
  per tile; 1..4 tiles plus a thumbnail when there is more than one tile. Projector sees
  ``(tiles, 16, 128)``.

Text towers: hidden 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), intermediate 128,
vocabulary = the shared word-level tokenizer (:func:`tiny_tokenizer`). Vision towers: width
32, 2 layers, 4 heads.

Offline construction notes (transformers 5.23):

* The tokenizer is a ``tokenizers`` WordLevel model (lower-casing normaliser, ``Whitespace``
  pre-tokenizer, so ``"USER:"`` is ``user`` ``:``) wrapped by ``PreTrainedTokenizerFast``.
  All families share one vocabulary; only the *named* special tokens (``tokenizer.image_token``
  and friends, which the processors read) differ per family.
* Image processors use the Pillow backend (``*ImageProcessorPil``); there is no torchvision.
* Processors that also take a video processor (OneVision, Qwen*, InternVL) cannot be built
  without torchvision. ``ProcessorMixin.get_attributes()`` derives a processor's
  sub-processors from its ``__init__`` signature, so this module defines image-only
  subclasses whose ``__init__`` lacks ``video_processor`` (e.g. :class:`ImageOnlyQwen2VLProcessor`);
  they are ``isinstance`` of the real class and behave identically for images.
* ``num_additional_image_tokens`` is set to 1 for CLIP towers (as real checkpoints do);
  the processor default of 0 would emit one placeholder too few under ``"default"``.

Nothing here touches the Hugging Face Hub.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
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
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

__all__ = [
    "FAMILIES",
    "IMAGE_PLACEHOLDER",
    "ImageOnlyInternVLProcessor",
    "ImageOnlyLlavaOnevisionProcessor",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen2_5_VLProcessor",
    "ImageOnlyQwen3VLProcessor",
    "tiny_images",
    "tiny_tokenizer",
    "tiny_vlm",
]

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_siglip",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
)

# What a caller writes in the prompt for one image, per family (the processor expands it).
IMAGE_PLACEHOLDER: dict[str, str] = {
    "llava": "<image>",
    "llava_siglip": "<image>",
    "llava_next": "<image>",
    "llava_onevision": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>",
}

# ----------------------------------------------------------------------------- tokenizer

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"

# Special tokens of every family, in vocabulary order (ids 0..len-1, identical for all).
_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD, UNK, BOS, EOS,
    "<image>", "<video>",                                   # LLaVA family
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",  # Qwen-VL
    "<|im_start|>", "<|im_end|>",                           # Qwen / InternVL chat
    "<img>", "</img>", "<IMG_CONTEXT>",                      # InternVL
)  # fmt: skip

# Named special tokens the processors look up on the tokenizer (``tokenizer.image_token`` ...).
_FAMILY_NAMED_TOKENS: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "llava_siglip": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    "qwen2_vl": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    "internvl": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
}
_FAMILY_NAMED_TOKENS["qwen2_5_vl"] = _FAMILY_NAMED_TOKENS["qwen2_vl"]
_FAMILY_NAMED_TOKENS["qwen3_vl"] = _FAMILY_NAMED_TOKENS["qwen2_vl"]

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()

_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(  # de-duplicate, keep order
        [
            # roles and chat scaffolding
            "user", "assistant", "system", "human", "gpt",
            # punctuation (the Whitespace pre-tokenizer splits these off words)
            "?", ".", ",", ":", "!", "'", "-", "(", ")",
            # colours and shapes
            "red", "green", "blue", "yellow", "white", "black", "purple", "orange", "gray", "grey",
            "brown", "pink",
            "circle", "square", "triangle", "rectangle", "star", "shape", "shapes", "object",
            "objects",
            # numbers
            *_NUMBER_WORDS, *[str(d) for d in range(10)],
            # question / answer words
            "what", "where", "which", "who", "how", "many", "much", "why", "when",
            "is", "are", "was", "were", "be", "do", "does", "there", "here", "it", "this",
            "that", "these", "those", "they", "you", "i", "we",
            "the", "a", "an", "of", "in", "on", "at", "to", "and", "or", "with", "for", "by",
            "from", "not", "no", "yes", "than", "as",
            "left", "right", "top", "bottom", "center", "middle", "side", "above", "below",
            "next", "corner", "upper", "lower", "big", "small", "large", "larger", "smaller",
            "color", "colour", "colors", "count", "number", "image", "picture", "photo",
            "question", "answer", "describe", "see", "show", "shows", "contains", "please",
            "only", "one", "word", "short", "background", "foreground", "frame", "video",
        ]
    )
)  # fmt: skip


def tiny_tokenizer(
    extra_words: Sequence[str] = (), *, family: str | None = None
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer shared by all tiny families.

    The vocabulary is ``_SPECIAL_TOKENS`` (ids ``0..14``: ``<pad> <unk> <s> </s> <image>
    <video> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|> <|im_start|>
    <|im_end|> <img> </img> <IMG_CONTEXT>``), then a fixed list of English words, digits and
    punctuation, then ``extra_words`` (lower-cased; duplicates ignored). Text is lower-cased
    and split on whitespace and punctuation; unknown words map to ``<unk>``. No BOS/EOS is
    added automatically. Padding defaults to the left (as generation wants).

    ``family`` sets the *named* special tokens its processor reads (``image_token``,
    ``video_token``, InternVL's ``start_image_token`` ...); the vocabulary and ids do not
    depend on it.
    """
    if family is not None:
        _check_family(family)
    words = list(_WORDS) + [w.lower() for w in extra_words]
    vocab: dict[str, int] = {}
    for token in (*_SPECIAL_TOKENS, *words):
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(cleanup=True)  # join with spaces, no space before "?"
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS]
    )

    named = dict(_FAMILY_NAMED_TOKENS.get(family, {})) if family is not None else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=named,
        padding_side="left",
        model_max_length=4096,
    )


# ----------------------------------------------------------------------------- images


def tiny_images(
    sizes: Sequence[tuple[int, int]] = ((64, 64), (64, 96)), seed: int = 0
) -> list[Image.Image]:
    """Random RGB images, one per ``(width, height)`` in ``sizes``, reproducible by ``seed``."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), mode="RGB")
        for w, h in sizes
    ]


# ----------------------------------------------------------------------------- processors
# transformers derives a processor's sub-processors from its ``__init__`` signature
# (``ProcessorMixin.get_attributes``). Building a processor with a ``video_processor``
# slot needs ``VideoProcessorMixin``, which does not import without torchvision. These
# subclasses drop that slot; everything else is the real class.


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without a video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, **kwargs)


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


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` without a video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, **kwargs)


# ----------------------------------------------------------------------------- chat templates
# Minimal Jinja templates; ``content`` may be a string or a list of {"type": "text"|"image"}.

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

_IM_CHAT_TEMPLATE = (  # Qwen / InternVL style; IMAGE is substituted per family
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}IMAGE{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _im_chat_template(image: str) -> str:
    return _IM_CHAT_TEMPLATE.replace("IMAGE", image)


# ----------------------------------------------------------------------------- configs

Kwargs = dict[str, Any]
# (built config, tokenizer, image-processor kwargs, processor kwargs) -> processor. The config
# is typed Any: transformers types sub-configs as ``dict | PreTrainedConfig | None``.
ProcessorBuilder = Callable[[Any, PreTrainedTokenizerFast, Kwargs, Kwargs], ProcessorMixin]

_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
_HEAD_DIM = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]  # 16
_IMAGE_SIZE = 64  # LLaVA image / LLaVA-NeXT & OneVision crop / InternVL tile side, pixels
_PATCH = 8
_PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]
_QWEN_MIN_PIXELS = 32 * 32  # >= one merged 16x16 cell; a 64x96 image stays 64x96
_QWEN_MAX_PIXELS = 128 * 128  # at most 8x8 = 64 merged tokens per image


def _token_ids(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def _text(tok: PreTrainedTokenizerFast, **extra: Any) -> dict[str, Any]:
    return {**_TEXT, "vocab_size": len(tok), **_token_ids(tok), **extra}


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


@dataclasses.dataclass
class _Spec:
    """How to build one family: config class + default kwargs, model class, processor factory."""

    config_cls: type[PreTrainedConfig]
    model_cls: type[PreTrainedModel]
    config: Callable[[PreTrainedTokenizerFast], Kwargs]  # tokenizer -> default config kwargs
    processor: ProcessorBuilder  # (built config, tokenizer, image kwargs, processor kwargs)


# --- LLaVA (CLIP, "default") and LLaVA with SigLIP ("full")


def _llava_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": CLIPVisionConfig(
            **_VISION, image_size=_IMAGE_SIZE, patch_size=_PATCH, projection_dim=32
        ).to_dict(),
        "text_config": LlamaConfig(**_text(tok)).to_dict(),
        "image_token_index": tok.convert_tokens_to_ids("<image>"),
        "image_seq_length": (_IMAGE_SIZE // _PATCH) ** 2,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
    }


def _llava_siglip_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        **_llava_config(tok),
        "vision_config": SiglipVisionConfig(
            **_VISION, image_size=_IMAGE_SIZE, patch_size=_PATCH, vision_use_head=False
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
            **_VISION, image_size=_IMAGE_SIZE, patch_size=_PATCH, vision_use_head=False
        ).to_dict(),
        "text_config": Qwen2Config(**_text(tok)).to_dict(),
        "image_token_index": tok.convert_tokens_to_ids("<image>"),
        "video_token_index": tok.convert_tokens_to_ids("<video>"),
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [list(p) for p in _PINPOINTS],
    }


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
        "chat_template": _im_chat_template("<image>\n"),
        **proc_kwargs,
    }
    return ImageOnlyLlavaOnevisionProcessor(image_processor, tok, **kwargs)


# --- Qwen2-VL / Qwen2.5-VL / Qwen3-VL


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
            "hidden_size": _TEXT["hidden_size"],  # merger output = LLM width
            "mlp_ratio": 2,
            "num_heads": 4,
            "patch_size": _PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "text_config": _text(tok, rope_parameters=_qwen_rope(_HEAD_DIM)),
        **_qwen_ids(tok),
    }


def _qwen2_5_vl_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": _TEXT["hidden_size"],
            "patch_size": _PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 32,  # pixels: 32 // merge 2 // patch 8 = 2x2 merged units per window
            "fullatt_block_indexes": [1],  # layer 0 windowed, layer 1 full
        },
        "text_config": _text(tok, rope_parameters=_qwen_rope(_HEAD_DIM)),
        **_qwen_ids(tok),
    }


def _qwen3_vl_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": _TEXT["hidden_size"],
            "patch_size": _PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,  # 8x8 learned grid, bilinearly interpolated
            "deepstack_visual_indexes": [0, 1],
        },
        "text_config": _text(
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
        kwargs = {"chat_template": _im_chat_template(IMAGE_PLACEHOLDER["qwen2_vl"]), **proc_kwargs}
        return cls(_qwen_image_processor(config.vision_config, **image_kwargs), tok, **kwargs)

    return build


# --- InternVL


def _internvl_config(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vision_config": InternVLVisionConfig(
            **_VISION, image_size=_IMAGE_SIZE, patch_size=_PATCH
        ).to_dict(),
        "text_config": Qwen2Config(**_text(tok)).to_dict(),
        "image_token_id": tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
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
        "chat_template": _im_chat_template("<IMG_CONTEXT>\n"),
        **proc_kwargs,
    }
    return ImageOnlyInternVLProcessor(image_processor, tok, **kwargs)


_SPECS: dict[str, _Spec] = {
    "llava": _Spec(LlavaConfig, LlavaForConditionalGeneration, _llava_config, _llava_processor),
    "llava_siglip": _Spec(
        LlavaConfig, LlavaForConditionalGeneration, _llava_siglip_config, _llava_processor
    ),
    "llava_next": _Spec(
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        _llava_next_config,
        _llava_next_processor,
    ),
    "llava_onevision": _Spec(
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        _llava_onevision_config,
        _llava_onevision_processor,
    ),
    "qwen2_vl": _Spec(
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        _qwen2_vl_config,
        _qwen_processor_factory(ImageOnlyQwen2VLProcessor),
    ),
    "qwen2_5_vl": _Spec(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        _qwen2_5_vl_config,
        _qwen_processor_factory(ImageOnlyQwen2_5_VLProcessor),
    ),
    "qwen3_vl": _Spec(
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        _qwen3_vl_config,
        _qwen_processor_factory(ImageOnlyQwen3VLProcessor),
    ),
    "internvl": _Spec(
        InternVLConfig, InternVLForConditionalGeneration, _internvl_config, _internvl_processor
    ),
}


# ----------------------------------------------------------------------------- public builder


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(
            f"unknown tiny VLM family {family!r}; expected one of {', '.join(FAMILIES)}"
        )


def _config_keys(config_cls: type[PreTrainedConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)} | set(
        getattr(config_cls, "attribute_map", {})
    )


def _as_dict(sub: Any) -> dict[str, Any]:
    return dict(sub.to_dict() if isinstance(sub, PreTrainedConfig) else sub)


def tiny_vlm(
    family: str, *, seed: int = 0, **overrides: Any
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build ``(model, processor)`` for ``family`` (one of :data:`FAMILIES`), offline.

    The model is the real transformers class, randomly initialised after
    ``torch.manual_seed(seed)`` (same seed, same weights), fp32, in eval mode, with the
    tokenizer's ids (image/video/vision-start/end, pad, bos, eos) in its config and
    generation config. The processor is the family's real processor class (an image-only
    subclass where the real one also wants a video processor), built from the *final*
    config so that it emits exactly as many image placeholders as the stock model produces.

    Accepted ``overrides``:

    * any top-level field of the family's config class, e.g.
      ``vision_feature_select_strategy="full"``, ``vision_feature_layer=-1``,
      ``image_grid_pinpoints=[[64, 64]]``, ``image_seq_length=9`` (InternVL: also the
      processor's per-tile count; default derived from the tile grid and
      ``downsample_ratio``), ``downsample_ratio``, ``vision_aspect_ratio``;
    * ``vision_config={...}`` / ``text_config={...}``: fields merged into the sub-configs
      (e.g. ``text_config={"num_hidden_layers": 1}``, ``vision_config={"image_size": 32}``;
      the image processor follows the vision geometry);
    * ``image_processor={...}``: kwargs for the image processor (e.g. Qwen
      ``{"max_pixels": 64 * 64}``, InternVL ``{"max_patches": 6}``);
    * ``processor={...}``: kwargs for the processor (e.g. ``{"num_additional_image_tokens": 0}``
      to reproduce the stock off-by-one, or ``{"chat_template": None}``);
    * ``extra_words=[...]``: words appended to the tokenizer vocabulary.

    Anything else raises ``ValueError``.
    """
    _check_family(family)
    spec = _SPECS[family]

    overrides = dict(overrides)
    tok = tiny_tokenizer(overrides.pop("extra_words", ()), family=family)
    image_kwargs = dict(overrides.pop("image_processor", None) or {})
    proc_kwargs = dict(overrides.pop("processor", None) or {})

    config_kwargs = spec.config(tok)
    sub_overrides = {
        k: _as_dict(overrides.pop(k, None) or {}) for k in ("vision_config", "text_config")
    }
    for key, sub in sub_overrides.items():
        config_kwargs[key] = {**_as_dict(config_kwargs[key]), **sub}
    if family.startswith("qwen"):
        _fit_qwen(config_kwargs, sub_overrides["text_config"], sub_overrides["vision_config"])
    unknown = sorted(set(overrides) - _config_keys(spec.config_cls))
    if unknown:
        raise ValueError(
            f"tiny_vlm({family!r}): unknown override(s) {unknown}; pass fields of "
            f"{spec.config_cls.__name__}, vision_config={{...}}, text_config={{...}}, "
            "image_processor={...}, processor={...} or extra_words=[...]"
        )
    config_kwargs.update(overrides)

    config = spec.config_cls(**config_kwargs)
    if family == "internvl" and "image_seq_length" not in overrides:
        config.image_seq_length = _internvl_seq_length(config)  # tokens per tile, from the geometry

    torch.manual_seed(seed)
    model = spec.model_cls(config)
    model.float().eval()
    for name, value in _token_ids(tok).items():
        setattr(model.generation_config, name, value)

    processor = spec.processor(config, tok, image_kwargs, proc_kwargs)
    return model, processor
