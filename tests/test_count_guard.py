"""The placeholder/feature guard in both directions: inputs built at a small budget and
run at a larger one (fewer placeholders than features) are refused as surely as the
reverse (tests/test_conformance.py), whatever transformers' own check is set to: inputs
that carry their budget by the block's check, inputs stripped of it by the count guard."""

from __future__ import annotations

import pytest
import torch

import flexproj
from flexproj.testing import FAMILIES, IMAGE_PLACEHOLDER, tiny_images, tiny_vlm


@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_placeholders_than_features_raise(family, monkeypatch):
    model, processor = tiny_vlm(family)
    flexproj.patch(model, processor, tokens=9)
    text = f"{IMAGE_PLACEHOLDER[family]} what color is the circle ?"
    with flexproj.tokens(1):
        inputs = processor(text=[text], images=tiny_images([(64, 64)]), return_tensors="pt")
    stripped = {k: v for k, v in inputs.items() if k != "flexproj_budgets"}
    for env in ("0", "1"):
        monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", env)
        for given, says in ((inputs, "built at \\[1\\]"), (stripped, "produces")):
            refused = pytest.raises(flexproj.TokenCountMismatch, match=says)
            with flexproj.tokens(9), refused, torch.no_grad():
                model(**given)
            refused = pytest.raises(flexproj.TokenCountMismatch, match=says)
            with flexproj.tokens(9), refused:
                model.generate(**given, max_new_tokens=1, do_sample=False)
