"""``flexproj train FAMILY ...``: the training recipes (``flexproj.recipes.<family>``).

Everything after the family goes to the recipe's own parser, so
``flexproj train llava --help`` lists every option (recipe options and all
``TrainingArguments`` flags), exactly as ``python -m flexproj.recipes.llava --help``.
"""

from __future__ import annotations

import argparse
from typing import Any

FAMILIES = ("llava", "qwen_vl", "internvl")


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
    parser.add_argument("family", metavar="FAMILY", help=f"model family: {', '.join(FAMILIES)}")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="recipe options (see FAMILY --help)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    if args.family not in FAMILIES:
        print(
            f"error: unknown model family {args.family!r}; choose one of {', '.join(FAMILIES)}",
            file=sys.stderr,
        )
        return 2
    from flexproj.recipes.trainer import main

    return main(args.family, args.args, prog=f"flexproj train {args.family}")
