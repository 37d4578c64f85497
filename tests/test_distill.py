"""Distillation at every budget: the FlexProjector learns the pooled stock outputs.

At budget N the target is the stock projector's outputs average-pooled to N on their grid
(``projector="stock"``); after distillation the error to it is lower at every budget, for
every family. ``flexproj distill`` writes a projector that ``flexproj.from_pretrained``
loads and that gives the in-process distilled projector's logits.
"""

import json

import pytest
import torch

import flexproj
from flexproj.cli import main
from flexproj.recipes.distill import distill_projector, image_paths, stock_twin
from flexproj.recipes.family import recipe_for_model_type
from flexproj.testing import tiny_vlm
from flexproj.testing.datasets import VOCAB, make_samples, write_llava_dataset

#: tiny model -> budgets of a schedule (the native one is added by the distiller)
BUDGETS = {"llava": (4, 16), "llava_next": (4, 16), "qwen2_5_vl": (4, 9), "internvl": (4, 9)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_dataset(make_samples(16, seed=0), tmp_path_factory.mktemp("data"))


def _distilled(family, data, steps=24, seed=0):
    model, processor = tiny_vlm(family, extra_words=VOCAB)
    torch.manual_seed(seed)
    flexproj.patch(model, kernel="eager")
    result = distill_projector(
        model, processor, recipe_for_model_type(family), image_paths(data), steps=steps,
        lr=3e-3, batch_size=4, seed=seed, budgets=BUDGETS[family], log=lambda _m: None,
    )  # fmt: skip
    return model, processor, result


@pytest.mark.parametrize("family", list(BUDGETS))
def test_distillation_reduces_the_error_at_every_budget(family, data):
    model, _, result = _distilled(family, data)
    native = recipe_for_model_type(family).distill_tokens(model)
    assert result["budgets"] == sorted({*BUDGETS[family], native})
    assert set(result["per_budget"]) == {str(n) for n in result["budgets"]}
    for n, p in result["per_budget"].items():
        assert p["cosine_after"] > p["cosine_before"], (n, p)
        assert p["mse_after"] < p["mse_before"], (n, p)
    # every budget got training steps, in turn
    assert [h["tokens"] for h in result["history"][: len(result["budgets"])]] == result["budgets"]
    # the top-level numbers are the native budget's
    assert result["cosine_after"] == result["per_budget"][str(native)]["cosine_after"]
    assert flexproj.patch_info(model).mode == "flex"


def test_the_target_is_the_pooled_stock_output(data):
    """The twin that gives the targets shares the model's weights and pools the stock outputs."""
    model, processor = tiny_vlm("llava", extra_words=VOCAB)
    flexproj.patch(model)
    twin = stock_twin(model)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in twin.parameters())  # no copied weights
    images = [make_samples(1, seed=3)[0].image]
    pixels = processor(text=[processor.image_token], images=images, return_tensors="pt")
    with torch.no_grad(), flexproj.tokens(16):
        target = twin.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    with torch.no_grad(), flexproj.disabled(model):
        stock = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    expected = flexproj.pool_grid(stock[0][None], grid=(8, 8), target=(4, 4))[0]
    torch.testing.assert_close(torch.cat(list(target)), expected)


def test_distill_command_writes_a_loadable_projector_with_the_in_process_logits(data, tmp_path):
    out = tmp_path / "proj"
    argv = ["distill", "--model", "tiny:llava", "--images", str(data), "--output_dir", str(out),
            "--schedule", "4:1,16:1", "--steps", "6", "--lr", "3e-3", "--batch_size", "4",
            "--kernel", "eager", "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "distill.json").read_text())
    assert report["budgets"] == [4, 16, 64] and len(report["history"]) == 6

    loaded, processor = tiny_vlm("llava", extra_words=VOCAB)
    flexproj.from_pretrained(loaded, out, processor)
    same, _, _ = _distilled("llava", data, steps=6)
    assert same is not loaded
    sample = make_samples(1, seed=5)[0]
    for n in (4, 16):
        with flexproj.tokens(n), torch.no_grad():
            inputs = processor(text=[f"<image> {sample.question}"], images=[sample.image],
                               return_tensors="pt")  # fmt: skip
            torch.testing.assert_close(loaded(**inputs).logits, same(**inputs).logits)
    # flexproj eval can take the directory as a run (recipe.json names the base model)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == "tiny:llava" and recipe["outputs"] == {"projector": "."}


def test_image_paths_from_a_folder_and_a_json(data):
    from_json = image_paths(data)
    from_dir = image_paths(data.parent / "images")
    assert len(from_json) == 16 and sorted(from_json) == from_dir


def test_the_distillation_metric_against_a_hand_computed_case():
    """Relative MSE is divided by the *target's* mean square (2/3 here; by the prediction's it
    would be 0.4), cosine is per token, averaged; loss = rel. MSE + w * (1 - cosine)."""
    from flexproj.recipes.distill import _metrics

    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # squared errors 0, 1, 0, 1 -> mean 0.5; target mean square (1 + 1 + 0 + 1) / 4 = 0.75
    # cosines: (1, 0).(1, 1) / sqrt(2) = 0.7071..., (0, 2).(0, 1) / 2 = 1
    cosine = (2**-0.5 + 1.0) / 2
    loss, mse, cos = _metrics(pred, target, cosine_weight=0.5)
    assert mse == pytest.approx(0.5 / 0.75)
    assert cos == pytest.approx(cosine)
    assert float(loss) == pytest.approx(0.5 / 0.75 + 0.5 * (1 - cosine))
