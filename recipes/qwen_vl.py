"""Qwen-VL recipe: Qwen2-VL, Qwen2.5-VL and Qwen3-VL with a FlexProjector.

Run ``python -m flexproj.recipes.qwen_vl --help`` (or ``flexproj train qwen_vl --help``)::

    flexproj train qwen_vl --model Qwen/Qwen2.5-VL-3B-Instruct --stage align --init distill \\
        --data data.json --output_dir runs/qwen-align --bf16
    flexproj train qwen_vl --model Qwen/Qwen2.5-VL-3B-Instruct --stage finetune --lora \\
        --init runs/qwen-align --data data.json --output_dir runs/qwen-lora --bf16

Family choices:

* **Frozen per stage**: the FlexProjector replaces the 2x2 patch merger (``visual.merger``)
  and pools the patch grid itself (see ``adapters/qwen_vl.py``). ``align`` trains it only;
  ``finetune`` adds the language model and ``lm_head``. The vision blocks stay frozen, and
  so do Qwen3-VL's deepstack mergers: they are stock, pretrained modules whose outputs the
  adapter pools to the same grid, so nothing new needs to be learnt there.
* **Prompt format**: the chat template (with the checkpoint's default system prompt), or
  ``--prompt_format plain``: ChatML, ``<|im_start|>system\\nYou are a helpful
  assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>
  {q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>``. The answer and ``<|im_end|>``
  are the targets.
* **Images**: native resolution; the processor's ``smart_resize`` keeps the aspect ratio
  between ``min_pixels`` and ``max_pixels`` (set them with ``--processor_kwargs
  '{"max_pixels": 802816}'``). No padding.
* **Budgets**: per image, at most N tokens with the aspect ratio kept; an image smaller
  than N keeps its native count (budgets are *capped*, not rejected, so any positive
  schedule is valid). A 448x448 image has 16x16 = 256 merged tokens natively.
* **Distillation** (``--init distill``): the budget is the LLM's context bound, so every
  image keeps its native merged grid and the FlexProjector output is compared with the
  stock merger's output token for token.
* **Defaults**: align lr 1e-3, finetune lr 1e-5 (LoRA 2e-4), cosine, 3% warmup, one epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from flexproj.recipes.data import IMAGE_TAG, Segment
from flexproj.recipes.family import COMMON_TRAINING_DEFAULTS, FamilyRecipe, Messages


class QwenVLRecipe(FamilyRecipe):
    name = "qwen_vl"
    model_classes: ClassVar[dict[str, str]] = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
    }
    tiny_families = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    default_tiny = "qwen2_vl"
    default_system_prompt = "You are a helpful assistant."
    pad_to_square = False
    stage_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "align": {
            **COMMON_TRAINING_DEFAULTS,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 16,
        },
        "finetune": {
            **COMMON_TRAINING_DEFAULTS,
            "learning_rate": 1e-5,
            "per_device_train_batch_size": 8,
        },
    }

    def image_placeholder(self, processor: Any) -> str:
        tok = processor.tokenizer
        start = getattr(processor, "vision_start_token", None) or getattr(
            tok, "vision_start_token", "<|vision_start|>"
        )
        end = getattr(processor, "vision_end_token", None) or getattr(
            tok, "vision_end_token", "<|vision_end|>"
        )
        return f"{start}{processor.image_token}{end}"

    def end_of_turn(self, processor: Any) -> str:
        return "<|im_end|>"

    def plain_segments(self, dialogue: Messages, processor: Any, system: str) -> list[Segment]:
        # Qwen puts the image right before the text: "<image>\n" loses its newline
        dialogue = [(r, t.replace(IMAGE_TAG + "\n", IMAGE_TAG)) for r, t in dialogue]
        return self.chatml_segments(dialogue, processor, system, self.image_placeholder(processor))


RECIPE = QwenVLRecipe()


def main(argv: Sequence[str] | None = None) -> int:
    from flexproj.recipes.trainer import main as run

    return run("qwen_vl", argv, prog="python -m flexproj.recipes.qwen_vl")


if __name__ == "__main__":
    sys.exit(main())
