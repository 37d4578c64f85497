"""The recipes and the native-budget rule: align and distill checkpoints run the stock
projector at the native budget; finetune (and --projector stock) train the native budget."""

from __future__ import annotations

import json

import pytest

from flexproj.recipes.config import parse_args
from flexproj.recipes.family import get_recipe
from flexproj.recipes.trainer import main as train_main
from flexproj.schedule import TokenSchedule
from flexproj.testing.datasets import make_samples, write_llava_dataset


def _config(*extra: str):
    argv = ["--model", "tiny:llava", "--data", "d.json", "--output_dir", "o", *extra]
    config, _ = parse_args(argv, get_recipe("llava").stage_defaults)
    return config


@pytest.fixture(autouse=True)
def _data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_llava_dataset(make_samples(4, seed=0), tmp_path, "d.json")


def test_the_rule_and_the_native_budget_per_stage():
    schedule = TokenSchedule((4, 16), (2.0, 3.0), seed=0)
    notes: list[str] = []
    align, finetune = _config("--stage", "align"), _config("--stage", "finetune")
    assert align.native_rule == finetune.native_rule == "stock"
    assert _config("--projector", "stock").native_rule == "projector"
    assert align.with_native(schedule, 64, notes.append) == schedule  # the LLM is untouched
    grown = finetune.with_native(schedule, 64, notes.append)
    assert grown.tokens == (4, 16, 64) and grown.weights == (2.0, 3.0, 2.0)  # smallest weight
    assert "native budget 64 joins with weight 2" in notes[-1]
    stock = _config("--projector", "stock").with_native(schedule, 64, notes.append)
    assert stock.tokens == (4, 16, 64)
    off = _config("--stage", "finetune", "--train_native", "false")
    assert off.with_native(schedule, 64, notes.append) == schedule
    on = _config("--stage", "align", "--train_native", "true")
    assert on.with_native(schedule, 64, notes.append).tokens == (4, 16, 64)
    # already there, or a schedule that reaches native (capped): unchanged
    assert finetune.with_native(TokenSchedule((4, 64), (1, 1)), 64, notes.append).tokens == (4, 64)
    assert finetune.with_native(TokenSchedule((4, 100), (1, 1)), 64, notes.append).tokens == (
        4,
        100,
    )
    # Qwen: no fixed native count, a note
    assert finetune.with_native(schedule, None, notes.append) == schedule
    assert "varies per image" in notes[-1]


def test_align_records_the_rule_and_finetune_trains_the_native_budget(tmp_path):
    common = ["--model", "tiny:llava", "--data", "d.json", "--schedule", "4:2,16:3",
              "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no",
              "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    assert train_main("llava", [*common, "--output_dir", "align"]) == 0
    saved = json.loads((tmp_path / "align" / "flexproj_config.json").read_text())
    assert saved["native"] == "stock" and saved["token_schedule"]["tokens"] == [4, 16]
    argv = [*common, "--output_dir", "ft", "--stage", "finetune"]
    assert train_main("llava", argv) == 0
    saved = json.loads((tmp_path / "ft" / "flexproj_config.json").read_text())
    assert saved["native"] == "stock" and saved["token_schedule"]["tokens"] == [4, 16, 64]
