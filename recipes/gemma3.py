"""Gemma 3 recipe: ``Gemma3ForConditionalGeneration`` with a FlexProjector.

Run ``flexproj train gemma3 --help``::

    flexproj train gemma3 --model google/gemma-3-4b-it --stage align --init distill \\
        --data data.json --output_dir runs/gemma3-align --bf16

Family choices:

* **Frozen per stage**: the FlexProjector replaces ``multi_modal_projector`` (AvgPool2d +
  RMSNorm + linear) and pools the SigLIP grid itself; ``align`` trains it only,
  ``finetune`` adds the language model and ``lm_head`` (``--lora``: every ``nn.Linear`` of
  the language model). The SigLIP tower stays frozen.
* **Prompt format**: the chat template, or ``--prompt_format plain``: Gemma's turns,
  ``<start_of_turn>user\\n<start_of_image>{q}<end_of_turn>\\n<start_of_turn>model\\n{a}
  <end_of_turn>\\n``; the answer and ``<end_of_turn>`` are the targets. The processor
  expands ``<start_of_image>`` into the image sequence.
* **Images**: resized to the tower's square (896 px) by the processor, no padding;
  pan-and-scan crops (off by default, as upstream) each take the image's budget.
* **Budgets**: per image and crop, at most the tower grid (4096 at 896 px / patch 14).
* **Distillation** (``--init distill``): at the stock count, ``mm_tokens_per_image`` (256,
  a 16x16 grid), where the FlexProjector's pooled grid is the stock AvgPool2d's.
* **Defaults**: align lr 1e-3, finetune lr 1e-5 (LoRA 2e-4), cosine, 3% warmup, one epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from flexproj._types import Model
from flexproj.recipes.data import IMAGE_TAG, Segment
from flexproj.recipes.family import COMMON_TRAINING_DEFAULTS, FamilyRecipe, Messages


class Gemma3Recipe(FamilyRecipe):
    name = "gemma3"
    model_classes: ClassVar[dict[str, str]] = {"gemma3": "Gemma3ForConditionalGeneration"}
    tiny_families = ("gemma3",)
    default_tiny = "gemma3"
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

    def end_of_turn(self, processor: Any) -> str:
        return "<end_of_turn>"

    def plain_segments(self, dialogue: Messages, processor: Any, system: str) -> list[Segment]:
        image, end = self.image_placeholder(processor), self.end_of_turn(processor)
        segments: list[Segment] = []
        head = f"{system}\n\n" if system else ""  # Gemma has no system role: prefixed
        for role, text in dialogue:
            if role == "user":
                prompt = head + text.replace(IMAGE_TAG, image)
                segments.append(
                    Segment(f"<start_of_turn>user\n{prompt}{end}\n<start_of_turn>model\n", False)
                )
                head = ""
            else:
                segments.append(Segment(f"{text}{end}\n", True))
        return segments

    def distill_tokens(self, model: Model) -> int:
        return int(model.config.mm_tokens_per_image)  # the stock count (matched grid)


RECIPE = Gemma3Recipe()


def main(argv: Sequence[str] | None = None) -> int:
    from flexproj.recipes.trainer import main as run

    return run("gemma3", argv, prog="python -m flexproj.recipes.gemma3")


if __name__ == "__main__":
    sys.exit(main())
