"""SwiGLU backends behind one dispatch.

A backend computes ``silu(x @ w1.T + b1) * (x @ w2.T + b2) @ w3.T + b3`` from the
packed xformers layout (``w12`` = ``[w1; w2]`` stacked on the output axis, then ``w3``).

=========  ===================================================================
eager      PyTorch ops; the reference every other backend is tested against.
xformers   ``xformers.ops.swiglu`` (optional extra, imported lazily). Since
           xformers 0.0.34 it has no fused path and runs PyTorch ops itself.
compile    ``torch.compile`` of the eager function (compiles per shape family on
           first use, so ``auto`` never picks it: that cost must be asked for).
triton     our fused ``silu(a) * b`` forward and backward kernel (fp32 math inside)
           between two cuBLAS matmuls; CUDA, or CPU under ``TRITON_INTERPRET=1``.
=========  ===================================================================

``auto`` resolves per device type and dtype from :data:`AUTO_CHOICE`, a table of
measured winners (``flexproj bench kernels`` re-measures it), falls back quietly to
the next available backend, and costs nothing at start-up. A backend named
explicitly raises :class:`BackendUnavailable` naming what is missing.

:func:`silu_mul` is the same choice for the elementwise middle alone; the projector uses
it when a wrapper (a peft LoRA layer, say) replaced one of its linear layers, so the
wrapper's forward runs and only the middle goes through the backend.
"""

from __future__ import annotations

from flexproj.kernels.registry import (
    AUTO_CHOICE,
    BACKENDS,
    BackendUnavailable,
    available_backends,
    backend_status,
    resolve_backend,
    silu_mul,
    swiglu,
)

__all__ = [
    "AUTO_CHOICE",
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "backend_status",
    "resolve_backend",
    "silu_mul",
    "swiglu",
]
