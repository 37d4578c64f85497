"""Fused ``silu(a) * b`` forward and backward as Triton kernels.

The projector's three matmuls stay in cuBLAS; what this fuses is the elementwise
middle: eager PyTorch reads the packed ``(M, 2*hidden)`` gate/up activations, writes
``silu(a)``, reads it back, writes the product (and, in backward, does it again for
each partial derivative). Here the forward reads ``a`` and ``b`` once and writes the
product once; the backward reads ``a``, ``b`` and the output gradient once and writes
``[da | db]`` straight into the packed layout the ``w12`` matmul backward consumes.
Math is fp32 inside whatever the storage dtype.

The op is registered with ``torch.library`` so autograd and ``torch.compile`` see one
opaque op. Triton also runs on CPU tensors under ``TRITON_INTERPRET=1`` (slowly),
which is how the CPU test suite checks the kernels against eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_fwd(h_ptr, out_ptr, n_cols, stride_h, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + row * stride_h + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd(
    h_ptr, dout_ptr, dh_ptr, n_cols, stride_h, stride_dout, stride_dh, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + row * stride_h + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dout_ptr + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = g * b * sig * (1.0 + a * (1.0 - sig))  # d silu(a)/da = sig * (1 + a * (1 - sig))
    db = g * silu
    dh_row = dh_ptr + row * stride_dh
    tl.store(dh_row + cols, da.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_row + n_cols + cols, db.to(dh_ptr.dtype.element_ty), mask=mask)


def _as_rows(h: torch.Tensor) -> torch.Tensor:
    """View ``(..., 2*hidden)`` as ``(M, 2*hidden)`` with unit column stride."""
    h2 = h.reshape(-1, h.shape[-1])
    return h2 if h2.stride(-1) == 1 else h2.contiguous()


@torch.library.custom_op("flexproj::silu_mul", mutates_args=())
def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """``h (..., 2*hidden) -> silu(h[..., :hidden]) * h[..., hidden:]``, one fused kernel."""
    hidden = h.shape[-1] // 2
    h2 = _as_rows(h)
    out = torch.empty((h2.shape[0], hidden), dtype=h.dtype, device=h.device)
    if out.numel():
        grid = (h2.shape[0], triton.cdiv(hidden, BLOCK))
        _silu_mul_fwd[grid](h2, out, hidden, h2.stride(0), out.stride(0), BLOCK=BLOCK)
    return out.reshape(*h.shape[:-1], hidden)


@silu_mul.register_fake
def _(h: torch.Tensor) -> torch.Tensor:
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("flexproj::silu_mul_backward", mutates_args=())
def silu_mul_backward(grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    hidden = h.shape[-1] // 2
    h2 = _as_rows(h)
    g2 = _as_rows(grad_out)
    dh = torch.empty_like(h2)
    if dh.numel():
        grid = (h2.shape[0], triton.cdiv(hidden, BLOCK))
        _silu_mul_bwd[grid](
            h2, g2, dh, hidden, h2.stride(0), g2.stride(0), dh.stride(0), BLOCK=BLOCK
        )
    return dh.reshape(h.shape)


@silu_mul_backward.register_fake
def _(grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    (h,) = ctx.saved_tensors
    return silu_mul_backward(grad_out, h)


silu_mul.register_autograd(_backward, setup_context=_setup_context)


def swiglu_triton(
    x: torch.Tensor,
    w12: torch.Tensor,
    b12: torch.Tensor | None,
    w3: torch.Tensor,
    b3: torch.Tensor | None,
) -> torch.Tensor:
    h = F.linear(x, w12, b12)  # (..., 2*hidden): gate then up
    return F.linear(silu_mul(h), w3, b3)
