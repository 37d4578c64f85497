"""``flexproj distill``: a FlexProjector fitted to the pooled stock projector, images only.

See :mod:`flexproj.recipes.distill`: at every budget of ``--schedule`` and the native one
the FlexProjector learns to give what the stock projector gives with its outputs
average-pooled to that budget; no conversations, no LLM forward.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="fit a FlexProjector to the stock projector's pooled outputs at every budget (images only)",
        description=(
            "Warm-start a FlexProjector without any LLM training: for each budget N of --schedule "
            "and the native one, fit it to the stock projector's outputs average-pooled to N. "
            "Writes a projector (flexproj.safetensors + flexproj_config.json) that "
            "flexproj.from_pretrained loads, distill.json (cosine and relative MSE per budget, "
            "before and after) and recipe.json (for flexproj eval --run)."
        ),
    )
    parser.add_argument("--model", required=True,
                        help="base model: tiny:<family>, a local path or a hub id")  # fmt: skip
    parser.add_argument("--images", required=True,
                        help="a folder of images, or a JSON/JSONL list of paths or LLaVA records")  # fmt: skip
    parser.add_argument("--output_dir", required=True, help="where the projector goes")
    parser.add_argument("--weights", default=None,
                        help="transformers model dir to take the weights from (e.g. a run's model/)")  # fmt: skip
    parser.add_argument("--image_folder", default=None,
                        help="folder the JSON's relative paths start from (default: the JSON's)")  # fmt: skip
    parser.add_argument("--schedule", default="paper",
                        help="budgets to fit at, as in flexproj train (default: paper = 64,144,256); "
                        "the native budget is always added; budgets over the stock count are left out")  # fmt: skip
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps (default 500)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--batch_size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--cosine_weight", type=float, default=1.0,
                        help="loss = relative MSE + w * (1 - cosine)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_images", type=int, default=None, help="first N images only")
    parser.add_argument("--kernel", default="auto", help="SwiGLU backend of the new projector")
    parser.add_argument("--hidden_dim", type=int, default=None, help="projector hidden width")
    parser.add_argument(
        "--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16")
    )
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from flexproj.recipes.distill import run_distill

    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be at least 1", file=sys.stderr)
            return 2
    run_distill(
        args.model,
        args.images,
        args.output_dir,
        weights=args.weights,
        image_folder=args.image_folder,
        schedule=args.schedule,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        cosine_weight=args.cosine_weight,
        seed=args.seed,
        max_images=args.max_images,
        kernel=args.kernel,
        hidden_dim=args.hidden_dim,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )
    return 0
