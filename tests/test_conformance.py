"""One contract, every registered family (the transformers ``ModelTesterMixin`` idea).

Each test runs on the tiny real model of every variant: LLaVA-1.5 (CLIP and SigLIP),
LLaVA-NeXT, OneVision, Qwen2/2.5/3-VL, InternVL, through ``forward`` and ``generate``
with inputs from the real processor (a left-padded batch: one sample with one image, one
with two). Family test files keep only what is specific to a family.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import pickle
import threading

import numpy as np
import pytest
import torch
from transformers import TextIteratorStreamer

import flexproj
from flexproj.testing import FAMILIES, IMAGE_PLACEHOLDER, tiny_images, tiny_vlm

SIZES = [(64, 96), (96, 64), (64, 64)]  # (width, height) of the batch's three images
pytestmark = pytest.mark.parametrize("family", FAMILIES)


def texts(family: str) -> list[str]:
    img = IMAGE_PLACEHOLDER[family]
    return [f"{img} what color is the circle ?", f"{img} and {img} how many shapes ?"]


def encode(processor, family: str, sizes=SIZES):
    return processor(
        text=texts(family),
        images=tiny_images(sizes),
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )


def placeholders(model, inputs) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, n_new: int = 3) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=n_new, do_sample=False)


def perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Make a projector's weights differ from a fresh init (and from the stock path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


MODES = ["flex", "stock"]  # FlexProjector (pool first) / stock projector, outputs pooled
with_modes = pytest.mark.parametrize("mode", MODES)


def patch(model, processor, tokens: int, mode: str) -> None:
    flexproj.patch(model, processor, tokens=tokens, projector="stock" if mode == "stock" else None)


def patched(family: str, tokens: int = 16, seed: int = 0, mode: str = "flex"):
    """A patched tiny model whose projector differs from a fresh init (and, with
    ``mode="flex"``, from the stock path)."""
    model, processor = tiny_vlm(family, seed=seed)
    model.eval()
    patch(model, processor, tokens, mode)
    perturb(flexproj.get_projector(model))
    return model, processor


# --------------------------------------------------------------------------- the core path


@with_modes
def test_generate_at_several_budgets(family, mode):
    model, processor = tiny_vlm(family)
    stock = sum(placeholders(model, encode(processor, family)))
    patch(model, processor, 16, mode)
    totals = []
    for n in (1, 4, 9, 16):
        with flexproj.tokens(n):
            inputs = encode(processor, family)
            out = generate(model, inputs)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        totals.append(sum(placeholders(model, inputs)))
    assert totals == sorted(set(totals)), totals  # strictly more tokens for larger budgets
    assert totals[-1] <= stock  # (InternVL's stock 16 per tile is the budget 16's 4x4)


@with_modes
def test_unpatch_is_bit_exact_and_leaves_nothing_behind(family, mode):
    model, processor = tiny_vlm(family)
    inputs = encode(processor, family)
    expected = logits(model, inputs)
    modules_before = {name: dict(vars(m)) for name, m in model.named_modules()}
    flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
    processor_before = dict(vars(processor))
    slot_parent, slot_name = flexproj.registry.adapter_for(model).projector_slot(model)
    stock_slot = getattr(slot_parent, slot_name)

    patch(model, processor, 4, mode)
    with flexproj.tokens(4):
        generate(model, encode(processor, family))
    flexproj.unpatch(model)

    assert getattr(slot_parent, slot_name) is stock_slot
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags_before
    for name, module in model.named_modules():
        before = modules_before[name]
        assert vars(module).keys() == before.keys(), name
        methods_and_modules = [k for k, v in before.items() if callable(v)]  # not cached data
        assert all(vars(module)[k] is before[k] for k in methods_and_modules), name
    assert vars(processor).keys() == processor_before.keys()
    assert placeholders(model, encode(processor, family)) == placeholders(model, inputs)
    assert torch.equal(logits(model, inputs), expected)


@with_modes
def test_gradient_reaches_only_the_projector(family, mode):
    model, processor = patched(family, tokens=9, mode=mode)
    model.requires_grad_(False)
    projector = flexproj.get_projector(model)
    projector.requires_grad_(True)
    with flexproj.tokens(9):
        inputs = encode(processor, family)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    own = {id(p) for p in projector.parameters()}
    assert grads and set(grads) == own
    assert all(float(g.abs().sum()) > 0 for g in grads.values())


def test_save_load_round_trip(family, tmp_path):
    model, processor = patched(family, tokens=9)
    flexproj.save_pretrained(model, tmp_path / "proj")
    with flexproj.tokens(4):
        expected = logits(model, encode(processor, family))
    fresh, fresh_processor = tiny_vlm(family)
    flexproj.from_pretrained(fresh, tmp_path / "proj", fresh_processor)
    assert flexproj.patch_info(fresh).default_tokens == 9
    with flexproj.tokens(4):
        assert torch.equal(logits(fresh, encode(fresh_processor, family)), expected)


# --------------------------------------------------------------------------- budgets and errors


@with_modes
def test_mismatched_inputs_raise_one_error(family, mode, monkeypatch):
    model, processor = patched(family, mode=mode)
    with flexproj.tokens(9):
        inputs = encode(processor, family)
    built = sum(placeholders(model, inputs))
    with flexproj.tokens(4):
        produced = sum(placeholders(model, encode(processor, family)))
    # transformers' own phrase leads, so code matching on it keeps working
    phrase = "Image features and image tokens do not match: "
    counts = rf"{phrase}the inputs carry {built} image placeholder tokens but the patched model produces {produced} image features"
    carried = rf"{phrase}the inputs were built at \[9, 9, 9\] vision tokens per .* but the flexproj.tokens\(4\) block"
    hand_built = {k: v for k, v in inputs.items() if k != "flexproj_budgets"}
    for env in ("0", "1"):  # the guard does not depend on transformers' own check
        monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", env)
        for call in (logits, generate):
            with flexproj.tokens(4), pytest.raises(flexproj.TokenCountMismatch, match=carried):
                call(model, inputs)
            with flexproj.tokens(4), pytest.raises(flexproj.TokenCountMismatch, match=counts):
                call(model, hand_built)


def test_bad_budgets_are_budget_errors(family):
    model, processor = tiny_vlm(family)
    adapter = flexproj.registry.adapter_for(model)
    native = adapter.native_tokens(model)
    for bad in (0, -3, 2.5, 8.0, "16", True, *([native + 1] if native else [])):
        with pytest.raises(flexproj.BudgetError, match=r"positive int|native"):
            flexproj.patch(model, processor, tokens=bad)
        assert not flexproj.is_patched(model)
    model, processor = patched(family)
    for bad in (0, -3, 2.5, "16", True, None):
        with pytest.raises(flexproj.BudgetError, match="positive int"):
            flexproj.tokens(bad)
    with flexproj.tokens(np.int64(4)):  # integer-like values are budgets
        inputs = encode(processor, family)
    assert sum(placeholders(model, inputs)) < sum(placeholders(model, encode(processor, family)))
    if native is None:  # Qwen caps each image at its own grid
        with flexproj.tokens(10_000):
            generate(model, encode(processor, family))
    else:
        assert native == 64  # the tiny geometry: an 8x8 grid per image, crop or tile
        inputs = encode(processor, family)
        above = rf"a budget of 65 vision tokens per {adapter.unit} exceeds this model's native 64"
        with flexproj.tokens(65):
            with pytest.raises(flexproj.BudgetError, match=above):
                encode(processor, family)
            with pytest.raises(flexproj.BudgetError, match=above):  # (inputs carrying none)
                logits(model, {k: v for k, v in inputs.items() if k != "flexproj_budgets"})


@with_modes
def test_two_threads_at_two_budgets(family, mode):
    model, processor = patched(family, mode=mode)
    expected = {}
    for n in (4, 16):
        with flexproj.tokens(n):
            expected[n] = generate(model, encode(processor, family))
    barrier = threading.Barrier(2)
    got: dict[int, torch.Tensor] = {}

    def run(n: int) -> None:
        with flexproj.tokens(n):
            barrier.wait()
            for _ in range(2):
                got[n] = generate(model, encode(processor, family))

    threads = [threading.Thread(target=run, args=(n,)) for n in (4, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[n], expected[n]) for n in (4, 16))


# --------------------------------------------------------------------------- the stock path


@with_modes
def test_disabled_runs_the_stock_model_in_this_context_only(family, mode):
    model, processor = tiny_vlm(family)
    stock_inputs = encode(processor, family)
    stock_logits = logits(model, stock_inputs)
    patch(model, processor, 4, mode)
    if mode == "flex":
        perturb(flexproj.get_projector(model))
    patched_count = sum(placeholders(model, encode(processor, family)))

    inside, outside = threading.Barrier(2), {}

    def other_thread() -> None:
        inside.wait()  # runs while the main thread is inside the block
        outside["count"] = sum(placeholders(model, encode(processor, family)))
        outside["out"] = generate(model, encode(processor, family))
        inside.wait()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with flexproj.disabled(model):
        inside.wait()
        inputs = encode(processor, family)
        assert placeholders(model, inputs) == placeholders(model, stock_inputs)
        assert torch.equal(logits(model, inputs), stock_logits)
        inside.wait()
    thread.join()
    assert outside["count"] == patched_count < sum(placeholders(model, stock_inputs))
    assert flexproj.is_patched(model)
    assert sum(placeholders(model, encode(processor, family))) == patched_count


# --------------------------------------------------------------------------- copies and moves


@with_modes
def test_deepcopy_is_independent(family, mode):
    model, processor = patched(family, mode=mode)
    with flexproj.tokens(4):
        inputs = encode(processor, family)
    before = logits(model, inputs)
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, inputs), before)

    perturb(flexproj.get_projector(clone), seed=7)  # editing the copy ...
    assert torch.equal(logits(model, inputs), before)  # ... leaves the original alone
    assert not torch.equal(logits(clone, inputs), before)

    clone.requires_grad_(False)
    flexproj.get_projector(clone).requires_grad_(True)
    clone(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is None for p in model.parameters())  # gradients land on the copy
    assert any(p.grad is not None for p in flexproj.get_projector(clone).parameters())

    flexproj.unpatch(model)  # the copy keeps working, patched, on its own modules
    assert flexproj.is_patched(clone)
    logits(clone, inputs)
    clone_projector = flexproj.get_projector(clone)
    flexproj.unpatch(clone)
    stock = encode(processor, family)
    if mode == "flex":  # the copy's own stock projector, equal to the original's
        assert torch.equal(logits(clone, stock), logits(model, stock))
    else:  # the stock projector was the trained one: the copy keeps its own edit
        parent, name = flexproj.registry.adapter_for(clone).projector_slot(clone)
        assert getattr(parent, name) is clone_projector
        assert not torch.equal(logits(clone, stock), logits(model, stock))


@with_modes
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_moves_reach_the_stock_projector(family, mode, dtype):
    model, processor = patched(family, mode=mode)
    model.to(dtype)
    with flexproj.tokens(4):
        generate(model, encode(processor, family), n_new=1)
    flexproj.unpatch(model)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {dtype}
    generate(model, encode(processor, family), n_new=1)  # the stock model runs in dtype


def test_a_projector_of_another_dtype_is_refused(family):
    model, _ = tiny_vlm(family)
    adapter = flexproj.registry.adapter_for(model)
    projector = flexproj.FlexProjector(*adapter.projector_dims(model)).to(torch.float64)
    with pytest.raises(
        flexproj.PatchError, match=r"torch.float64 .* but the model is torch.float32"
    ):
        flexproj.patch(model, projector=projector)
    assert not flexproj.is_patched(model)


def test_pickling_a_patched_model_is_a_clear_error(family):
    model, processor = patched(family)
    for obj in (model, processor):
        with pytest.raises(flexproj.PatchError, match="cannot be pickled"):
            pickle.dumps(obj)
    flexproj.unpatch(model)
    pickle.loads(pickle.dumps(model))


# --------------------------------------------------------------------------- saving


def test_model_save_pretrained_writes_the_stock_model_and_the_projector(family, tmp_path):
    model, processor = tiny_vlm(family)
    stock_inputs = encode(processor, family)
    stock_logits = logits(model, stock_inputs)
    flexproj.patch(model, processor, tokens=9)
    perturb(flexproj.get_projector(model))
    with flexproj.tokens(4):
        inputs = encode(processor, family)
    expected = logits(model, inputs)

    model.save_pretrained(tmp_path / "m")
    reloaded = type(model).from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(reloaded, stock_inputs), stock_logits)  # the stock model, exactly
    flexproj.from_pretrained(reloaded, tmp_path / "m")
    assert flexproj.patch_info(reloaded).default_tokens == 9
    with flexproj.tokens(4):  # (the inputs were built for the other model)
        assert torch.equal(logits(reloaded, inputs), expected)  # and the patch comes back


def test_failed_from_pretrained_leaves_everything_as_it_was(family, tmp_path):
    model, processor = patched(family, tokens=4)
    flexproj.save_pretrained(model, tmp_path / "proj")
    perturb(flexproj.get_projector(model), seed=3)  # the live projector differs from the file
    projector = flexproj.get_projector(model)
    with flexproj.tokens(4):
        inputs = encode(processor, family)
    expected = logits(model, inputs)
    _, wrong_processor = tiny_vlm("internvl" if family != "internvl" else "llava")

    with pytest.raises(flexproj.BudgetError):
        flexproj.from_pretrained(model, tmp_path / "proj", tokens=0)
    with pytest.raises(flexproj.UnsupportedModelError):
        flexproj.from_pretrained(model, tmp_path / "proj", wrong_processor)

    assert flexproj.get_projector(model) is projector
    assert flexproj.patch_info(model).default_tokens == 4
    assert "replace_image_token" not in vars(wrong_processor)
    assert placeholders(model, encode(processor, family)) == placeholders(model, inputs)
    assert torch.equal(logits(model, inputs), expected)


# --------------------------------------------------------------------------- the budget follows the inputs


@with_modes
def test_streaming_generate_in_a_worker_thread(family, mode):
    """transformers' streaming recipe: generate runs in a thread that sees no budget block;
    the inputs decide."""
    model, processor = patched(family, mode=mode)
    with flexproj.tokens(4):  # TextIteratorStreamer takes one sample
        inputs = processor(
            text=texts(family)[:1], images=tiny_images(SIZES[:1]), return_tensors="pt"
        )
        expected = generate(model, inputs, n_new=4)
    tokenizer = processor.tokenizer
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=120)
    kwargs = {**inputs, "max_new_tokens": 4, "do_sample": False, "streamer": streamer}
    worker = threading.Thread(target=model.generate, kwargs=kwargs)
    worker.start()
    text = "".join(streamer)
    worker.join()
    prompt_len = inputs["input_ids"].shape[1]
    assert text.split() == tokenizer.decode(expected[0, prompt_len:]).split()


def test_budget_survives_a_generator_driven_from_other_contexts(family):
    """As a web framework drives a streaming response: each step in a fresh context copy
    on a worker thread. The budget block must not break, and the model call after the
    first yield runs at the budget the inputs were built with."""
    model, processor = patched(family)
    with flexproj.tokens(4):
        expected = generate(model, encode(processor, family))

    def respond():
        with flexproj.tokens(4):
            inputs = encode(processor, family)
            yield "start"
            yield generate(model, inputs)

    steps = respond()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = []
        while True:
            ctx = contextvars.copy_context()
            item = pool.submit(ctx.run, next, steps, None).result()
            if item is None:
                break
            results.append(item)
    assert results[0] == "start" and torch.equal(results[1], expected)


def test_run_in_executor_and_decorators(family):
    model, processor = patched(family, tokens=16)

    @flexproj.tokens(4)
    def build():
        return encode(processor, family)

    @flexproj.tokens(4)
    async def build_then_generate():
        inputs = encode(processor, family)  # under the decorator's budget
        loop = asyncio.get_running_loop()
        return inputs, await loop.run_in_executor(None, lambda: generate(model, inputs))

    inputs, out = asyncio.run(build_then_generate())
    assert placeholders(model, inputs) == placeholders(model, build())
    with flexproj.tokens(4):
        assert placeholders(model, inputs) == placeholders(model, encode(processor, family))
        assert torch.equal(out, generate(model, inputs))


def test_reported_token_counts_follow_the_budget(family):
    """``_get_num_multimodal_tokens`` (what serving engines read) reports what is emitted."""
    model, processor = patched(family)
    img = IMAGE_PLACEHOLDER[family]
    sizes = [(64, 96), (96, 64)]

    def emitted() -> list[int]:
        return [
            sum(placeholders(model, processor(text=[img], images=[im], return_tensors="pt")))
            for im in tiny_images(sizes)
        ]

    hw = [(h, w) for w, h in sizes]
    with flexproj.disabled(model):
        stock_report = processor._get_num_multimodal_tokens(image_sizes=hw).num_image_tokens
        stock_emitted = emitted()
    offset = [r - e for r, e in zip(stock_report, stock_emitted)]  # e.g. InternVL's <img></img>
    with flexproj.tokens(4):
        report = processor._get_num_multimodal_tokens(image_sizes=hw).num_image_tokens
        got = emitted()
    assert [r - o for r, o in zip(report, offset)] == got
    assert got != stock_emitted


# --------------------------------------------------------------------------- projector="stock"


def test_stock_projector_at_the_native_budget_is_the_stock_model(family):
    model, processor = tiny_vlm(family)
    model.eval()
    inputs = encode(processor, family)
    expected = logits(model, inputs)
    flexproj.patch(model, processor, projector="stock")
    native = flexproj.patch_info(model).native_tokens
    assert flexproj.patch_info(model).mode == "stock"
    with flexproj.tokens(native or 10_000):  # Qwen: every image keeps its own grid
        native_inputs = encode(processor, family)
    assert torch.equal(native_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(logits(model, native_inputs), expected)
    with flexproj.tokens(4):
        assert sum(placeholders(model, encode(processor, family))) < sum(
            placeholders(model, inputs)
        )


def test_stock_projector_trains_and_saves_through_the_model(family, tmp_path):
    """No FlexProjector to save: flexproj.save_pretrained refuses; the trained stock
    projector goes out with model.save_pretrained, under the stock key names."""
    model, processor = patched(family, mode="stock")  # the stock projector's weights moved
    with pytest.raises(flexproj.PatchError, match="no FlexProjector"):
        flexproj.save_pretrained(model, tmp_path / "proj")
    with flexproj.disabled(model):
        stock_inputs = encode(processor, family)
        expected = logits(model, stock_inputs)  # the stock path with the trained projector
    model.save_pretrained(tmp_path / "m")
    reloaded = type(model).from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(reloaded, stock_inputs), expected)


# --------------------------------------------------------------------------- per-image budgets


@with_modes
def test_per_image_budgets_equal_each_sample_alone(family, mode):
    """One budget per image in one left-padded batch (the second sample's two images at two
    budgets) gives what each sample gives alone at its budgets."""
    model, processor = patched(family, mode=mode)
    images = tiny_images(SIZES)
    per_sample = [(texts(family)[0], images[:1], [4]), (texts(family)[1], images[1:], [9, 1])]
    budgets = [b for _, _, bs in per_sample for b in bs]
    with flexproj.tokens(budgets):
        batch = encode(processor, family)
        out = generate(model, batch)
        batch_logits = logits(model, batch)
    new = out[:, batch["input_ids"].shape[1] :]
    for row, (text, imgs, bs) in enumerate(per_sample):
        with flexproj.tokens(bs):
            alone = processor(text=[text], images=imgs, return_tensors="pt")
            alone_out = generate(model, alone)
            alone_logits = logits(model, alone)
        assert placeholders(model, batch)[row] == placeholders(model, alone)[0]
        assert torch.equal(new[row], alone_out[0, alone["input_ids"].shape[1] :])
        torch.testing.assert_close(batch_logits[row, -1], alone_logits[0, -1], rtol=1e-4, atol=1e-4)
    # the inputs carry their per-image budgets: no block around the model call is needed
    assert torch.equal(generate(model, batch), out)


def test_a_budget_list_of_the_wrong_length_is_one_error(family):
    model, processor = patched(family)
    with (
        flexproj.tokens([4, 9]),
        pytest.raises(flexproj.BudgetError, match="2 budgets for a batch of 3 images"),
    ):
        encode(processor, family)
    with flexproj.tokens([4, 9, 16]):
        inputs = encode(processor, family)
    hand_built = {k: v for k, v in inputs.items() if k != "flexproj_budgets"}
    alone = "2 budgets|which crops or tiles belong to which image"  # (the latter: tiles, crops)
    with flexproj.tokens([4, 9]), pytest.raises(flexproj.BudgetError, match=alone):
        logits(model, hand_built)
    with flexproj.tokens([4, 9]), pytest.raises(flexproj.TokenCountMismatch, match=r"\[4, 9, 16\]"):
        logits(model, inputs)  # the inputs carry three budgets: the block disagrees
