"""torch.compile, bf16 and autocast on the projector and on a patched model.

What these pin (torch 2.13, transformers 5.23):

* ``FlexProjector`` compiles with ``fullgraph=True`` for every CPU backend, and a
  budget that changes between calls recompiles instead of crashing (a changed int
  becomes a SymInt under automatic dynamic shapes; inductor cannot lower
  ``adaptive_avg_pool2d`` to a symbolic size, so ``output_grid`` specialises it).
* ``torch.compile(model)`` of a patched LLaVA matches eager at several budgets.
* ``fullgraph=True`` on a patched model: nothing traced reads a ``ContextVar`` (Dynamo
  cannot, graph break gb0156): text steps trace in one graph in every family, and an
  image step runs at the model's default budget (a plain attribute Dynamo guards on),
  with a traced runtime check that the inputs carry that budget (flexproj.carried).
  Image steps of LLaVA-NeXT and Qwen-VL stop at data-dependent code of the stock models
  (best-resolution choice, grid_thw), patched or not.
* A patched model runs in bf16 and under ``torch.autocast("cpu", torch.bfloat16)``.

Transformers installs its output-capturing hooks on a model's first call under a
``threading.Lock``, which Dynamo cannot enter; a stock LLaVA compiled with
``fullgraph=True`` before any eager call fails the same way. Each test below therefore
runs the model once eagerly before compiling it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import flexproj
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

PROMPT = "USER: <image> what color is the circle ? ASSISTANT:"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _patched_llava(tokens: int = 16):
    model, processor = tiny_vlm("llava", text_config={"num_hidden_layers": 1})
    flexproj.patch(model, processor, tokens=tokens)
    return model, processor


def _inputs(processor):
    return processor(text=[PROMPT], images=tiny_images([(64, 64)]), return_tensors="pt")


@pytest.mark.parametrize("kernel", ["eager", "auto", "triton"])
def test_projector_fullgraph_follows_budget_changes(kernel):
    torch.manual_seed(0)
    proj = flexproj.FlexProjector(32, 48, kernel=kernel)
    x = torch.randn(2, 64, 32)
    compiled = torch.compile(lambda x, n: proj(x, tokens=n), fullgraph=True)
    budgets = (16, 4, 9, 16) if kernel != "triton" else (16, 4)
    with torch.no_grad():
        for n in budgets:
            torch.testing.assert_close(compiled(x, n), proj(x, tokens=n), rtol=1e-5, atol=1e-5)


def test_backend_resolution_is_a_dynamo_constant():
    # registry marks _resolve_traced by hand (importing torch._dynamo at import time is
    # slow); this is what torch.compiler.assume_constant_result does, checked here
    from flexproj.kernels import registry

    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert marked._dynamo_marked_constant is True
    assert registry._resolve_traced._dynamo_marked_constant is True


def test_projector_fullgraph_guards_the_kernel_name():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    proj = flexproj.FlexProjector(32, 48, kernel="eager")
    x = torch.randn(1, 64, 32)
    compiled = torch.compile(lambda x: proj(x, tokens=16), backend=counter, fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x)
        compiled(x)
        assert counter.frame_count == 1
        # the dispatch is not traced through its functools.cache wrappers any more
        assert not [w for w in caught if "lru_cache" in str(w.message)]
        # the backend is resolved once at trace time; another kernel name re-traces
        proj.kernel = "triton"  # runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py)
        torch.testing.assert_close(compiled(x), proj(x, tokens=16), rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 2


def _patched(family: str, tokens: int = 16):
    small = {} if family == "internvl" else {"text_config": {"num_hidden_layers": 1}}
    model, processor = tiny_vlm(family, **small)
    model.eval()
    flexproj.patch(model, processor, tokens=tokens)
    return model, processor


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "internvl"])
def test_fullgraph_traces_patched_text_steps(family):
    """A text-only step (what transformers' compiled generate compiles: the decode steps)
    traces in one graph on a patched model, in and out of a flexproj.tokens block."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, processor = _patched(family)
    text = processor(text=["what color is it ?"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**text).logits  # first call eager: see the module docstring
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        torch.testing.assert_close(compiled(**text).logits, expected)
        with flexproj.tokens(4):
            torch.testing.assert_close(compiled(**text).logits, expected)
    assert counter.frame_count == 1


def test_fullgraph_traces_a_patched_image_step_at_the_default_budget():
    """An image step traces in one graph and matches eager; inputs carrying another budget
    fail a runtime check in the graph instead of running at the default."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, processor = _patched("llava")
    inputs = _inputs(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        for _ in range(2):
            torch.testing.assert_close(compiled(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        assert counter.frame_count == 1
        with flexproj.tokens(4):
            other = _inputs(processor)
        with pytest.raises(RuntimeError, match="compiled model runs at its default budget"):
            compiled(**other)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_a_graph_break_in_stock_code_under_a_patched_override_is_not_a_loop(family):
    """Without fullgraph, stock code's graph breaks (data-dependent checks) inside the
    patched methods resume and finish (they once recursed until the interpreter died)."""
    model, processor = _patched(family)
    img = IMAGE_PLACEHOLDER[family]
    inputs = processor(
        text=[f"{img} what color ?"], images=tiny_images([(64, 64)]), return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**inputs).logits
        got = torch.compile(model, backend="eager")(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_patched_llava_matches_eager_across_default_budgets():
    """Inductor, at two default budgets: each compiled model matches eager."""
    for n in (16, 4):
        model, processor = _patched("llava", tokens=n)
        with torch.no_grad():
            inputs = _inputs(processor)
            expected = model(**inputs).logits  # first call eager: see the module docstring
            got = torch.compile(model)(**inputs).logits
        assert (inputs["input_ids"] == model.config.image_token_id).sum() == n
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_patched_llava_runs_in_bf16_and_under_autocast():
    model, processor = _patched_llava()
    inputs = _inputs(processor)
    projector = flexproj.get_projector(model)
    seen = []
    projector.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.no_grad():
        reference = model(**inputs).logits.float()
        scale = reference.abs().max()

        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(**inputs).logits.float()
        assert seen[-1] == torch.bfloat16  # the projector's matmuls ran in bf16
        assert torch.isfinite(auto).all()
        assert (auto - reference).abs().max() < 0.05 * scale

        model.to(torch.bfloat16)
        pv = inputs["pixel_values"].to(torch.bfloat16)
        low = model(**{**inputs, "pixel_values": pv}).logits.float()
        assert seen[-1] == torch.bfloat16
        assert torch.isfinite(low).all()
        assert (low - reference).abs().max() < 0.05 * scale
        with flexproj.tokens(4):
            small = _inputs(processor)
            out = model.generate(
                **{**small, "pixel_values": small["pixel_values"].to(torch.bfloat16)},
                max_new_tokens=3,
                do_sample=False,
            )
    assert out.shape[1] == small["input_ids"].shape[1] + 3
