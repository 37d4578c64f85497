"""Qwen3.5 recipe: Qwen-VL's (ChatML prompts, native-resolution images, budgets capped per
image, distillation at each image's native grid; see ``recipes/qwen_vl.py``) for
``Qwen3_5ForConditionalGeneration``.

Run ``flexproj train qwen3_5 --help``. In ``finetune`` the whole hybrid language model
(linear-attention and full-attention layers alike) trains, and ``--lora`` targets every
``nn.Linear`` of it, the Gated DeltaNet projections included.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import ClassVar

from flexproj.recipes.qwen_vl import QwenVLRecipe


class Qwen3_5Recipe(QwenVLRecipe):
    name = "qwen3_5"
    model_classes: ClassVar[dict[str, str]] = {"qwen3_5": "Qwen3_5ForConditionalGeneration"}
    tiny_families = ("qwen3_5",)
    default_tiny = "qwen3_5"


RECIPE = Qwen3_5Recipe()


def main(argv: Sequence[str] | None = None) -> int:
    from flexproj.recipes.trainer import main as run

    return run("qwen3_5", argv, prog="python -m flexproj.recipes.qwen3_5")


if __name__ == "__main__":
    sys.exit(main())
