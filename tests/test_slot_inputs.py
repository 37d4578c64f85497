"""The LLaVA projector slot takes only the tower's grid: a SigLIP tower (no CLS) whose
features come with one token too many is an error, never a first token dropped as if it
were a CLS."""

from __future__ import annotations

import pytest
import torch

import flexproj
from flexproj.testing import tiny_vlm


@pytest.mark.parametrize("family", ["llava", "llava_siglip"])
def test_one_token_over_the_grid(family):
    model, processor = tiny_vlm(family, vision_feature_select_strategy="full")
    flexproj.patch(model, processor, tokens=4)
    slot = model.model.multi_modal_projector
    width = model.config.vision_config.hidden_size
    features = torch.randn(2, slot.side**2 + 1, width)
    if slot.has_cls:  # CLIP under "full": the CLS is first, dropped explicitly
        with torch.no_grad():
            out = slot(features)
        expected = flexproj.get_projector(model)(features[:, 1:], tokens=4, grid=(slot.side,) * 2)
        assert torch.equal(out, expected)
    else:
        with pytest.raises(ValueError, match=rf"expected the {slot.side}x{slot.side} grid"):
            slot(features)
