"""``flexproj export BASE PROJECTOR OUT``: a model directory ``vllm serve OUT`` serves.

BASE is a Hugging Face model directory (``save_pretrained`` of model and processor),
PROJECTOR a ``flexproj.save_pretrained`` directory. OUT loads in vLLM with the flexproj
plug-in (``pip install 'flexproj[vllm]'``) and in transformers + ``flexproj.from_pretrained``.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="model directory for vllm serve (base model + flexproj projector)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", help="Hugging Face model directory (weights, config, processor)")
    parser.add_argument(
        "projector", help="flexproj checkpoint directory (flexproj.save_pretrained)"
    )
    parser.add_argument("out", help="directory to write")
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="default budget for requests without mm_processor_kwargs tokens (default: the checkpoint's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from flexproj.serving.export import cpu_head_dim_problem, export, serve_command

    out = export(args.base, args.projector, args.out, tokens=args.tokens, overwrite=args.overwrite)
    cpu = not torch.cuda.is_available()
    print(f"wrote {out}; serve it (flexproj[vllm] installed) with:")
    print(f"  {serve_command(out, cpu=cpu)}")
    note = cpu_head_dim_problem(out) if cpu else None
    if note is not None:
        print(note)
    return 0
