"""``flexproj info``: versions, kernel backends and device."""

from __future__ import annotations

import argparse
import platform
from typing import Any

PACKAGES = (
    "torch",
    "transformers",
    "safetensors",
    "einops",
    "triton",
    "xformers",
    "accelerate",
    "peft",
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("info", help="versions, kernel backends and device")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    import torch

    import flexproj
    from flexproj.kernels.registry import BACKENDS, backend_status, resolve_backend
    from flexproj.registry import supported_models

    print(f"flexproj {flexproj.__version__}")
    print(f"python {platform.python_version()} ({platform.platform()})")
    for pkg in PACKAGES:
        try:
            version = md.version(pkg)
        except md.PackageNotFoundError:
            version = "not installed"
        print(f"{pkg:>13}: {version}")
    if torch.cuda.is_available():
        dev = "cuda"
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    else:
        dev = "cpu"
        device = f"cpu ({torch.get_num_threads()} threads), no CUDA device"
    print(f"device: {device}")
    print("kernel backends:")
    for name, reason in backend_status().items():
        if reason is None:
            problem = BACKENDS[name].device_problem(torch.device(dev))
            reason_text = (
                "available" if problem is None else f"installed, not usable on {dev}: {problem}"
            )
        else:
            reason_text = f"unavailable: {reason}"
        print(f"  {name:<9} {reason_text}")
    for dtype in (torch.float32, torch.bfloat16):
        print(
            f"  auto on {dev}/{str(dtype).removeprefix('torch.')}: {resolve_backend('auto', dev, dtype)}"
        )
    print(f"model types: {', '.join(supported_models())}")
    return 0
