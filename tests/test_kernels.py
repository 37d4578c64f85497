"""SwiGLU backend parity with eager (forward and backward) and dispatch rules."""

import importlib.util

import pytest
import torch

import flexproj
from flexproj.kernels import BACKENDS, BackendUnavailable, registry, resolve_backend, swiglu

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def installed(module):
    return importlib.util.find_spec(module) is not None


BACKEND_PARAMS = [
    pytest.param(
        "xformers",
        marks=pytest.mark.skipif(not installed("xformers"), reason="xformers not installed"),
    ),
    pytest.param("compile", marks=pytest.mark.slow),
    pytest.param(
        "triton", marks=pytest.mark.skipif(not installed("triton"), reason="triton not installed")
    ),
]


def make_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # scaled like a real layer so bf16 sums stay well-conditioned: (B=2, N=18, C=32) -> 48 hidden -> 24
    x = torch.randn(2, 18, 32, generator=g)
    w12 = torch.randn(96, 32, generator=g) / 32**0.5
    b12 = torch.randn(96, generator=g) * 0.1
    w3 = torch.randn(24, 48, generator=g) / 48**0.5
    b3 = torch.randn(24, generator=g) * 0.1
    return [t.to(dtype).requires_grad_() for t in (x, w12, b12, w3, b3)]


def run(kernel, inputs, grad_out):
    out = swiglu(*inputs, kernel=kernel)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", BACKEND_PARAMS)
def test_backend_matches_eager_forward_and_backward(kernel, dtype):
    inputs = make_inputs(dtype)
    grad_out = torch.randn(2, 18, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref_out, ref_grads = run("eager", inputs, grad_out)
    out, grads = run(kernel, inputs, grad_out)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, **TOL[dtype])
        for name, g, r in zip(["x", "w12", "b12", "w3", "b3"], grads, ref_grads):
            torch.testing.assert_close(g, r, **TOL[dtype], msg=lambda m, n=name: f"grad {n}: {m}")
        return
    # Half precision: backends round at different points (fused kernels keep fp32
    # inside), so compare each against an fp32 run on the same rounded inputs and
    # allow at most twice eager's own rounding error plus a few bf16 ulps.
    exact_inputs = [t.detach().float().requires_grad_() for t in inputs]
    exact_out, exact_grads = run("eager", exact_inputs, grad_out.float())
    for name, got, ref, exact in zip(
        ["out", "x", "w12", "b12", "w3", "b3"],
        [out, *grads],
        [ref_out, *ref_grads],
        [exact_out, *exact_grads],
    ):
        eager_err = (ref.float() - exact).abs().max().item()
        err = (got.float() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= 2 * eager_err + 1e-2 * scale, (
            f"{name}: {kernel} error {err:.3g} vs eager {eager_err:.3g}"
        )


def test_eager_is_the_swiglu_formula():
    x, w12, b12, w3, b3 = (t.detach() for t in make_inputs(torch.float64))
    w1, w2 = w12[:48], w12[48:]
    expected = (torch.nn.functional.silu(x @ w1.T + b12[:48]) * (x @ w2.T + b12[48:])) @ w3.T + b3
    torch.testing.assert_close(swiglu(x, w12, b12, w3, b3, kernel="eager"), expected)


def test_projector_backends_agree():
    torch.manual_seed(0)
    proj = flexproj.FlexProjector(32, 16, kernel="eager")
    x = torch.randn(2, 64, 32)
    ref = proj(x, tokens=16)
    for kernel in ["triton", "xformers"]:
        if installed(kernel):
            proj.kernel = kernel
            torch.testing.assert_close(proj(x, tokens=16), ref, atol=1e-5, rtol=1e-5)


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        swiglu(*make_inputs(torch.float32), kernel="fast")


def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.setattr(
        registry,
        "_why_missing",
        lambda name: "xformers is not installed" if name == "xformers" else None,
    )
    registry.resolve_backend.cache_clear()
    try:
        with pytest.raises(
            BackendUnavailable, match="kernel='xformers' is unavailable: xformers is not installed"
        ):
            flexproj.FlexProjector(4, 4, kernel="xformers")
        # auto falls back quietly
        assert resolve_backend("auto", "cpu", torch.float32) == "eager"
    finally:
        registry.resolve_backend.cache_clear()


def test_triton_on_a_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    registry.resolve_backend.cache_clear()
    try:
        with pytest.raises(BackendUnavailable, match="runs on CUDA tensors"):
            resolve_backend("triton", "cpu", torch.float32)
    finally:
        registry.resolve_backend.cache_clear()


def test_auto_picks_a_backend_that_runs_here():
    for dtype in (torch.float32, torch.bfloat16):
        name = resolve_backend("auto", "cpu", dtype)
        assert name in flexproj.available_backends("cpu")
        assert name in BACKENDS
