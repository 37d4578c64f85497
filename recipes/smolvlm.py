"""SmolVLM recipe: ``SmolVLMForConditionalGeneration`` with a FlexProjector.

Run ``flexproj train smolvlm --help``::

    flexproj train smolvlm --model HuggingFaceTB/SmolVLM-256M-Instruct --stage align \\
        --init distill --data data.json --output_dir runs/smolvlm-align

Family choices:

* **Frozen per stage**: the FlexProjector replaces the connector (pixel shuffle + linear)
  and pools the tower grid of every tile itself; ``align`` trains it only, ``finetune``
  adds the language model and ``lm_head`` (``--lora``: every ``nn.Linear`` of it). The
  vision model stays frozen.
* **Prompt format**: the chat template, or ``--prompt_format plain``: SmolVLM's turns,
  ``<|im_start|>User:<image>{q}<end_of_utterance>\\nAssistant: {a}<end_of_utterance>\\n``;
  the answer and ``<end_of_utterance>`` are the targets.
* **Images**: split into tiles plus a global view by the processor, no padding.
* **Budgets**: per tile (global view included), at most the tower grid (1024 at 512 px /
  patch 16).
* **Distillation** (``--init distill``): at the stock count per tile (``image_seq_len``,
  64 for SmolVLM-256M), the connector's own output grid.
* **Defaults**: align lr 1e-3, finetune lr 2e-5 (LoRA 2e-4), cosine, 3% warmup, one epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from flexproj._types import Model
from flexproj.recipes.data import IMAGE_TAG, Segment
from flexproj.recipes.family import COMMON_TRAINING_DEFAULTS, FamilyRecipe, Messages


class SmolVLMRecipe(FamilyRecipe):
    name = "smolvlm"
    model_classes: ClassVar[dict[str, str]] = {"smolvlm": "SmolVLMForConditionalGeneration"}
    tiny_families = ("smolvlm",)
    default_tiny = "smolvlm"
    stage_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "align": {
            **COMMON_TRAINING_DEFAULTS,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 16,
        },
        "finetune": {
            **COMMON_TRAINING_DEFAULTS,
            "learning_rate": 2e-5,
            "per_device_train_batch_size": 8,
        },
    }

    def end_of_turn(self, processor: Any) -> str:
        return str(getattr(processor, "end_of_utterance_token", "<end_of_utterance>"))

    def plain_segments(self, dialogue: Messages, processor: Any, system: str) -> list[Segment]:
        image, end = self.image_placeholder(processor), self.end_of_turn(processor)
        segments: list[Segment] = []
        head = f"<|im_start|>System: {system}{end}\n" if system else "<|im_start|>"
        for role, text in dialogue:
            if role == "user":
                prompt = text.replace(IMAGE_TAG, image)
                segments.append(Segment(f"{head}User:{prompt}{end}\nAssistant:", False))
                head = ""
            else:
                segments.append(Segment(f" {text}{end}\n", True))
        return segments

    def language_model(self, model: Model) -> nn.Module:
        return model.model.text_model

    def distill_tokens(self, model: Model) -> int:
        # the stock connector's count per tile (matched grid), not the tower's
        return (
            int(
                model.config.vision_config.image_size
                // model.config.vision_config.patch_size
                // model.config.scale_factor
            )
            ** 2
        )


RECIPE = SmolVLMRecipe()


def main(argv: Sequence[str] | None = None) -> int:
    from flexproj.recipes.trainer import main as run

    return run("smolvlm", argv, prog="python -m flexproj.recipes.smolvlm")


if __name__ == "__main__":
    sys.exit(main())
