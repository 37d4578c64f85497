"""The budget travels with the inputs (flexproj.carried): a patched processor returns each
image's budget under ``flexproj_budgets``, and the model reads it there, through
collating, slicing, re-padding and ``generate``'s expansion. Nothing is keyed by token
ids, so inputs with equal ids built at different per-image budgets are told apart."""

from __future__ import annotations

import threading

import pytest
import torch
from test_conformance import SIZES, logits, patched, texts

import flexproj
from flexproj.carried import BUDGETS_KEY, collate
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images

CONCATENABLE = ["llava", "internvl", "qwen2_5_vl"]  # pixel_values concatenate across batches


def _without_key(inputs) -> dict:
    return {k: v for k, v in inputs.items() if k != BUDGETS_KEY}


def _at(model, inputs, budgets) -> torch.Tensor:
    """Reference logits: the inputs stripped of what they carry, run inside a block."""
    with flexproj.tokens(budgets):
        return logits(model, _without_key(inputs))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])
def test_equal_ids_at_swapped_per_image_budgets_run_at_their_own(family):
    """[4, 1] and [1, 4] give the same ids (4 + 1 = 1 + 4 contiguous placeholders); each
    built batch runs at its own budgets, also from two threads at once."""
    model, processor = patched(family)
    img = IMAGE_PLACEHOLDER[family]
    text = [f"{img} {img} what ?"]
    images = tiny_images([(64, 64), (64, 64)])
    built, expected = {}, {}
    for budgets in ([4, 1], [1, 4]):
        with flexproj.tokens(budgets):  # each run in its block before the other is built
            built[tuple(budgets)] = processor(text=text, images=images, return_tensors="pt")
            expected[tuple(budgets)] = logits(model, built[tuple(budgets)])
    a, b = built[(4, 1)], built[(1, 4)]
    if family == "llava":  # the collision: one row of ids for both
        assert torch.equal(a["input_ids"], b["input_ids"])
        for key, inputs in built.items():  # the block alone, on inputs that carry nothing
            torch.testing.assert_close(expected[key], _at(model, inputs, list(key)))
    assert not torch.allclose(expected[(4, 1)], expected[(1, 4)])
    wrong: list[tuple[int, int]] = []

    def run(key: tuple[int, int]) -> None:
        for _ in range(3):
            if not torch.allclose(logits(model, built[key]), expected[key], atol=1e-5):
                wrong.append(key)

    threads = [threading.Thread(target=run, args=(key,)) for key in built]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    torch.testing.assert_close(logits(model, a), expected[(4, 1)])  # built first, run last


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_one_image_at_4_beside_four_images_at_1(family):
    """Sample A: one image at 4; sample B: four images at 1 (as many placeholders): one
    batch runs, inside its block and outside, each sample as it runs alone."""
    model, processor = patched(family)
    img = IMAGE_PLACEHOLDER[family]
    prompts = [f"{img} what ?", f"{img}{img}{img}{img} what ?"]
    images = tiny_images([(64, 64)] * 5)
    with flexproj.tokens([4, 1, 1, 1, 1]):
        batch = processor(
            text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left"
        )
        inside = logits(model, batch)
    outside = logits(model, batch)
    for row, (prompt, imgs, budgets) in enumerate(
        [(prompts[0], images[:1], [4]), (prompts[1], images[1:], [1] * 4)]
    ):
        with flexproj.tokens(budgets):
            alone = logits(model, processor(text=[prompt], images=imgs, return_tensors="pt"))
        torch.testing.assert_close(inside[row, -1], alone[0, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outside[row, -1], alone[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_inputs_with_equal_ids_at_two_budgets(family):
    """The same prompt with a 128x64 image at 1 and a 200x40 image at 4 (equal placeholder
    counts): each runs with no block at its own budget (no false TokenCountMismatch)."""
    model, processor = patched(family)
    text = [f"{IMAGE_PLACEHOLDER[family]} what ?"]
    built = []
    for size, budget in (((128, 64), 1), ((200, 40), 4)):
        with flexproj.tokens(budget):
            inputs = processor(text=text, images=tiny_images([size]), return_tensors="pt")
        built.append((inputs, budget))
    for inputs, budget in built:
        torch.testing.assert_close(logits(model, inputs), _at(model, inputs, budget))


@pytest.mark.parametrize("family", CONCATENABLE)
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
        BUDGETS_KEY: collate([one[BUDGETS_KEY] for one, _ in built]),
    }
    for key in built[0][0]:
        if key not in ("input_ids", "attention_mask", "mm_token_type_ids", BUDGETS_KEY):
            batch[key] = torch.cat([one[key] for one, _ in built])
    if "mm_token_type_ids" in built[0][0]:
        batch["mm_token_type_ids"] = torch.stack(
            [torch.cat([one["mm_token_type_ids"][0], torch.zeros(length - len(one["mm_token_type_ids"][0]), dtype=torch.long)])
             for one, _ in built]
        )  # fmt: skip
    assert batch[BUDGETS_KEY][..., 0].tolist() == [[4, 0], [9, 1]]
    out = logits(model, batch)  # no block: each sample's budgets come from its inputs
    for row, (one, reference) in enumerate(built):
        position = one["input_ids"].shape[1] - 1  # the prompt's last token, before the answer
        torch.testing.assert_close(out[row, position], reference, rtol=1e-4, atol=1e-4)


def _per_image_batch(family):
    model, processor = patched(family)
    images = tiny_images(SIZES)
    with flexproj.tokens([4, 9, 1]):
        batch = processor(
            text=texts(family),
            images=images,
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
    alone = []
    for text, imgs, budgets in (
        (texts(family)[0], images[:1], [4]),
        (texts(family)[1], images[1:], [9, 1]),
    ):
        with flexproj.tokens(budgets):
            alone.append(processor(text=[text], images=imgs, return_tensors="pt"))
    return model, batch, alone


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_a_re_padded_batch_keeps_its_budgets(family):
    """A left-padded batch re-padded on the right runs at the same per-image budgets."""
    model, batch, _ = _per_image_batch(family)
    left = logits(model, batch)
    mask = batch["attention_mask"].bool()
    pad = int(batch["input_ids"][~mask][0])
    lengths = mask.sum(1)
    right = {**batch}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            fill = pad if key == "input_ids" else 0
            rows = [batch[key][i][mask[i]] for i in range(len(lengths))]
            right[key] = torch.stack(
                [torch.cat([r, r.new_full((mask.shape[1] - len(r),), fill)]) for r in rows]
            )
    out = logits(model, right)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[i, n - 1], left[i, -1], rtol=1e-4, atol=1e-4)


def test_a_sliced_sub_batch_keeps_its_budgets():
    """The second sample sliced out of the batch (rows and its images) runs as it does alone."""
    model, batch, alone = _per_image_batch("llava")
    second = {"input_ids": batch["input_ids"][1:], "attention_mask": batch["attention_mask"][1:],
              "pixel_values": batch["pixel_values"][1:], BUDGETS_KEY: batch[BUDGETS_KEY][1:]}  # fmt: skip
    torch.testing.assert_close(
        logits(model, second)[0, -1], logits(model, alone[1])[0, -1], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])
@pytest.mark.parametrize(
    "how",  # sampling from the top 1 is greedy, with the sampler's expansion
    [
        {"do_sample": True, "top_k": 1, "num_return_sequences": 2},
        {"num_beams": 2, "num_return_sequences": 2},
    ],
)
def test_generate_expansion_keeps_per_image_budgets(family, how):
    """num_return_sequences and beam search expand the batch: each copy keeps its sample's
    budgets (no block around the call, and inside the block that built the inputs)."""
    model, batch, alone = _per_image_batch(family)
    kwargs = {"max_new_tokens": 3, "do_sample": False, **how}
    if family == "internvl":  # its mixed-budget features are one row: refused, not wrong
        with pytest.raises(flexproj.BudgetError, match="cannot copy per sample"):
            model.generate(**batch, **kwargs)
        return
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
        with flexproj.tokens([4, 9, 1]):
            inside = model.generate(**batch, **kwargs)
        assert torch.equal(out, inside)
        start = batch["input_ids"].shape[1]
        for row, one in enumerate(alone):
            ref = model.generate(**one, **kwargs)[:, one["input_ids"].shape[1] :]
            assert torch.equal(out[2 * row : 2 * row + 2, start:], ref)
