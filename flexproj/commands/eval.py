"""``flexproj eval``: trained projectors at several vision-token budgets (see flexproj.recipes.evaluate)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate trained projectors at several token budgets (loss, accuracy, prefill time)",
        description=(
            "Load each --run (a 'flexproj train' output_dir) onto its base model and report, per "
            "budget N, the answer loss, exact-match accuracy of greedy answers and prefill time; "
            "writes eval.json, eval.md and eval.png to --output_dir. eval.json keeps every "
            "sample's reference and generated answer (per_sample). A --data record with a "
            "'kind' field (any string, e.g. the question type) also gets accuracy per kind "
            "(accuracy_by_kind; --auto: the mean budget per kind)."
        ),
    )
    parser.add_argument("--run", action="append", required=True, metavar="DIR",
                        help="a training output_dir; repeat to compare runs on one plot")  # fmt: skip
    parser.add_argument("--label", action="append", default=None, metavar="NAME",
                        help="label per --run (default: the directory name)")  # fmt: skip
    parser.add_argument("--data", required=True,
                        help="LLaVA-format conversation JSON; an optional per-record 'kind' "
                        "field groups the accuracy (accuracy_by_kind)")  # fmt: skip
    parser.add_argument("--image_folder", default=None, help="folder of the JSON's image paths")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 144, 256], metavar="N",
                        help="budgets to evaluate (default: 64 144 256)")  # fmt: skip
    parser.add_argument(
        "--output_dir", default="eval", help="where the reports go (default: ./eval)"
    )
    parser.add_argument("--model", default=None,
                        help="base model (default: the one recorded in each run's recipe.json)")  # fmt: skip
    parser.add_argument("--family", default=None,
                        help="recipe family, e.g. llava, qwen_vl, internvl (default: from recipe.json, "
                        "else from the model's type)")  # fmt: skip
    parser.add_argument("--max_samples", type=int, default=None, help="first N records only")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=16, help="answer length limit")
    parser.add_argument("--prefill_repeats", type=int, default=3,
                        help="timed prefill passes per batch; the fastest counts (default 3; "
                        "0: no timing, accuracy only)")  # fmt: skip
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16")
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--auto", action="store_true",
        help="also calibrate flexproj.adaptive_generate: sweep confidence thresholds over the "
        "--tokens ladder (accuracy and vision tokens per image next to every fixed budget)",
    )  # fmt: skip
    parser.add_argument("--auto_margin", type=float, default=0.01,
                        help="accuracy the chosen threshold may lose against the largest budget "
                        "(default 0.01 = 1 point)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from flexproj.recipes.evaluate import evaluate

    evaluate(
        args.run,
        args.data,
        args.tokens,
        labels=args.label,
        output_dir=args.output_dir,
        image_folder=args.image_folder,
        max_samples=args.max_samples,
        model=args.model,
        family=args.family,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prefill_repeats=args.prefill_repeats,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
        auto=args.auto,
        auto_margin=args.auto_margin,
    )
    return 0
