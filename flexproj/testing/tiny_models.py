"""Tiny, randomly initialised VLMs with real processors, built entirely offline: the generic
part. Each family declares its own tiny variants (a :class:`TinySpec` each: config, model
class, processor builder, prompt placeholder) and its real-size bench shape (a
:class:`BenchShape`) in a module beside its adapter, ``flexproj.adapters.<family>_tiny``,
named by the adapter's ``tiny`` attribute; this module finds them through
:mod:`flexproj.registry` and never imports a family module by name.

Every family flexproj supports gets a model of the *real* transformers class (so adapters
patch exactly the modules they will meet in the wild) and the family's *real* processor
class, at sizes that make a CPU forward pass take milliseconds. Each family module's
docstring gives its geometry.

Shared sizes: text towers hidden 64, 2 layers, 4 heads, 2 KV heads (head_dim 16),
intermediate 128, vocabulary = the shared word-level tokenizer (:func:`tiny_tokenizer`).
Vision towers: width 32, 2 layers, 4 heads; 64 px images / crops / tiles, patch 8.

Offline construction notes (transformers 5.23):

* The tokenizer is a ``tokenizers`` WordLevel model (lower-casing normaliser, ``Whitespace``
  pre-tokenizer, so ``"USER:"`` is ``user`` ``:``) wrapped by ``PreTrainedTokenizerFast``.
  All families share one vocabulary; only the *named* special tokens (``tokenizer.image_token``
  and friends, which the processors read; :attr:`TinySpec.named_tokens`) differ per family.
* Image processors use the Pillow backend (``*ImageProcessorPil``); there is no torchvision.
* Processors that also take a video processor (OneVision, Qwen*, InternVL) cannot be built
  without torchvision. ``ProcessorMixin.get_attributes()`` derives a processor's
  sub-processors from its ``__init__`` signature, so the family modules define image-only
  subclasses whose ``__init__`` lacks ``video_processor`` (e.g.
  ``flexproj.adapters.qwen_vl_tiny.ImageOnlyQwen2VLProcessor``); they are ``isinstance`` of
  the real class and behave identically for images.

Nothing here touches the Hugging Face Hub.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from flexproj.registry import get_adapter, load_adapters, supported_models

__all__ = [
    "FAMILIES",
    "IMAGE_PLACEHOLDER",
    "IMAGE_SIZE",
    "PATCH",
    "TEXT",
    "VISION",
    "BenchShape",
    "Kwargs",
    "ProcessorBuilder",
    "TinySpec",
    "bench_shapes",
    "im_chat_template",
    "text_config",
    "tiny_images",
    "tiny_spec",
    "tiny_specs",
    "tiny_tokenizer",
    "tiny_vlm",
    "token_ids",
]

# ----------------------------------------------------------------------------- tokenizer

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"

# The shared vocabulary starts with these (ids 0..14, identical for every family): the
# special tokens of the built-in families. A family whose named tokens are not among them
# gets them appended after these, in its own tokenizer only.
_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD, UNK, BOS, EOS,
    "<image>", "<video>",                                   # LLaVA family
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",  # Qwen-VL
    "<|im_start|>", "<|im_end|>",                           # Qwen / InternVL chat
    "<img>", "</img>", "<IMG_CONTEXT>",                      # InternVL
)  # fmt: skip

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

    ``family`` (a tiny variant, see :data:`FAMILIES`) sets the *named* special tokens its
    processor reads (``image_token``, ``video_token``, InternVL's ``start_image_token`` ...);
    the vocabulary and ids do not depend on it (unless the family names a token the shared
    vocabulary lacks: it then follows the shared special tokens).
    """
    named = dict(tiny_spec(family).named_tokens) if family is not None else {}
    specials = tuple(dict.fromkeys((*_SPECIAL_TOKENS, *named.values())))
    words = list(_WORDS) + [w.lower() for w in extra_words]
    vocab: dict[str, int] = {}
    for token in (*specials, *words):
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(cleanup=True)  # join with spaces, no space before "?"
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

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


# ----------------------------------------------------------------------------- family specs

Kwargs = dict[str, Any]
# (built config, tokenizer, image-processor kwargs, processor kwargs) -> processor. The config
# is typed Any: transformers types sub-configs as ``dict | PreTrainedConfig | None``.
ProcessorBuilder = Callable[[Any, PreTrainedTokenizerFast, Kwargs, Kwargs], ProcessorMixin]

#: vision tower defaults (width 32, 2 layers, 4 heads)
VISION: Mapping[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
#: text tower defaults (hidden 64, 2 layers, 4 heads, 2 KV heads: head_dim 16)
TEXT: Mapping[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
IMAGE_SIZE = 64  # LLaVA image / LLaVA-NeXT & OneVision crop / InternVL tile side, pixels
PATCH = 8


def token_ids(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The pad / bos / eos ids of ``tok`` (for text configs and the generation config)."""
    return {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def text_config(tok: PreTrainedTokenizerFast, **extra: Any) -> dict[str, Any]:
    """Text-tower kwargs: :data:`TEXT`, the tokenizer's vocabulary and ids, then ``extra``."""
    return {**TEXT, "vocab_size": len(tok), **token_ids(tok), **extra}


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


def im_chat_template(image: str) -> str:
    """A minimal ``<|im_start|>`` chat template writing ``image`` for each image item
    (``content`` may be a string or a list of ``{"type": "text"|"image"}``)."""
    return _IM_CHAT_TEMPLATE.replace("IMAGE", image)


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """How to build one tiny variant (declared by its family's ``<family>_tiny`` module)."""

    name: str  # the tiny_vlm name, e.g. "llava_siglip"
    model_type: str  # config.model_type of the model it builds
    config_cls: type[PreTrainedConfig]
    model_cls: type[PreTrainedModel]
    config: Callable[[PreTrainedTokenizerFast], Kwargs]  # tokenizer -> default config kwargs
    processor: ProcessorBuilder  # (built config, tokenizer, image kwargs, processor kwargs)
    placeholder: str  # what a prompt writes for one image (the processor expands it)
    named_tokens: Mapping[str, str]  # tokenizer.image_token & co (what the processor reads)
    #: keeps the config consistent after sub-config overrides:
    #: (config kwargs, text_config overrides, vision_config overrides), in place
    fit: Callable[[Kwargs, Kwargs, Kwargs], None] | None = None
    #: sets derived fields on the built config: (config, top-level overrides)
    finish: Callable[[Any, Kwargs], None] | None = None
    #: gives the built model weights a fresh init leaves degenerate (in place, seeded):
    #: Gemma 3 starts its projector at zeros, so every image would read as zeros
    init: Callable[[PreTrainedModel], None] | None = None


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """One family at realistic widths and real patch grids (``tiny_vlm`` overrides), for
    ``flexproj bench e2e`` and ``bench train``; declared by the family's ``_tiny`` module."""

    family: str  # tiny_vlm name == config.model_type
    image: tuple[int, int]  # (width, height) of the one image per prompt, pixels
    native_budget: int  # the budget that reproduces the stock count per unit
    vision: Mapping[str, Any]  # vision_config overrides (width, grid); depth is added
    text_kind: str  # "llama" (MHA, Vicuna-like) or "qwen2" (GQA 4 query heads per KV head)
    top: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # top-level overrides
    image_processor: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    depth_key: str = "num_hidden_layers"
    #: family-specific settings that follow the depth: (vision, text, vision_layers,
    #: head_dim) -> None, in place
    adjust: Callable[[Kwargs, Kwargs, int, int], None] | None = None

    def overrides(
        self, *, text_hidden: int, text_layers: int, vision_layers: int, quick: bool
    ) -> dict[str, Any]:
        vision = dict(self.vision)
        if quick:  # same grid, tiny widths
            for key in ("hidden_size", "embed_dim"):
                if key in vision:
                    vision[key] = 32
            for key in ("intermediate_size",):
                if key in vision:
                    vision[key] = 64
            vision["num_heads" if "num_heads" in vision else "num_attention_heads"] = 4
            text_hidden = 64
        vision[self.depth_key] = vision_layers
        head_dim = 16 if quick else 128
        heads = max(1, text_hidden // head_dim)
        kv_heads = heads if self.text_kind == "llama" else max(1, heads // 4)
        text = {
            "hidden_size": text_hidden,
            "intermediate_size": round(text_hidden * 2.6875 / 64) * 64,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
        }
        if self.adjust is not None:
            self.adjust(vision, text, vision_layers, head_dim)
        out: dict[str, Any] = {**self.top, "vision_config": vision, "text_config": text}
        if self.image_processor:
            out["image_processor"] = dict(self.image_processor)
        return out


# ----------------------------------------------------------------------------- the registry


def _family_module(model_type: str) -> Any | None:
    """The ``tiny`` module the registered adapter of ``model_type`` names (or None)."""
    name = get_adapter(model_type).tiny
    return importlib.import_module(name) if name else None


def _modules(models: Sequence[str]) -> list[Any]:
    out: dict[str, Any] = {}
    for model_type in models:
        module = _family_module(model_type)
        if module is not None:
            out.setdefault(module.__name__, module)
    return list(out.values())


def tiny_specs() -> dict[str, TinySpec]:
    """Every tiny variant of every family that loads here, by name."""
    return {
        name: spec
        for module in _modules(list(load_adapters()))
        for name, spec in module.TINY.items()
    }


def bench_shapes() -> dict[str, BenchShape]:
    """The real-size bench shape of every family that declares one, by ``model_type``."""
    return {
        name: shape
        for module in _modules(list(load_adapters()))
        for name, shape in getattr(module, "BENCH", {}).items()
    }


def tiny_spec(name: str) -> TinySpec:
    """The tiny variant ``name``, loading only its family when ``name`` starts with one of
    the registered model types (``llava_siglip``: the ``llava`` family), else every family."""
    models = supported_models()
    owners = sorted((m for m in models if name == m or name.startswith(m + "_")), key=len)
    for model_type in reversed(owners):  # the longest model type first
        module = _family_module(model_type)
        if module is not None and name in module.TINY:
            spec: TinySpec = module.TINY[name]
            return spec
    specs = tiny_specs()
    if name not in specs:
        raise ValueError(f"unknown tiny VLM family {name!r}; expected one of {', '.join(specs)}")
    return specs[name]


FAMILIES: tuple[str, ...]  # (computed on first read: module __getattr__ below)
IMAGE_PLACEHOLDER: dict[str, str]


def __getattr__(name: str) -> Any:
    """``FAMILIES`` (every tiny variant's name) and ``IMAGE_PLACEHOLDER`` (name -> what a
    prompt writes for one image), computed from the registered families when first read."""
    if name == "FAMILIES":
        return tuple(tiny_specs())
    if name == "IMAGE_PLACEHOLDER":
        return {key: spec.placeholder for key, spec in tiny_specs().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- public builder


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
    spec = tiny_spec(family)

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
    if spec.fit is not None:
        spec.fit(config_kwargs, sub_overrides["text_config"], sub_overrides["vision_config"])
    unknown = sorted(set(overrides) - _config_keys(spec.config_cls))
    if unknown:
        raise ValueError(
            f"tiny_vlm({family!r}): unknown override(s) {unknown}; pass fields of "
            f"{spec.config_cls.__name__}, vision_config={{...}}, text_config={{...}}, "
            "image_processor={...}, processor={...} or extra_words=[...]"
        )
    config_kwargs.update(overrides)

    config = spec.config_cls(**config_kwargs)
    if spec.finish is not None:
        spec.finish(config, overrides)

    torch.manual_seed(seed)
    model = spec.model_cls(config)
    if spec.init is not None:
        spec.init(model)
    model.float().eval()
    for name, value in token_ids(tok).items():
        setattr(model.generation_config, name, value)

    processor = spec.processor(config, tok, image_kwargs, proc_kwargs)
    return model, processor
