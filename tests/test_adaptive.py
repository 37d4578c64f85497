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
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True,
                           padding_side="left")  # fmt: skip
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
        flexproj.adaptive_generate(model, processor, text=texts, images=images[:3], budgets=LADDER)
    with pytest.raises(flexproj.BudgetError, match="threshold"):
        flexproj.adaptive_generate(
            model, processor, text=texts, images=images, budgets=LADDER, threshold=2
        )


def test_bad_arguments_are_budget_errors_before_anything_runs():
    model, processor, texts, images = setup("llava", "flex")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for budgets in (None, 16, "1,4"):
        with pytest.raises(flexproj.BudgetError, match="sequence of positive ints"):
            flexproj.adaptive_generate(model, processor, text=texts, images=images, budgets=budgets)
    for threshold in ("0.5", None, True, float("nan")):
        with pytest.raises(flexproj.BudgetError, match="threshold"):
            flexproj.adaptive_generate(
                model, processor, text=texts, images=images, budgets=LADDER, threshold=threshold
            )
    # native is 64 per image: a rung of 65 fails up front, not when a sample climbs to it
    with pytest.raises(flexproj.BudgetError, match="65 vision tokens per image exceeds"):
        flexproj.adaptive_generate(
            model, processor, text=texts, images=images, budgets=(1, 65), threshold=0.0
        )
    assert calls == []


def test_answer_confidence_is_the_smallest_chosen_probability_before_the_stop():
    from flexproj.adaptive import answer_confidence

    # two answers, three positions, a vocabulary of 3; token 2 stops
    probs = torch.tensor(
        [
            [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],  # chooses 0, 1, then 2 (stop)
            [[0.2, 0.5, 0.3], [0.05, 0.05, 0.9], [0.9, 0.05, 0.05]],  # 1, stop, then padding 0
        ]
    )
    generated = torch.tensor([[0, 1, 2], [1, 2, 0]])
    got = answer_confidence(list(probs.log().unbind(1)), generated, stop_ids=[2])
    # by hand: min(0.7, 0.8, 0.4) and min(0.5, 0.9) (the 0.9 after the stop does not count)
    torch.testing.assert_close(got, torch.tensor([0.4, 0.5]))


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_the_cache_tells_images_of_one_shape_apart_by_their_pixels(family):
    """Two images of the same size in one block: each gets its own tower output (a key
    without the pixel bytes would answer the second with the first's)."""
    from flexproj.encoder_cache import vision_cache

    model, processor, _, _ = setup(family, "flex")
    tower = flexproj.registry.adapter_for(model).vision_tower(model)
    a, b = (processor.image_processor(images=[im], return_tensors="pt")["pixel_values"]
            for im in tiny_images([(64, 64), (64, 64)], seed=3)[:2])  # fmt: skip
    a, b = a.flatten(0, -4)[:1], b.flatten(0, -4)[:1]  # (1, 3, S, S): one image or crop
    assert a.shape == b.shape and not torch.equal(a, b)
    with torch.no_grad():
        expected = [tower(pixel_values=x).last_hidden_state for x in (a, b)]
        with vision_cache(model) as cache:
            first = [tower(pixel_values=x).last_hidden_state for x in (a, b)]
            again = [tower(pixel_values=x).last_hidden_state for x in (a, b)]
    assert cache.computed == 2 and cache.reused == 2
    for got in (first, again):
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e)


def test_threads_running_adaptive_generate_leave_the_tower_as_patched():
    """Four threads on one model: each block's cache is its own; afterwards plain calls are
    not cached, follow the tower's weights, and unpatch leaves the tower stock."""
    import threading

    model, processor, texts, images = setup("llava", "flex")
    tower = flexproj.registry.adapter_for(model).vision_tower(model)
    alone = run(model, processor, texts, images, threshold=1.0)
    patched_attrs = set(vars(tower))  # (after a first call: transformers adds its own)
    barrier, results, errors = threading.Barrier(4), [], []

    def work() -> None:
        try:
            barrier.wait()
            results.append(run(model, processor, texts, images, threshold=1.0))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for out in results:
        assert all(torch.equal(x, y) for x, y in zip(out.sequences, alone.sequences, strict=True))
        assert out.images_encoded == alone.images_encoded  # nothing shared between threads
    assert set(vars(tower)) == patched_attrs  # no cache left on the tower
    pixels = processor.image_processor(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        before = tower(pixel_values=pixels).last_hidden_state
        for p in tower.parameters():
            p.add_(0.5)
        after = tower(pixel_values=pixels).last_hidden_state  # not answered from a cache
    assert not torch.allclose(before, after)
    flexproj.unpatch(model)
    assert "forward" not in vars(tower)
