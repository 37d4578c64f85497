"""Backend table, availability checks and the ``auto`` choice."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexproj.kernels.eager import silu_mul_eager, swiglu_eager

SwigluFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
    torch.Tensor,
]
GateFn = Callable[[torch.Tensor], torch.Tensor]


class BackendUnavailable(RuntimeError):
    """A SwiGLU backend was named explicitly but cannot run here."""


def _missing_xformers() -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'flexproj[xformers]')"
    try:
        from flexproj.kernels.xformers_swiglu import load_xformers_swiglu

        load_xformers_swiglu()
    except Exception as exc:  # broken installs raise all sorts
        return f"xformers is installed but xformers.ops.swiglu failed to import: {exc}"
    return None


def _missing_compile() -> str | None:
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    return None


def _missing_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'flexproj[triton]')"
    return None


def _triton_device_problem(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"the triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
        f"got a {device.type} tensor"
    )


@dataclass(frozen=True)
class Backend:
    """``load`` gives the whole SwiGLU on packed weights; ``load_gate`` only its
    elementwise middle ``silu(a) * b``, for when the linear layers must run as modules
    (a wrapper such as a peft LoRA layer replaced them)."""

    name: str
    load: Callable[[], SwigluFn]
    missing: Callable[[], str | None]
    device_problem: Callable[[torch.device], str | None] = lambda device: None
    load_gate: Callable[[], GateFn] = lambda: silu_mul_eager


def _load_xformers() -> SwigluFn:
    from flexproj.kernels.xformers_swiglu import swiglu_xformers

    return swiglu_xformers


@functools.cache
def _load_compiled() -> SwigluFn:
    return torch.compile(swiglu_eager, dynamic=True)


@functools.cache
def _load_compiled_gate() -> GateFn:
    return torch.compile(silu_mul_eager, dynamic=True)


def _load_triton() -> SwigluFn:
    from flexproj.kernels.triton_swiglu import swiglu_triton

    return swiglu_triton


def _load_triton_gate() -> GateFn:
    from flexproj.kernels.triton_swiglu import silu_mul

    return silu_mul


BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", lambda: swiglu_eager, lambda: None),
    "xformers": Backend("xformers", _load_xformers, _missing_xformers),
    "compile": Backend("compile", _load_compiled, _missing_compile, load_gate=_load_compiled_gate),
    "triton": Backend(
        "triton", _load_triton, _missing_triton, _triton_device_problem, _load_triton_gate
    ),
}
# xformers has no op for the middle alone (and its swiglu runs PyTorch ops since 0.0.34):
# its gate is the eager one.

# Preference order of ``auto`` per device type, best first; the first available wins.
# CPU: eager measured fastest (xformers runs the same PyTorch ops behind a dispatch;
# compile pays a compile per shape family). CUDA: the fused triton kernel, eager
# otherwise. See docs/BENCHMARKS.md for the runs these come from.
AUTO_CHOICE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "eager"),
    "cpu": ("eager",),
}
_AUTO_DEFAULT = ("eager",)


@functools.cache
def _why_missing(name: str) -> str | None:
    return BACKENDS[name].missing()


def backend_status() -> dict[str, str | None]:
    """``{backend: None if importable here, else the reason it is not}``."""
    return {name: _why_missing(name) for name in BACKENDS}


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run here (on ``device``, when given)."""
    dev = torch.device(device) if device is not None else None
    out = []
    for name, backend in BACKENDS.items():
        if _why_missing(name) is not None:
            continue
        if dev is not None and backend.device_problem(dev) is not None:
            continue
        out.append(name)
    return out


def check_backend_name(name: str) -> None:
    """Raise for a name that is neither ``auto`` nor a backend, or is not installed."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {['auto', *BACKENDS]}")
    reason = _why_missing(name)
    if reason is not None:
        raise BackendUnavailable(f"kernel={name!r} is unavailable: {reason}")


@functools.cache
def resolve_backend(name: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend that runs for ``name`` on this device type and dtype."""
    check_backend_name(name)
    device = torch.device(device_type)
    if name != "auto":
        problem = BACKENDS[name].device_problem(device)
        if problem is not None:
            raise BackendUnavailable(f"kernel={name!r} cannot run here: {problem}")
        return name
    for candidate in AUTO_CHOICE.get(device_type, _AUTO_DEFAULT):
        if _why_missing(candidate) is None and BACKENDS[candidate].device_problem(device) is None:
            return candidate
    return "eager"


def _resolve_traced(name: str, device_type: str, dtype: torch.dtype) -> str:
    """:func:`resolve_backend` as torch.compile sees it: called once at trace time, its
    result kept as a constant (the inputs stay guarded). Traced instead, the
    ``functools.cache`` wrappers are ignored (with a warning) and their bodies run
    under Dynamo, which cannot trace the xformers import check."""
    return resolve_backend(name, device_type, dtype)


# What torch.compiler.assume_constant_result(fn) does (torch 2.4 to 2.13: it sets this
# flag); calling it here would import torch._dynamo (about 1 s, and triton) at
# ``import flexproj``. tests/test_compile.py checks the flag is still the mechanism.
_resolve_traced._dynamo_marked_constant = True  # type: ignore[attr-defined]


def swiglu(
    x: torch.Tensor,
    w12: torch.Tensor,
    b12: torch.Tensor | None,
    w3: torch.Tensor,
    b3: torch.Tensor | None,
    kernel: str = "auto",
) -> torch.Tensor:
    """SwiGLU on packed weights with the chosen backend (see :mod:`flexproj.kernels`)."""
    name = _resolve_traced(kernel, x.device.type, x.dtype)
    return BACKENDS[name].load()(x, w12, b12, w3, b3)


def silu_mul(h: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """``silu(h[..., :hidden]) * h[..., hidden:]`` with the chosen backend: the SwiGLU's
    middle, for callers that run the two linear layers themselves."""
    name = _resolve_traced(kernel, h.device.type, h.dtype)
    return BACKENDS[name].load_gate()(h)
