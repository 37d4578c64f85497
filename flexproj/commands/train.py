"""``flexproj train FAMILY ...``: the training recipes (``flexproj.recipes.<family>``).

Everything after the family goes to the recipe's own parser, so
``flexproj train llava --help`` lists every option (recipe options and all
``TrainingArguments`` flags), exactly as ``python -m flexproj.recipes.llava --help``.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a FlexProjector with stochastic vision-token budgets (TokenFLEX recipes)",
        description=(
            "Train a FlexProjector: flexproj train FAMILY --model ... --data ... --output_dir ... "
            "[--stage align|finetune] [--schedule 64:2,144:3,256:5] [--init distill] "
            "[TrainingArguments flags]. Run 'flexproj train FAMILY --help' for every option."
        ),
    )
    parser.add_argument(
        "family", metavar="FAMILY", help="model family (llava, qwen_vl, internvl, ...: the recipes)"
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="recipe options (see FAMILY --help)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from flexproj.recipes.family import recipe_families
    from flexproj.recipes.trainer import main

    families = recipe_families()
    if args.family not in families:
        print(
            f"error: unknown model family {args.family!r}; choose one of {', '.join(families)}",
            file=sys.stderr,
        )
        return 2

    return main(args.family, args.args, prog=f"flexproj train {args.family}")
