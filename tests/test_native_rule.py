"""The native-budget rule (``flexproj.patch(..., native="stock")``), every family.

Where the LLM was not trained with the FlexProjector (distilled or align-stage
projectors), an image at its stock token count runs the stock projector: the converted
model is the stock model there, bit for bit; below it the FlexProjector runs, image by
image in a per-image budget list.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import flexproj
from flexproj.registry import adapter_for
from flexproj.testing import FAMILIES, IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

pytestmark = pytest.mark.parametrize("family", FAMILIES)

SIZES = [(64, 96), (96, 64), (64, 64)]
BIG = 10_000  # Qwen: every image capped at its own native grid


def texts(family: str) -> list[str]:
    img = IMAGE_PLACEHOLDER[family]
    return [f"{img} what color is the circle ?", f"{img} and {img} how many shapes ?"]


@functools.cache
def adapter(family: str):
    return adapter_for(tiny_vlm(family)[0])


def grouped(family: str, images: list) -> list:
    """``images`` split over :func:`texts`' samples (1, then 2), as the processor takes them."""
    return adapter(family).processor_images([images[:1], images[1:]])


def encode(processor, family: str, sizes=SIZES, text=None):
    return processor(
        text=text or texts(family),
        images=grouped(family, tiny_images(sizes)),
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )


def one(family: str, images: list) -> list:
    """One sample's images as the processor takes them."""
    return adapter(family).processor_images([images])


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def converted(family: str, native: str):
    """A patched tiny model whose FlexProjector differs from a fresh init and the stock path."""
    model, processor = tiny_vlm(family)
    model.eval()
    stock_inputs = encode(processor, family)
    expected = logits(model, stock_inputs)
    flexproj.patch(model, processor, native=native)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flexproj.get_projector(model).parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return model, processor, stock_inputs, expected


def native_budget(model) -> int:
    """The stock token count per unit (what flexproj.patch(projector="stock") calls native)."""
    count = adapter_for(model).native_tokens(model, "stock")
    return BIG if count is None else count  # Qwen: None, each image its own


def test_native_stock_is_the_stock_model_at_the_native_budget(family):
    model, processor, stock_inputs, expected = converted(family, "stock")
    assert flexproj.patch_info(model).native == "stock"
    with flexproj.tokens(native_budget(model)):
        inputs = encode(processor, family)
        got = logits(model, inputs)
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # generate too (the inputs carry their budget)
    with flexproj.disabled(model):
        stock_out = model.generate(**stock_inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), stock_out)


def test_without_the_rule_the_projector_runs_at_the_native_budget(family):
    """The default (native="projector"): the FlexProjector runs there, so the logits differ
    from the stock model's (the rule above is what makes them equal)."""
    model, processor, _, expected = converted(family, "projector")
    assert flexproj.patch_info(model).native == "projector"
    with flexproj.tokens(native_budget(model)):
        got = logits(model, encode(processor, family))
    assert got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-3)


def test_below_the_native_budget_the_projector_runs(family):
    model, processor, _, _ = converted(family, "stock")
    with flexproj.tokens(4):
        inputs = encode(processor, family)
        with_rule = logits(model, inputs)
    flexproj.unpatch(model)
    other, _, _, _ = converted(family, "projector")  # same seeds: the same projector weights
    with flexproj.tokens(4):
        torch.testing.assert_close(logits(other, inputs), with_rule, rtol=0, atol=0)


def test_a_per_image_list_mixing_native_and_smaller_budgets(family):
    """One batch, image 1 at its native budget and images 2-3 below: each sample gives what
    it gives alone, and the native-budget sample gives the stock model's answer."""
    model, processor, _, _ = converted(family, "stock")
    native = native_budget(model)
    images = tiny_images(SIZES)
    with flexproj.tokens([native, 4, native]):
        batch = encode(processor, family)
        batch_logits = logits(model, batch)
    per_sample = [
        (texts(family)[0], images[:1], [native]),
        (texts(family)[1], images[1:], [4, native]),
    ]
    for row, (text, imgs, budgets) in enumerate(per_sample):
        with flexproj.tokens(budgets):
            alone = processor(text=[text], images=one(family, imgs), return_tensors="pt")
            alone_logits = logits(model, alone)
        torch.testing.assert_close(batch_logits[row, -1], alone_logits[0, -1], rtol=1e-4, atol=1e-4)
        if row == 0:  # all at native: the stock model on this sample
            with flexproj.disabled(model):
                stock = processor(text=[text], images=one(family, imgs), return_tensors="pt")
                stock_logits = logits(model, stock)
            torch.testing.assert_close(alone_logits, stock_logits, rtol=0, atol=0)
        else:  # image 2 at 4 tokens ran the FlexProjector: not the stock model
            with flexproj.disabled(model):
                stock = processor(text=[text], images=one(family, imgs), return_tensors="pt")
            assert stock["input_ids"].shape != alone["input_ids"].shape


def test_the_rule_is_saved_and_loaded_with_the_projector(family, tmp_path):
    model, _, _, expected = converted(family, "stock")
    flexproj.save_pretrained(model, tmp_path / "p")
    fresh, fresh_processor = tiny_vlm(family)
    flexproj.from_pretrained(fresh.eval(), tmp_path / "p", fresh_processor)
    assert flexproj.patch_info(fresh).native == "stock"
    with flexproj.tokens(native_budget(fresh)):
        got = logits(fresh, encode(fresh_processor, family))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    again, again_processor = tiny_vlm(family)
    flexproj.from_pretrained(again, tmp_path / "p", again_processor, native="projector")
    assert flexproj.patch_info(again).native == "projector"


def test_a_wrong_rule_is_one_error(family):
    model, processor = tiny_vlm(family)
    with pytest.raises(flexproj.PatchError, match="native must be one of"):
        flexproj.patch(model, processor, native="yes")
    assert not flexproj.is_patched(model)


def test_a_budget_between_the_largest_trained_and_native_is_warned_about_once(family, tmp_path):
    model, _, _, _ = converted(family, "stock")
    schedule = {"tokens": [4], "weights": [1.0], "seed": 0, "per_sample": False}
    flexproj.save_pretrained(model, tmp_path / "p", schedule=schedule)
    fresh, fresh_processor = tiny_vlm(family)
    flexproj.from_pretrained(fresh.eval(), tmp_path / "p", fresh_processor)
    with flexproj.tokens(4), warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained budget: no warning
        logits(fresh, encode(fresh_processor, family))
    with flexproj.tokens(9), pytest.warns(UserWarning, match="above the largest budget") as caught:
        logits(fresh, encode(fresh_processor, family))
        logits(fresh, encode(fresh_processor, family))
    assert len([w for w in caught if "above the largest" in str(w.message)]) == 1
