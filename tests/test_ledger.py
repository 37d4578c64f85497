"""The patched processor's record of how inputs were built (flexproj.family.InputsLedger):
samples are recognised one by one, so a batch collated from separately processed samples
with answers appended (a training batch) runs at each sample's own budgets."""

from __future__ import annotations

import pytest
import torch
from test_conformance import SIZES, logits, patched, texts

import flexproj
from flexproj.testing import tiny_images


@pytest.mark.parametrize("family", ["llava", "internvl", "qwen2_5_vl"])  # concatenable pixels
def test_a_batch_collated_from_separately_built_samples_keeps_their_budgets(family):
    """As a training batch is built: each sample through the processor alone (its own
    per-image budgets), an answer appended, right-padded and stacked; run with no block."""
    model, processor = patched(family)
    images = tiny_images(SIZES)
    samples = [(texts(family)[0], images[:1], [4]), (texts(family)[1], images[1:], [9, 1])]
    answer = processor.tokenizer(" red", add_special_tokens=False, return_tensors="pt")["input_ids"]
    built = []
    for text, imgs, budgets in samples:
        with flexproj.tokens(budgets):
            one = processor(text=[text], images=imgs, return_tensors="pt")
            reference = logits(model, one)[0, -1]  # the sample alone, at its budgets
        built.append((one, reference))
    rows = [torch.cat([one["input_ids"][0], answer[0]]) for one, _ in built]
    length = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    batch = {
        "input_ids": torch.stack(
            [torch.cat([r, r.new_full((length - len(r),), pad)]) for r in rows]
        ),
        "attention_mask": torch.stack(
            [torch.cat([torch.ones_like(r), r.new_zeros(length - len(r))]) for r in rows]
        ),
    }
    for key in built[0][0]:
        if key not in ("input_ids", "attention_mask", "mm_token_type_ids"):
            batch[key] = torch.cat([one[key] for one, _ in built])
    if "mm_token_type_ids" in built[0][0]:
        batch["mm_token_type_ids"] = torch.stack(
            [torch.cat([one["mm_token_type_ids"][0], torch.zeros(length - len(one["mm_token_type_ids"][0]), dtype=torch.long)])
             for one, _ in built]
        )  # fmt: skip
    out = logits(model, batch)  # no block: each sample's budgets come from the ledger
    for row, (one, reference) in enumerate(built):
        position = one["input_ids"].shape[1] - 1  # the prompt's last token, before the answer
        torch.testing.assert_close(out[row, position], reference, rtol=1e-4, atol=1e-4)
