"""``flexproj demo``: convert a tiny trained VLM to variable tokens, every way, and compare
(CPU, minutes).

The default ``--experiment convert`` trains a tiny VLM the stock way at its native budget,
converts it (training-free pooling, distillation, the flexible and fixed-N recipes) and
evaluates every row at every budget; ``--experiment scratch`` is the TokenFLEX table in
miniature (fixed-N and flexible models from the same initial weights). Both write
``results.json`` and plots (see :mod:`flexproj.demo` and ``docs/DEMO.md``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.replace(" ", "").split(",") if t)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="convert a tiny trained VLM to variable tokens every way and compare the rows "
        "at every budget (--experiment scratch: the paper's table from scratch)",
        description=(
            "What a user holding a trained VLM gets: a tiny VLM (--family, default LLaVA: 96 px "
            "images, 12x12 = 144 native vision tokens) is trained offline the stock way at its "
            "native budget, then converted every way (training-free pooling of the stock "
            "tokens, distillation, the flexible TokenFLEX schedule and fixed-N finetunes, K "
            "steps each, through the recipes users run), and every row is evaluated at every "
            "budget on held-out synthetic VQA. --experiment scratch runs the paper's table "
            "instead: fixed-N and flexible LLaVAs trained from the same initial weights. A few "
            "minutes on two CPU cores; --quick about a minute."
        ),
    )
    parser.add_argument(
        "--experiment",
        choices=("convert", "scratch"),
        default="convert",
        help="convert (default): train a tiny VLM the stock way at its native budget, then "
        "convert it (training-free pooling, distillation, the flexible and fixed recipes); "
        "scratch: the paper's table from scratch (fixed-N vs flexible, same steps)",
    )
    parser.add_argument(
        "--family",
        choices=("llava", "qwen2_5_vl", "internvl"),
        default="llava",
        help="convert: the tiny model family (default llava)",
    )
    parser.add_argument(
        "--task",
        choices=("flag", "board"),
        default=None,
        help="convert: the questions (default flag: a big shape's colour and the top colour "
        "of a small two-colour flag, fine detail; board: colour and the colour in a named "
        "cell of a 4x4 board)",
    )
    parser.add_argument(
        "--docs",
        choices=("write", "check"),
        default=None,
        help="convert: after the run, write its tables and reading into README.md and "
        "docs/DEMO.md (between the task's marker comments; `make docs`), or check that the "
        "committed ones are what this run printed (exit 1 with a diff when not; `make "
        "check-docs`). Run from the repository root.",
    )
    parser.add_argument("--text-head-dim", type=int, default=None,
                        help="convert: attention head width of the tiny LLaVA's LLM (default "
                        "16, what the published tables used; 32: a base model vLLM's CPU "
                        "backend serves)")  # fmt: skip
    parser.add_argument("--stock-steps", type=int, default=None,
                        help="convert: steps of the stock reference training")  # fmt: skip
    parser.add_argument("--convert-steps", type=int, default=None,
                        help="convert: K, steps of each recipe row")  # fmt: skip
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="convert: steps of the distillation")  # fmt: skip
    parser.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument(
        "--seeds", type=int, default=None, help="training seeds (default 3; --quick 1)"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps per run")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step")
    parser.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    parser.add_argument(
        "--train-tokens", type=_int_list, default=None, help="training budgets, e.g. 16,36,64"
    )
    parser.add_argument(
        "--weights", type=_float_list, default=None, help="flexible schedule weights, e.g. 2,3,5"
    )
    parser.add_argument(
        "--eval-tokens",
        type=_int_list,
        default=None,
        help="evaluation budgets (training ones are added)",
    )
    parser.add_argument(
        "--eval-per-kind", type=int, default=None, help="held-out questions per kind"
    )
    parser.add_argument("--text-hidden", type=int, default=None, help="width of the tiny LLM")
    parser.add_argument("--text-layers", type=int, default=None, help="layers of the tiny LLM")
    parser.add_argument(
        "--train-vision", action="store_true", help="train the vision tower too (default: frozen)"
    )
    parser.add_argument(
        "--kinds", type=_str_list, default=None, help="question kinds, e.g. colour,position,count"
    )
    parser.add_argument(
        "--board", type=int, default=None, help="board side of position/count questions"
    )
    parser.add_argument(
        "--prompt",
        choices=("question_first", "image_first"),
        default=None,
        help="where the image goes in the prompt (default question_first; LLaVA-1.5: image_first)",
    )
    parser.add_argument(
        "--vision-pos",
        choices=("sincos", "random"),
        default=None,
        help="vision tower position embeddings: fixed 2-D sin-cos (default) or CLIP's random init",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training processes of one thread each (default: min(2, CPU count))",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.set_defaults(func=run)


_FIELDS = {
    "seeds": "seeds",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "train_tokens": "train_tokens",
    "weights": "flex_weights",
    "eval_tokens": "eval_tokens",
    "eval_per_kind": "eval_per_kind",
    "text_hidden": "text_hidden",
    "text_layers": "text_layers",
    "threads": "threads",
    "kinds": "kinds",
    "board": "board",
    "prompt": "prompt",
    "vision_pos": "vision_pos",
}


_CONVERT_FIELDS = {
    "seeds": "seeds",
    "stock_steps": "stock_steps",
    "convert_steps": "convert_steps",
    "distill_steps": "distill_steps",
    "batch_size": "batch_size",
    "train_tokens": "train_tokens",
    "weights": "flex_weights",
    "eval_tokens": "eval_tokens",
    "eval_per_kind": "eval_per_kind",
    "threads": "threads",
    "task": "task",
    "text_head_dim": "text_head_dim",
}


def run(args: argparse.Namespace) -> int:

    from flexproj.errors import require_extra

    # up front: the plot (matplotlib) comes after minutes of training
    require_extra(
        {"PIL": "Pillow", "matplotlib": "matplotlib"}, extra="train", feature="flexproj demo"
    )
    from flexproj.demo import (
        ConvertConfig,
        DemoConfig,
        quick_config,
        quick_convert_config,
        run_convert,
        run_demo,
    )

    workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    if args.experiment == "convert":
        fields = {
            field: getattr(args, arg)
            for arg, field in _CONVERT_FIELDS.items()
            if getattr(args, arg) is not None
        }
        fields["family"] = args.family
        ccfg = quick_convert_config(**fields) if args.quick else ConvertConfig(**fields)
        if args.docs:  # missing markers fail now, not after minutes of training
            from flexproj.demo.docs import DocsError, check_markers

            try:
                check_markers(ccfg.task, ".")
            except (DocsError, OSError) as exc:  # one line, exit 2 (flexproj.cli.run_command)
                raise DocsError(f"--docs {args.docs}: {exc}") from None
        results = run_convert(ccfg, args.out, workers=workers)
        plot = os.path.join(args.out, results["plot"])
        return _docs(args.docs, results, plot) if args.docs else 0

    overrides: dict[str, Any] = {
        field: getattr(args, arg)
        for arg, field in _FIELDS.items()
        if getattr(args, arg) is not None
    }
    if args.train_vision:
        overrides["train_vision"] = True
    if "train_tokens" in overrides and "flex_weights" not in overrides:
        overrides["flex_weights"] = (1.0,) * len(overrides["train_tokens"])
    cfg = quick_config(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(cfg, args.out, workers=workers)
    return 0


def _docs(mode: str, results: dict[str, Any], plot: str) -> int:
    """``--docs write``: the sections written; ``check``: 1 and a diff when they differ."""
    import sys

    from flexproj.demo.docs import check_docs, write_docs

    if mode == "write":
        for file in write_docs(results, ".", plot):
            print(f"wrote the demo sections of {file}")
        return 0
    problems = check_docs(results, ".")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(
            "error: the committed demo tables are not what this run printed; run `make docs` "
            "and commit README.md and docs/DEMO.md",
            file=sys.stderr,
        )
        return 1
    print("the committed demo tables are what this run printed")
    return 0
