"""LLaVA recipe: LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision with a FlexProjector.

Run ``python -m flexproj.recipes.llava --help`` (or ``flexproj train llava --help``)::

    # stage 1: projector only (vision tower + LLM frozen), warm-started from the stock projector
    flexproj train llava --model llava-hf/llava-1.5-7b-hf --stage align --init distill \\
        --data blip_laion_cc_sbu_558k.json --image_folder images/ --output_dir runs/align
    # stage 2: projector + LLM (full; add --lora for LoRA adapters)
    flexproj train llava --model llava-hf/llava-1.5-7b-hf --stage finetune --init runs/align \\
        --data llava_v1_5_mix665k.json --image_folder data/ --output_dir runs/finetune

Family choices (LLaVA-1.5 paper, Liu et al. 2023, and its training scripts):

* **Frozen per stage**: ``align`` trains the projector only; ``finetune`` trains projector +
  language model (+ ``lm_head``); the vision tower is always frozen.
* **Prompt format**: the processor's chat template when it has one (``llava-hf``
  checkpoints do: ``USER: <image>\\n... ASSISTANT:``); ``--prompt_format plain`` is
  Vicuna-v1 as LLaVA-1.5 trained it: ``[system ]USER: <image>\\n{q} ASSISTANT: {a}</s>``
  per turn. The answer and its ``</s>`` are the targets.
* **Images**: LLaVA-1.5 pads each image to a square with the image processor's mean colour
  before the 336 px resize (``image_aspect_ratio="pad"``); NeXT / OneVision do not (AnyRes
  tiles the original aspect ratio), so padding is on for ``llava`` only.
* **Defaults**: align lr 1e-3, finetune lr 2e-5 (LoRA 2e-4), cosine schedule, 3% warmup,
  one epoch, no weight decay (as LLaVA-1.5). Batch sizes are per device: LLaVA-1.5 used a
  global batch of 256 (align) / 128 (finetune); set ``--per_device_train_batch_size`` and
  ``--gradient_accumulation_steps`` for your GPUs.
* **Budgets**: per image (per crop for NeXT / OneVision), at most the tower's grid
  (576 at 336 px / patch 14). The paper's schedule 64:2,144:3,256:5 is the default.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from flexproj._types import Model
from flexproj.recipes.data import IMAGE_TAG, Segment
from flexproj.recipes.family import COMMON_TRAINING_DEFAULTS, FamilyRecipe, Messages


class LlavaRecipe(FamilyRecipe):
    name = "llava"
    model_classes: ClassVar[dict[str, str]] = {
        "llava": "LlavaForConditionalGeneration",
        "llava_next": "LlavaNextForConditionalGeneration",
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    }
    tiny_families = ("llava", "llava_siglip", "llava_next", "llava_onevision")
    default_tiny = "llava"
    default_system_prompt = None
    pad_to_square = True
    stage_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "align": {
            **COMMON_TRAINING_DEFAULTS,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 32,
        },
        "finetune": {
            **COMMON_TRAINING_DEFAULTS,
            "learning_rate": 2e-5,
            "per_device_train_batch_size": 16,
        },
    }

    def use_pad_to_square(self, model: Model, configured: bool | None) -> bool:
        if configured is not None:
            return configured
        return model.config.model_type == "llava"  # AnyRes models keep the aspect ratio

    def plain_segments(self, dialogue: Messages, processor: Any, system: str) -> list[Segment]:
        placeholder, end = self.image_placeholder(processor), self.end_of_turn(processor)
        segments: list[Segment] = []
        head = f"{system} " if system else ""
        for role, text in dialogue:
            if role == "user":
                segments.append(
                    Segment(f"{head}USER: {text.replace(IMAGE_TAG, placeholder)} ASSISTANT:", False)
                )
                head = ""
            else:
                segments.append(Segment(f" {text}{end}", True))
        return segments


RECIPE = LlavaRecipe()


def main(argv: Sequence[str] | None = None) -> int:
    from flexproj.recipes.trainer import main as run

    return run("llava", argv, prog="python -m flexproj.recipes.llava")


if __name__ == "__main__":
    sys.exit(main())
