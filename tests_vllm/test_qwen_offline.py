"""Qwen2-VL and Qwen2.5-VL served by vLLM with the flexproj plug-in equals the patched transformers model:
non-square images (M-RoPE on the pooled grid), mixed budgets in one call, capping."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import greedy, hf_greedy, request

from flexproj import target_grid
from flexproj.testing import tiny_images

PROMPT = "<|vision_start|><|image_pad|><|vision_end|> what color is the circle ?"
# (width, height), multiples of 16 px: no resizing, so every image processor agrees
IMAGES = tiny_images([(64, 64), (96, 64), (64, 112), (128, 48)], seed=1)
IMAGE_PAD = 8  # <|image_pad|> in the tiny vocabulary
GRIDS = [(4, 4), (4, 6), (7, 4), (3, 8)]  # merged (rows, cols): one unit per 16x16 px


def placeholders(tokens: int, image: int) -> int:
    h, w = target_grid(tokens, GRIDS[image])  # capped at the native grid
    return h * w


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_mixed_budgets_non_square_equal_transformers(llm: Any, exported: dict, family: str) -> None:
    model, processor, _ = exported[family]
    cases = [(4, 0), (6, 1), (12, 1), (16, 2), (1, 2), (100, 2), (8, 3), (24, 3), (16, 0)]
    assert placeholders(100, 2) == 28 and placeholders(12, 1) == 6  # capped; aspect kept
    outs = llm.generate([request(PROMPT, IMAGES[i], n) for n, i in cases], greedy())
    for (n, i), out in zip(cases, outs):
        assert out.prompt_token_ids.count(IMAGE_PAD) == placeholders(n, i), (n, i)
        want = hf_greedy(model, processor, PROMPT, [IMAGES[i]], n)
        assert list(out.outputs[0].token_ids) == want, f"budget {n}, image {i}"


def test_default_budget_and_two_images(llm: Any, exported: dict, family: str) -> None:
    model, processor, _ = exported[family]
    (out,) = llm.generate([request(PROMPT, IMAGES[1], None)], greedy())
    assert out.prompt_token_ids.count(IMAGE_PAD) == placeholders(16, 1) == 15  # default 16: 3x5
    assert list(out.outputs[0].token_ids) == hf_greedy(model, processor, PROMPT, [IMAGES[1]], 16)
    prompt = PROMPT.replace("what", "<|vision_start|><|image_pad|><|vision_end|> what")
    images = [IMAGES[2], IMAGES[3]]
    (out,) = llm.generate([request(prompt, images, 6)], greedy())
    assert list(out.outputs[0].token_ids) == hf_greedy(model, processor, prompt, images, 6)


@pytest.mark.parametrize("bad", [0, -3, "8", 1.5])
def test_bad_budget_fails_that_request_only(
    llm: Any, exported: dict, family: str, bad: object
) -> None:
    model, processor, _ = exported[family]
    with pytest.raises(ValueError, match="must be a positive int"):
        llm.generate([request(PROMPT, IMAGES[0], bad)], greedy())  # type: ignore[arg-type]
    (out,) = llm.generate([request(PROMPT, IMAGES[3], 9)], greedy())
    assert list(out.outputs[0].token_ids) == hf_greedy(model, processor, PROMPT, [IMAGES[3]], 9)
