"""peft LoRA on the projector's ``w12``/``w3``: the adapters change the logits, receive
gradients, and every SwiGLU backend gives what eager gives."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import flexproj
from flexproj.kernels import available_backends, silu_mul
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

BACKENDS = ["eager", "compile", "xformers", "triton"]


@pytest.fixture(scope="module")
def lora_model():
    model, processor = tiny_vlm("llava")
    flexproj.patch(model, processor, tokens=16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["w12", "w3"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    inputs = processor(
        text=[f"{IMAGE_PLACEHOLDER['llava']} what color is the circle ?"],
        images=tiny_images([(64, 64)]),
        return_tensors="pt",
    )
    return peft_model, flexproj.get_projector(model), inputs


def lora_params(peft_model):
    return {
        name: p for name, p in peft_model.named_parameters() if "lora_" in name and ".mlp." in name
    }


def forward_backward(peft_model, projector, inputs, kernel):
    projector.kernel = kernel
    peft_model.zero_grad(set_to_none=True)
    logits = peft_model(**inputs).logits
    logits.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in lora_params(peft_model).items()}
    return logits.detach(), grads


def test_lora_layers_wrap_the_projector(lora_model):
    peft_model, projector, _ = lora_model
    assert type(projector.mlp.w12).__module__.startswith("peft")
    assert type(projector.mlp.w3).__module__.startswith("peft")
    assert len(lora_params(peft_model)) == 4  # A and B of w12 and w3


def test_lora_changes_the_logits_and_gets_gradients(lora_model):
    peft_model, projector, inputs = lora_model
    logits, grads = forward_backward(peft_model, projector, inputs, "eager")
    with peft_model.disable_adapter(), torch.no_grad():
        disabled = peft_model(**inputs).logits
    assert not torch.allclose(logits, disabled, atol=1e-5)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("kernel", BACKENDS)
def test_every_backend_matches_eager_under_lora(lora_model, kernel):
    if kernel not in available_backends("cpu"):
        pytest.skip(f"{kernel} cannot run here")
    peft_model, projector, inputs = lora_model
    ref_logits, ref_grads = forward_backward(peft_model, projector, inputs, "eager")
    logits, grads = forward_backward(peft_model, projector, inputs, kernel)
    projector.kernel = "eager"
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_silu_mul_matches_the_formula(kernel):
    if kernel not in available_backends("cpu"):
        pytest.skip(f"{kernel} cannot run here")
    h = torch.randn(3, 5, 2 * 7, requires_grad=True)
    out = silu_mul(h, kernel)
    a, b = h.detach().clone().requires_grad_(True).chunk(2, dim=-1)
    torch.testing.assert_close(out, torch.nn.functional.silu(a) * b)
    out.sum().backward()
    expected = torch.autograd.grad((torch.nn.functional.silu(a) * b).sum(), (a, b))
    torch.testing.assert_close(h.grad, torch.cat(expected, dim=-1))
