"""LLaVA-1.5 (CLIP and SigLIP towers) served by vLLM with the flexproj plug-in equals the
patched transformers model."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import greedy, hf_greedy, request

from flexproj.testing import tiny_images

PROMPT = "<image> what color is the circle ?"
IMAGES = tiny_images([(64, 64), (64, 96), (96, 80)], seed=1)


@pytest.fixture(scope="module", params=["llava", "llava_siglip"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_mixed_budgets_in_one_call_equal_transformers(
    llm: Any, exported: dict, family: str
) -> None:
    model, processor, _ = exported[family]
    cases = [(1, 0), (4, 1), (9, 2), (16, 0), (36, 1), (64, 2), (25, 0)]  # (budget, image)
    outs = llm.generate([request(PROMPT, IMAGES[i], n) for n, i in cases], greedy())
    for (n, i), out in zip(cases, outs):
        want = hf_greedy(model, processor, PROMPT, [IMAGES[i]], n)
        side = int(n**0.5)
        assert out.prompt_token_ids.count(4) == side * side, n  # image placeholders
        assert list(out.outputs[0].token_ids) == want, f"budget {n}, image {i}"


def test_default_budget_is_the_checkpoints(llm: Any, exported: dict, family: str) -> None:
    model, processor, _ = exported[family]
    (out,) = llm.generate([request(PROMPT, IMAGES[0], None)], greedy())
    assert out.prompt_token_ids.count(4) == 16  # saved with tokens=16
    assert list(out.outputs[0].token_ids) == hf_greedy(model, processor, PROMPT, [IMAGES[0]], 16)


def test_two_images_one_prompt(llm: Any, exported: dict, family: str) -> None:
    model, processor, _ = exported[family]
    prompt = "<image> <image> which shape is larger ?"
    images = [IMAGES[0], IMAGES[2]]
    (out,) = llm.generate([request(prompt, images, 9)], greedy())
    assert out.prompt_token_ids.count(4) == 18
    assert list(out.outputs[0].token_ids) == hf_greedy(model, processor, prompt, images, 9)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (0, "positive int"),
        (65, "exceeds this model's native 64"),
        ("16", "positive int"),
        (2.5, "positive int"),
        (True, "positive int"),
    ],
)
def test_bad_budget_fails_that_request_and_the_engine_serves_on(
    llm: Any, exported: dict, family: str, bad: object, message: str
) -> None:
    model, processor, _ = exported[family]
    with pytest.raises(ValueError, match=message):
        llm.generate([request(PROMPT, IMAGES[0], bad)], greedy())  # type: ignore[arg-type]
    (out,) = llm.generate([request(PROMPT, IMAGES[1], 4)], greedy())
    assert list(out.outputs[0].token_ids) == hf_greedy(model, processor, PROMPT, [IMAGES[1]], 4)


def test_processor_cache_hit_keeps_the_budget(llm: Any, exported: dict, family: str) -> None:
    """Regression: a repeated image+budget is served from vLLM's processor cache, where the
    prompt-update hook sees no items (it used to raise KeyError 'Modality image not found')."""
    model, processor, _ = exported[family]
    want = hf_greedy(model, processor, PROMPT, [IMAGES[2]], 9)
    for _ in range(2):
        (out,) = llm.generate([request(PROMPT, IMAGES[2], 9)], greedy())
        assert list(out.outputs[0].token_ids) == want
    (out,) = llm.generate([request(PROMPT, IMAGES[2], 4)], greedy())  # same image, new budget
    assert out.prompt_token_ids.count(4) == 4
    assert list(out.outputs[0].token_ids) == hf_greedy(model, processor, PROMPT, [IMAGES[2]], 4)
