"""Qwen3.5 (``Qwen3_5ForConditionalGeneration`` / ``Qwen3_5Model``): Qwen3-VL's data flow.

The vision tower is Qwen3-VL's (patch embed, a learned position grid interpolated per
image, 2D rotary, one patch merger ``visual.merger`` folding 2x2 patches into one LLM
token) without deepstack: ``Qwen3_5VisionModel`` returns only ``pooler_output``, so there
is nothing to pool besides the main path. The processor is ``Qwen3VLProcessor`` (the
transformers auto table maps ``qwen3_5`` to it), and ``Qwen3_5Model`` keeps Qwen3-VL's
``get_image_features`` / ``get_video_features`` / ``get_rope_index`` signatures, so the
Qwen-VL adapter's mechanism applies as it is: merger pass-through, pool the per-image patch
grid in ``get_image_features`` (flex) or the merger outputs on the merged grid (stock), and
M-RoPE laid out on the pooled grid (see :mod:`flexproj.adapters.qwen_vl`).

What differs is on the LLM side only: Qwen3.5's text model is a hybrid, three linear
attention layers (Gated DeltaNet, a recurrent state) to one full-attention layer. Fewer
vision tokens shorten both: the KV cache of the full-attention layers and the recurrent
scan of the linear ones.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5Model, Qwen3VLProcessor

from flexproj.adapters.qwen_vl import Qwen3VLAdapter
from flexproj.registry import register_adapter

__all__ = ["Qwen3_5Adapter"]


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3.5: Qwen3-VL's tower and M-RoPE, no deepstack, a hybrid linear-attention LLM."""

    model_types = ("qwen3_5",)
    model_classes: ClassVar[tuple[type, ...]] = (Qwen3_5ForConditionalGeneration, Qwen3_5Model)
    processor_classes: ClassVar[tuple[type, ...]] = (Qwen3VLProcessor,)
    base_class: ClassVar[type] = Qwen3_5Model
    recipe = "qwen3_5"
    tiny = "flexproj.adapters.qwen3_5_tiny"


register_adapter(Qwen3_5Adapter())
