"""flexproj.patch on Qwen2-VL, Qwen2.5-VL and Qwen3-VL: N tokens per image / temporal patch.

Tiny geometry (see flexproj.testing.tiny_models): patch 8, merge 2, so one LLM token per
16x16 px. Image A is 96 wide x 64 high: patch grid 8x12, merged grid 4x6 (24 tokens).
Image B is 64 wide x 128 high: patch grid 16x8, merged grid 8x4 (32 tokens). The batch is
sample 0 = [A], sample 1 = [B, A], left-padded.

Position checks use an independent implementation of the Qwen2-VL M-RoPE definition
(:func:`expected_mrope`), applied to the grids the pooled model should present.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import flexproj
from flexproj.adapters.qwen_vl import MergerPassThrough, llm_grid
from flexproj.registry import adapter_for
from flexproj.testing import IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMG = IMAGE_PLACEHOLDER["qwen2_vl"]
SIZES = [(96, 64), (64, 128)]  # (width, height): A, B
TEXTS = [
    f"user : {IMG} what is this ?",
    f"user : {IMG} and {IMG} what color is the big square on the left ?",
]
MERGED = {"A": (4, 6), "B": (8, 4)}  # native merged grids (rows, cols)
MERGE = 2

pytestmark = pytest.mark.parametrize("family", FAMILIES)


# ----------------------------------------------------------------------------- helpers


def images() -> list[list]:
    a, b = tiny_images(SIZES)
    return [[a], [b, a]]


def encode(processor, texts=TEXTS, imgs=None):
    return processor(
        text=texts, images=imgs if imgs is not None else images(), return_tensors="pt", padding=True
    )


def llm_grids(n: int) -> list[tuple[int, int, int]]:
    """LLM grids (t, h', w') of the batch's images, in order: A, B, A."""
    return [(1, *flexproj.target_grid(n, MERGED[k])) for k in ("A", "B", "A")]


def expected_mrope(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    grids: dict[int, Sequence[tuple[int, int, int]]],
    intervals: dict[int, Sequence[float]] | None = None,
) -> torch.Tensor:
    """(3, B, L) M-RoPE indices by the Qwen2-VL definition, written independently.

    Padding is skipped. A text token gets ``(p, p, p)`` and ``p += 1``. A run of vision
    tokens (id in ``grids``) takes the next LLM grid ``(t, h, w)`` of its modality and is
    laid out row-major per temporal patch: token ``(i, r, c)`` gets
    ``(p + int(i * interval), p + r, p + c)``; the next text starts at the run's largest
    index + 1 (for images, ``p + max(h, w)``). Padding positions stay 0.
    """
    out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    queues = {tok: list(g) for tok, g in grids.items()}
    steps = {tok: list(v) for tok, v in (intervals or {}).items()}
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        seq = input_ids[b][keep].tolist()
        rows: list[tuple[int, int, int]] = []
        p = i = 0
        while i < len(seq):
            tok = seq[i]
            if tok not in queues:
                rows.append((p, p, p))
                p, i = p + 1, i + 1
                continue
            t, h, w = queues[tok].pop(0)
            step = steps[tok].pop(0) if tok in steps else 1
            assert seq[i : i + t * h * w] == [tok] * (t * h * w), "run length != t*h*w"
            run = [
                (p + int(ti * step), p + r, p + c)
                for ti in range(t)
                for r in range(h)
                for c in range(w)
            ]
            rows += run
            p = max(max(x) for x in run) + 1
            i += t * h * w
        out[:, b, keep] = torch.tensor(rows).T
    assert all(not q for q in queues.values()), "grids left over"
    return out


@contextlib.contextmanager
def capture_positions(model) -> Iterator[list[torch.Tensor]]:
    """3-D position ids the language model actually receives, one entry per call."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        pos = kwargs["position_ids"]
        seen.append(pos[1:] if pos.shape[0] == 4 else pos)  # generate prepends text positions

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def masked(pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return pos[:, mask.bool()]


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, n_new: int = 2) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=n_new, do_sample=False)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("budget", [4, 16, 28])
def test_generate_counts_and_positions(family, budget):
    model, processor = tiny_vlm(family)
    flexproj.patch(model, processor, tokens=budget)
    grids = llm_grids(budget)
    image_id = model.config.image_token_id
    inputs = encode(processor)

    # placeholders per sample = sum of h'*w' of its images; mm_token_type_ids follow them
    counts = [t * h * w for t, h, w in grids]
    placeholders = (inputs["input_ids"] == image_id).sum(1).tolist()
    assert placeholders == [counts[0], counts[1] + counts[2]]
    assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == image_id)
    assert inputs["attention_mask"][0, 0] == 0  # sample 0 is left-padded

    # the model produces those counts per image
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert [f.shape[0] for f in features.pooler_output] == counts
    if family == "qwen3_vl":
        for layer in features.deepstack_features:
            assert [f.shape[0] for f in layer] == counts

    expected = expected_mrope(inputs["input_ids"], inputs["attention_mask"], {image_id: grids})
    with capture_positions(model) as seen:
        out = generate(model, inputs)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
    mask = inputs["attention_mask"]
    assert torch.equal(masked(seen[0], mask), masked(expected, mask))
    # the first generated token continues after each sample's largest index (rope_deltas)
    for b in range(2):
        assert seen[1][:, b, -1].tolist() == [int(expected[:, b].max()) + 1] * 3

    pos, deltas = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=mask,
    )
    assert torch.equal(pos, expected)
    assert deltas.view(-1).tolist() == [
        int(expected[:, b].max()) + 1 - int(mask[b].sum()) for b in range(2)
    ]


def test_budget_above_native_keeps_native(family):
    model, processor = tiny_vlm(family)
    stock = encode(processor)
    flexproj.patch(model, processor, tokens=28)
    inputs = encode(processor)
    image_id = model.config.image_token_id
    # A (native 24 < 28) stays 4x6; B (native 32) pools to 7x4
    assert [llm_grid(g, 28, MERGE) for g in inputs["image_grid_thw"].tolist()] == [
        (1, 4, 6),
        (1, 7, 4),
        (1, 4, 6),
    ]
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [24, 28 + 24]
    with flexproj.tokens(10_000):  # above every image: the stock counts, nothing upsampled
        assert torch.equal(encode(processor)["input_ids"], stock["input_ids"])
        features = model.model.get_image_features(stock["pixel_values"], stock["image_grid_thw"])
        assert [f.shape[0] for f in features.pooler_output] == [24, 32, 24]


def test_native_budget_is_identity(family):
    """At each image's native merged count the pooled grid is the native grid: the same
    placeholders, rope indices, rope deltas and positions as the unpatched model."""
    model, processor = tiny_vlm(family)
    single = {"texts": [f"{IMG} what is this ?"], "imgs": [tiny_images(SIZES[:1])]}
    stock, stock_single = encode(processor), encode(processor, **single)

    def rope(inputs):
        return model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )

    stock_rope = rope(stock)
    with capture_positions(model) as seen_stock:
        generate(model, stock)

    flexproj.patch(model, processor, tokens=4)
    with flexproj.tokens(32):  # B's native count; A (24) is capped at its own
        inputs = encode(processor)
        patched_rope = rope(inputs)
        with capture_positions(model) as seen:
            generate(model, inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(inputs[key], stock[key]), key
    assert torch.equal(patched_rope[0], stock_rope[0])
    assert torch.equal(patched_rope[1], stock_rope[1])
    assert torch.equal(seen[0], seen_stock[0])

    with flexproj.tokens(24):  # one image, budget exactly its native count
        one = encode(processor, **single)
        assert torch.equal(one["input_ids"], stock_single["input_ids"])
        features = model.model.get_image_features(one["pixel_values"], one["image_grid_thw"])
        assert features.pooler_output[0].shape == (24, 64)


def test_patch_base_model(family):
    """The ``*Model`` base (no LM head) is accepted too."""
    model, processor = tiny_vlm(family)
    base = model.model
    flexproj.patch(base, processor, tokens=16)
    inputs = encode(processor)
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
    assert hidden.shape == (*inputs["input_ids"].shape, 64)
    flexproj.unpatch(base)


@pytest.mark.parametrize("budget", [16, 32])
def test_pooling_layout(family, budget):
    """Patched features = project(avg-pool of the row-major patch grid), from an
    independent reconstruction of the tower's block-major (and windowed) order."""
    model, processor = tiny_vlm(family)
    inputs = encode(processor)
    pixel_values, grid_thw = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        stock = model.model.get_image_features(pixel_values, grid_thw)
        tower = model.model.visual(pixel_values, grid_thw=grid_thw).last_hidden_state
    if family == "qwen2_5_vl":  # undo the window permutation (per merged unit of 4 patches)
        from transformers.vision_utils import get_vision_window_index

        vision = model.config.vision_config
        window_index, _ = get_vision_window_index(
            grid_thw, MERGE, vision.window_size, vision.patch_size
        )
        units = tower.reshape(-1, MERGE * MERGE, tower.shape[-1])
        tower = units[torch.argsort(window_index)].reshape_as(tower)

    flexproj.patch(model, processor)
    projector = flexproj.get_projector(model)
    with torch.no_grad(), flexproj.tokens(budget):
        patched = model.model.get_image_features(pixel_values, grid_thw)

    start = 0
    for i, (t, H, W) in enumerate(grid_thw.tolist()):
        rows = tower[start : start + t * H * W]
        start += t * H * W
        # block-major row k holds patch (bh*m + i, bw*m + j) for k = ((bh*W/m + bw)*m + i)*m + j
        index = torch.arange(H * W).view(H // MERGE, MERGE, W // MERGE, MERGE)
        index = index.permute(0, 2, 1, 3).reshape(-1)  # row-major index of block-major row k
        grid = torch.empty_like(rows)
        grid[index] = rows
        h, w = flexproj.target_grid(budget, (H // MERGE, W // MERGE))
        image = grid.T.reshape(1, -1, H, W)
        pooled = F.adaptive_avg_pool2d(image, (h, w)).reshape(-1, h * w).T
        with torch.no_grad():
            torch.testing.assert_close(patched.pooler_output[i], projector.project(pooled))
        if family == "qwen3_vl":  # deepstack outputs pooled on the merged grid
            for layer_stock, layer in zip(stock.deepstack_features, patched.deepstack_features):
                merged = layer_stock[i].T.reshape(1, -1, H // MERGE, W // MERGE)
                want = F.adaptive_avg_pool2d(merged, (h, w)).reshape(-1, h * w).T
                torch.testing.assert_close(layer[i], want)
                if (h, w) == (H // MERGE, W // MERGE):
                    assert torch.equal(layer[i], layer_stock[i])  # identity at the native count


# ----------------------------------------------------------------------------- model plumbing


def test_slot_signatures_and_tuple_output(family):
    model, processor = tiny_vlm(family)
    base = model.model
    before = {
        name: inspect.signature(getattr(base, name))
        for name in ("get_image_features", "get_video_features", "get_rope_index")
    }
    merger = base.visual.merger
    flexproj.patch(model, processor, tokens=16)
    assert isinstance(base.visual.merger, MergerPassThrough)
    assert any(p is flexproj.get_projector(model).norm.weight for p in model.parameters())
    for name, signature in before.items():
        assert inspect.signature(getattr(base, name)) == signature
    assert adapter_for(model).projector_dims(model) == (32, 64)
    inputs = encode(processor)
    as_tuple = base.get_image_features(
        inputs["pixel_values"], inputs["image_grid_thw"], return_dict=False
    )
    assert isinstance(as_tuple, tuple)
    as_dict = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[1], as_dict.pooler_output))
    flexproj.unpatch(model)
    assert base.visual.merger is merger
    assert not {
        "get_image_features",
        "get_video_features",
        "get_rope_index",
        "get_placeholder_mask",
    } & set(vars(base))


def test_gradient_flows_through_the_pooling_into_the_vision_tower(family):
    """(Only the projector with the rest frozen: tests/test_conformance.py.)"""
    model, processor = tiny_vlm(family)
    flexproj.patch(model, processor, tokens=16)
    model.train()
    inputs = encode(processor)
    model.requires_grad_(True)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.model.visual.blocks[-1].parameters())


# ----------------------------------------------------------------------------- videos

VIDEO_GRIDS = [[2, 8, 12], [2, 12, 8]]  # (t, H, W) patches: 4 frames each, merged 4x6 and 6x4


def video_inputs(family, processor, seed=0):
    """Batch with videos, built without a video processor (none is available offline).

    Sample 0: image A and video 0; sample 1: video 1 (left-padded). Placeholders come from
    the (patched) processor's own ``replace_*_token``; ``mm_token_type_ids`` from its
    ``create_mm_token_type_ids``.
    """
    processor.video_processor = SimpleNamespace(merge_size=MERGE, temporal_patch_size=2)
    image = processor.image_processor(tiny_images(SIZES[:1]), return_tensors="pt")
    grid = torch.tensor(VIDEO_GRIDS)
    meta = [SimpleNamespace(fps=2.0, frames_indices=[0, 1, 2, 3]) for _ in VIDEO_GRIDS]
    videos = {"video_grid_thw": grid, "video_metadata": meta}
    img = processor.replace_image_token(image, image_idx=0)
    vid = [processor.replace_video_token(videos, video_idx=i) for i in range(len(VIDEO_GRIDS))]
    if family != "qwen3_vl":  # Qwen3-VL's replacement wraps each frame itself
        vid = [f"<|vision_start|>{v}<|vision_end|>" for v in vid]
    texts = [
        f"user : <|vision_start|>{img}<|vision_end|> and {vid[0]} what is in the video ?",
        f"user : {vid[1]} describe it .",
    ]
    enc = processor.tokenizer(texts, return_tensors="pt", padding=True)
    generator = torch.Generator().manual_seed(seed)
    channels = 3 * 2 * 8 * 8  # channels * temporal patch * patch * patch
    n_patches = int(grid.prod(-1).sum())
    inputs = {
        **enc,
        "mm_token_type_ids": torch.tensor(processor.create_mm_token_type_ids(enc["input_ids"])),
        "pixel_values": image["pixel_values"],
        "image_grid_thw": image["image_grid_thw"],
        "pixel_values_videos": torch.randn(n_patches, channels, generator=generator),
        "video_grid_thw": grid,
    }
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([0.5, 0.5])  # 4 tokens/s * 0.5 s = step 2
    return inputs


@pytest.mark.parametrize("budget", [6, 16])
def test_video(family, budget):
    model, processor = tiny_vlm(family)
    flexproj.patch(model, processor, tokens=budget)
    inputs = video_inputs(family, processor)
    image_id, video_id = model.config.image_token_id, model.config.video_token_id
    vgrids = [llm_grid(g, budget, MERGE) for g in VIDEO_GRIDS]
    igrids = [llm_grid(g, budget, MERGE) for g in inputs["image_grid_thw"].tolist()]
    vcounts = [t * h * w for t, h, w in vgrids]
    assert (inputs["input_ids"] == video_id).sum(1).tolist() == vcounts
    features = model.model.get_video_features(
        inputs["pixel_values_videos"], inputs["video_grid_thw"]
    )
    assert [f.shape[0] for f in features.pooler_output] == vcounts
    if family == "qwen3_vl":
        for layer in features.deepstack_features:
            assert [f.shape[0] for f in layer] == vcounts

    if family == "qwen3_vl":  # timestamps split a video into one (1, h', w') run per frame
        runs = [(1, h, w) for t, h, w in vgrids for _ in range(t)]
        intervals = None
    else:
        runs = vgrids
        step = 4 * 0.5 if family == "qwen2_5_vl" else 1  # tokens_per_second * second_per_grid_ts
        intervals = {video_id: [step] * len(vgrids)}
    # transformers 5.23 advances the text position by max(h', w') after a video (not by its
    # largest index + 1, as the original Qwen2-VL code did); the two agree for these grids.
    assert all(max(h, w) > (t - 1) * 2 for t, h, w in vgrids)
    expected = expected_mrope(
        inputs["input_ids"], inputs["attention_mask"], {image_id: igrids, video_id: runs}, intervals
    )
    mask = inputs["attention_mask"]
    with capture_positions(model) as seen:
        out = generate(model, inputs)
    assert out.shape[0] == 2
    assert torch.equal(masked(seen[0], mask), masked(expected, mask))
    with capture_positions(model) as seen:
        logits(model, inputs)
    assert torch.equal(masked(seen[0], mask), masked(expected, mask))

    other = 4 if budget == 16 else 16  # inputs built under one budget, run under another
    with flexproj.tokens(other):
        for run in (logits, generate):
            with pytest.raises(flexproj.TokenCountMismatch, match="placeholder tokens but"):
                run(model, inputs)
    # sample 1 alone holds only a video: the error names the video counts
    rows = slice(1, 2)
    only_video = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    first = VIDEO_GRIDS[0][0] * VIDEO_GRIDS[0][1] * VIDEO_GRIDS[0][2]
    only_video["pixel_values_videos"] = inputs["pixel_values_videos"][first:]
    only_video["video_grid_thw"] = inputs["video_grid_thw"][rows]
    if family == "qwen2_5_vl":
        only_video["second_per_grid_ts"] = inputs["second_per_grid_ts"][rows]
    t, h, w = llm_grid(VIDEO_GRIDS[1], other, MERGE)
    for run in (logits, generate):
        with (
            flexproj.tokens(other),
            pytest.raises(
                flexproj.TokenCountMismatch,
                match=rf"carry {vcounts[1]} video .* produces {t * h * w} video",
            ),
        ):
            run(model, only_video)
