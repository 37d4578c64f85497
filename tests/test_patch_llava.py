"""flexproj.patch on LLaVA-1.5 (CLIP/default and SigLIP/full), LLaVA-NeXT and OneVision:
tiny real models driven through forward and generate with their real processors."""

import threading

import pytest
import torch

import flexproj
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

FAMILIES = ["llava", "llava_siglip", "llava_next", "llava_onevision"]
BUDGETS = [4, 9, 16]  # the tiny towers have an 8x8 grid (64 native tokens per image/crop)
IMAGE_SIZES = [(64, 96), (96, 64)]  # (width, height): different crop layouts for AnyRes


def build(family, seed=0):
    model, processor = tiny_vlm(family, seed=seed)
    texts = [
        f"{IMAGE_PLACEHOLDER[family]} what color is the circle ?",
        f"{IMAGE_PLACEHOLDER[family]} how many",
    ]
    return model, processor, texts


def encode(processor, texts):
    return processor(text=texts, images=tiny_images(IMAGE_SIZES), return_tensors="pt", padding=True)


def placeholders(model, inputs):
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


class ProjectorOutputs:
    """Records the (crops, n, D) shapes the patched projector slot returns."""

    def __init__(self, model):
        self.shapes = []
        slot = model.model.multi_modal_projector
        self.handle = slot.register_forward_hook(lambda m, i, o: self.shapes.append(tuple(o.shape)))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_at_three_budgets(family):
    model, processor, texts = build(family)
    with torch.no_grad():
        stock_counts = placeholders(model, encode(processor, texts))
    flexproj.patch(model, processor, tokens=16)
    recorder = ProjectorOutputs(model)
    counts = {}
    for n in BUDGETS:
        with flexproj.tokens(n):
            inputs = encode(processor, texts)
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        counts[n] = placeholders(model, inputs)
        # every crop was pooled to the budget's grid (n is a square here)
        _, tokens_per_crop, width = recorder.shapes[-1]
        assert tokens_per_crop == n and width == model.config.text_config.hidden_size
    recorder.close()
    if family in ("llava", "llava_siglip"):
        assert counts == {n: [n, n] for n in BUDGETS}
    else:
        # AnyRes: base crop + stitched crops + newlines; grows with the budget
        assert counts[4][0] < counts[9][0] < counts[16][0]
    # with a budget equal to the native grid the placeholder count is the stock one
    with flexproj.tokens(64):
        assert placeholders(model, encode(processor, texts)) == stock_counts


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_non_square_budget_uses_target_grid(family):
    model, processor, texts = build(family)
    flexproj.patch(model, processor, tokens=16)
    recorder = ProjectorOutputs(model)
    with flexproj.tokens(20), torch.no_grad():  # 20 tokens on an 8x8 grid -> 4x4
        model(**encode(processor, texts))
    assert recorder.shapes[-1][1] == 16
    recorder.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_loss_and_gradient_reaches_only_the_projector(family):
    model, processor, texts = build(family)
    flexproj.patch(model, processor, tokens=9)
    model.requires_grad_(False)
    projector = flexproj.get_projector(model)
    projector.requires_grad_(True)
    model.train()
    inputs = encode(processor, texts)
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads, "no gradient at all"
    assert all("multi_modal_projector.projector." in name for name in grads)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert {id(p) for p in projector.parameters()} == {
        id(p) for name, p in model.named_parameters() if name in grads
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_logits_exactly(family):
    model, processor, texts = build(family)
    stock_inputs = encode(processor, texts)
    original = model.model.multi_modal_projector
    with torch.no_grad():
        before = model(**stock_inputs).logits
    flexproj.patch(model, processor, tokens=4)
    assert model.model.multi_modal_projector is not original
    flexproj.unpatch(model)
    assert model.model.multi_modal_projector is original
    assert "get_placeholder_mask" not in vars(model.model)
    assert "replace_image_token" not in vars(processor)
    assert not flexproj.is_patched(model)
    after_inputs = encode(processor, texts)  # the processor counts as stock again
    assert torch.equal(after_inputs["input_ids"], stock_inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**after_inputs).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model, processor, texts = build(family)
    flexproj.patch(model, processor, tokens=9)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in flexproj.get_projector(model).parameters():
            p.add_(torch.randn_like(p))  # make the weights differ from a fresh init
    flexproj.save_pretrained(model, tmp_path / "proj")
    with flexproj.tokens(4), torch.no_grad():
        expected = model(**encode(processor, texts)).logits

    fresh, fresh_processor, _ = build(family)
    flexproj.from_pretrained(fresh, tmp_path / "proj", fresh_processor)
    assert flexproj.patch_info(fresh).default_tokens == 9
    with flexproj.tokens(4), torch.no_grad():
        got = fresh(**encode(fresh_processor, texts)).logits
    assert torch.equal(got, expected)


def test_from_pretrained_replaces_a_patched_projector(tmp_path):
    model, processor, texts = build("llava")
    flexproj.patch(model, processor, tokens=9)
    flexproj.save_pretrained(model, tmp_path / "a")
    other, other_processor, _ = build("llava", seed=1)
    flexproj.patch(other, other_processor, tokens=4)
    flexproj.from_pretrained(other, tmp_path / "a")
    assert flexproj.patch_info(other).default_tokens == 4  # kept
    assert torch.equal(
        flexproj.get_projector(other).mlp.w3.weight, flexproj.get_projector(model).mlp.w3.weight
    )
    # the processor patched before is still patched for the new projector
    assert placeholders(other, encode(other_processor, texts)) == [4, 4]


def test_mismatch_error_names_both_counts():
    model, processor, texts = build("llava")
    flexproj.patch(model, processor, tokens=16)
    with flexproj.tokens(9):
        inputs = encode(processor, texts)
    with (
        flexproj.tokens(4),
        pytest.raises(
            flexproj.TokenCountMismatch,
            match=r"carry 18 image placeholder tokens but the patched model produces 8",
        ),
    ):
        model(**inputs)


def test_unpatched_processor_with_patched_model_is_a_mismatch():
    model, processor, texts = build("llava")
    flexproj.patch(model, tokens=16)
    with pytest.raises(flexproj.TokenCountMismatch, match=r"carry 128 .* produces 32"):
        model(**encode(processor, texts))


def test_budgets_in_two_threads_do_not_leak():
    model, processor, texts = build("llava")
    flexproj.patch(model, processor, tokens=16)
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(n):
        try:
            with flexproj.tokens(n):
                barrier.wait()
                inputs = encode(processor, texts)
                barrier.wait()
                with torch.no_grad():
                    model(**inputs)
                results[n] = placeholders(model, inputs)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (4, 36)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {4: [4, 4], 36: [36, 36]}


def test_default_budget_and_nested_blocks():
    model, processor, texts = build("llava")
    flexproj.patch(model, processor, tokens=16)
    assert placeholders(model, encode(processor, texts)) == [16, 16]
    with flexproj.tokens(9):
        with flexproj.tokens(4):
            assert placeholders(model, encode(processor, texts)) == [4, 4]
        assert placeholders(model, encode(processor, texts)) == [9, 9]


def test_default_budget_when_none_given_is_capped_at_native():
    model, processor, _ = build("llava")
    flexproj.patch(model, processor)
    assert flexproj.patch_info(model).default_tokens == 64  # min(144, native 64)
