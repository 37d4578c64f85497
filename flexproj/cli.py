"""The ``flexproj`` command line."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence

import flexproj


def _info(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    import torch

    from flexproj.kernels.registry import backend_status, resolve_backend

    print(f"flexproj {flexproj.__version__}")
    print(f"python {platform.python_version()} ({platform.platform()})")
    for pkg in (
        "torch",
        "transformers",
        "safetensors",
        "einops",
        "triton",
        "xformers",
        "accelerate",
        "peft",
    ):
        try:
            version = md.version(pkg)
        except md.PackageNotFoundError:
            version = "not installed"
        print(f"{pkg:>13}: {version}")
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    else:
        device = f"cpu ({torch.get_num_threads()} threads), no CUDA device"
    print(f"device: {device}")
    print("kernel backends:")
    for name, reason in backend_status().items():
        print(f"  {name:<9} {'available' if reason is None else 'unavailable: ' + reason}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float32, torch.bfloat16):
        print(
            f"  auto on {dev}/{str(dtype).removeprefix('torch.')}: {resolve_backend('auto', dev, dtype)}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexproj", description=flexproj.__doc__.splitlines()[0] if flexproj.__doc__ else None
    )
    parser.add_argument("--version", action="version", version=f"flexproj {flexproj.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, kernel backends and device")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
