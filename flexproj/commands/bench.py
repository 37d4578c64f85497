"""``flexproj bench {kernels,e2e,train,serve,budgets}``: performance benchmarks (see docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

# subcommand -> help; each is the module flexproj.bench.<name> with add_arguments / run
SUBCOMMANDS = {
    "kernels": "projector per SwiGLU backend vs matmul floor, stock projector and pool-after",
    "e2e": "prefill / decode latency and KV-cache bytes per token budget, per model family",
    "train": "training step time, peak memory, vision tokens: fixed 256 vs the 2:3:5 schedule",
    "serve": "vLLM requests/s and time to first token per budget (needs the vLLM plug-in env)",
    "budgets": "per-image budgets in one batch vs grouped / one at a time, flexproj's prefill "
    "overhead, adaptive_generate vs the largest budget",
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="performance benchmarks (kernels, e2e, train, serve)", description=__doc__
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    parser.set_defaults(func=lambda args: _usage(parser))
    for name, text in SUBCOMMANDS.items():
        # the bench modules import only torch and flexproj at the top (transformers and
        # the model builders load inside run), like the rest of the command line
        module = importlib.import_module(f"flexproj.bench.{name}")
        child = sub.add_parser(
            name,
            help=text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(child)
        child.set_defaults(func=module.run)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
