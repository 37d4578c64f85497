"""InternVL recipe: InternVL 2.5 / 3 (transformers' native ``-hf`` format) with a FlexProjector.

Run ``python -m flexproj.recipes.internvl --help`` (or ``flexproj train internvl --help``)::

    flexproj train internvl --model OpenGVLab/InternVL3-2B-hf --stage align --init distill \\
        --data data.json --output_dir runs/internvl-align --bf16
    flexproj train internvl --model OpenGVLab/InternVL3-2B-hf --stage finetune \\
        --init runs/internvl-align --data data.json --output_dir runs/internvl-ft --bf16

Family choices:

* **Frozen per stage**: the FlexProjector replaces pixel shuffle *and* the MLP projector
  (see ``adapters/internvl.py``): it pools the ViT's native patch grid (32x32 for a 448 px
  tile) and maps the ViT width to the LLM width. ``align`` trains it only (InternVL's "MLP
  warm-up"); ``finetune`` adds the language model and ``lm_head``; the ViT stays frozen.
* **Prompt format**: the chat template, or ``--prompt_format plain``: ChatML with
  ``<IMG_CONTEXT>`` where the data has ``<image>`` (the processor expands it to
  ``<img>`` + N context tokens per tile + ``</img>``). Answer + ``<|im_end|>`` are targets.
  No default system prompt.
* **Images**: dynamic tiling by the processor (1..max_patches 448 px tiles plus a
  thumbnail); no padding. Set the tile count with ``--processor_kwargs
  '{"max_patches": 6}'`` if the processor accepts it.
* **Budgets**: per tile, at most the native patch grid (1024 at 448 px / patch 14);
  256 is the stock count. N > 1024 is an error.
* **Distillation** (``--init distill``): the stock model gives 256 tokens per tile
  (pixel shuffle, 2x2 cells concatenated, then the MLP); the FlexProjector gives
  ``native_tokens`` = 1024. They are compared at *matched grids*: the FlexProjector runs at
  the stock count (``config.image_seq_length``, 16x16), whose pooled cells are exactly the
  2x2 blocks pixel shuffle gathers, in the same row-major order, so token i of one is
  token i of the other.
* **Defaults**: align lr 2e-4, finetune lr 4e-5 (LoRA 2e-4), cosine, 3% warmup, one epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from flexproj._types import Model
from flexproj.recipes.data import Segment
from flexproj.recipes.family import COMMON_TRAINING_DEFAULTS, FamilyRecipe, Messages


class InternVLRecipe(FamilyRecipe):
    name = "internvl"
    model_classes: ClassVar[dict[str, str]] = {"internvl": "InternVLForConditionalGeneration"}
    tiny_families = ("internvl",)
    default_tiny = "internvl"
    default_system_prompt = None
    pad_to_square = False
    stage_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "align": {
            **COMMON_TRAINING_DEFAULTS,
            "learning_rate": 2e-4,
            "per_device_train_batch_size": 16,
        },
        "finetune": {
            **COMMON_TRAINING_DEFAULTS,
            "learning_rate": 4e-5,
            "per_device_train_batch_size": 8,
        },
    }

    def end_of_turn(self, processor: Any) -> str:
        return "<|im_end|>"

    def plain_segments(self, dialogue: Messages, processor: Any, system: str) -> list[Segment]:
        return self.chatml_segments(dialogue, processor, system, self.image_placeholder(processor))

    def distill_tokens(self, model: Model) -> int:
        return int(model.config.image_seq_length)  # the stock count per tile (matched grid)


RECIPE = InternVLRecipe()


def main(argv: Sequence[str] | None = None) -> int:
    from flexproj.recipes.trainer import main as run

    return run("internvl", argv, prog="python -m flexproj.recipes.internvl")


if __name__ == "__main__":
    sys.exit(main())
