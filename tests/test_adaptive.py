"""flexproj.adaptive_generate: escalate exactly the unsure samples, encode each image once,
and give a batch the answers its samples get alone; every family, both projector modes."""

from __future__ import annotations

import itertools

import pytest
import torch

import flexproj
from flexproj.testing import FAMILIES, IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

LADDER = (1, 4, 16)
SIZES = [(64, 96), (96, 64), (64, 64), (96, 96)]  # (width, height)


def setup(family: str, mode: str):
    model, processor = tiny_vlm(family)
    model.eval()
    flexproj.patch(model, processor, tokens=16, projector="stock" if mode == "stock" else None)
    img = IMAGE_PLACEHOLDER[family]
    texts = [f"{img} what color ?", f"{img} and {img} how many ?", f"{img} where is it ?"]
    return model, processor, texts, tiny_images(SIZES)


def run(model, processor, texts, images, threshold):
    return flexproj.adaptive_generate(
        model, processor, text=texts, images=images, budgets=LADDER, threshold=threshold,
        max_new_tokens=3,
    )  # fmt: skip


def split_threshold(confidences: list[float]) -> float:
    """A threshold halfway between two first-rung confidences: some samples pass, some not."""
    ordered = sorted(confidences)
    gaps = [(b - a, (a + b) / 2) for a, b in itertools.pairwise(ordered)]
    return max(gaps)[1]


@pytest.mark.parametrize("mode", ["flex", "stock"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_sample_escalates_exactly_when_unsure(family, mode):
    model, processor, texts, images = setup(family, mode)
    full = run(model, processor, texts, images, threshold=1.0)  # every sample climbs the ladder
    assert [[b for b, _ in h] for h in full.history] == [list(LADDER)] * 3
    threshold = split_threshold([h[0][1] for h in full.history])
    got = run(model, processor, texts, images, threshold)
    for i, steps in enumerate(got.history):
        visited = len(steps)
        for _, conf in steps[:-1]:
            assert conf < threshold  # left a rung only when unsure
        last_budget, last_conf = steps[-1]
        assert last_conf >= threshold or last_budget == LADDER[-1]
        # the rungs it went through are the full run's, answers included
        assert [b for b, _ in steps] == list(LADDER[:visited])
        for (_, c), (_, c_full) in zip(steps, full.history[i]):
            assert c == pytest.approx(c_full, abs=1e-4)
        assert got.budgets[i] == last_budget and got.confidences[i] == last_conf
    assert min(len(h) for h in got.history) == 1 < max(len(h) for h in got.history)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tower_encodes_each_image_once_across_rungs(family):
    model, processor, texts, images = setup(family, "flex")
    tower = flexproj.registry.adapter_for(model).vision_tower(model)
    # the patch embedding: it runs when (and only when) the tower encodes pixels
    embed = next(m for name, m in tower.named_modules() if "embed" in name)
    runs = []
    embed.register_forward_hook(lambda m, i, o: runs.append(1))
    out = run(model, processor, texts, images, threshold=1.0)  # three rungs for every sample
    assert out.budgets == [LADDER[-1]] * 3
    first = out.images_encoded
    assert first > 0 and out.images_reused == 2 * first  # rungs 2 and 3 reuse every image
    calls_per_encode = len(runs)
    runs.clear()
    with flexproj.tokens(LADDER[0]):  # one plain call encodes the same images once
        groups = [images[:1], images[1:3], images[3:]]  # as setup's prompts hold them
        inputs = processor(text=texts, images=flexproj.registry.adapter_for(model).processor_images(groups),
                           return_tensors="pt", padding=True, padding_side="left")  # fmt: skip
        model.generate(**inputs, max_new_tokens=1)
    assert calls_per_encode == len(runs)  # the ladder ran the tower as often as one call


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_results_equal_per_sample_results(family):
    model, processor, texts, images = setup(family, "flex")
    full = run(model, processor, texts, images, threshold=1.0)
    threshold = split_threshold([h[0][1] for h in full.history])
    batch = run(model, processor, texts, images, threshold)
    groups = [images[:1], images[1:3], images[3:]]
    for i, (text, group) in enumerate(zip(texts, groups)):
        alone = run(model, processor, [text], group, threshold)
        assert alone.budgets[0] == batch.budgets[i]
        assert torch.equal(alone.sequences[0], batch.sequences[i])
        assert alone.confidences[0] == pytest.approx(batch.confidences[i], abs=1e-4)


def test_bad_ladders_and_image_counts_are_budget_errors():
    model, processor, texts, images = setup("llava", "flex")
    for ladder in [(4, 1), (4, 4), ()]:
        with pytest.raises(flexproj.BudgetError, match="increasing"):
            flexproj.adaptive_generate(model, processor, text=texts, images=images, budgets=ladder)
    with pytest.raises(flexproj.BudgetError, match="4 image placeholders but 3 images"):
        flexproj.adaptive_generate(model, processor, text=texts, images=images[:3])
    with pytest.raises(flexproj.BudgetError, match="threshold"):
        flexproj.adaptive_generate(model, processor, text=texts, images=images, threshold=2)
