"""What the trainer's model ran, read from the projector itself (a forward hook), not from
the budgets the trainer logs: under ``--per_sample`` each image of a micro-batch is pooled
to its own sample's draw; without it, every image to the step's draw."""

from __future__ import annotations

import json

import pytest

import flexproj
from flexproj.recipes.config import parse_args
from flexproj.recipes.family import get_recipe
from flexproj.recipes.trainer import train
from flexproj.schedule import parse_schedule
from flexproj.testing.datasets import make_samples, write_llava_dataset

SCHEDULE = "4:2,9:3,16:5"  # the tiny LLaVA's 8x8 grid serves each budget exactly (n*n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_dataset(make_samples(8, seed=0), tmp_path_factory.mktemp("data"))


@pytest.fixture
def ran(monkeypatch):
    """Per micro-batch: ``(step, images per sample, tokens the projector gave each image)``."""
    from flexproj.recipes import trainer as trainer_module

    calls = []

    class Hooked(trainer_module.FlexTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            tokens: list[int] = []

            def hook(_module, _args, output):  # output: (images, n, D)
                tokens.extend([output.shape[1]] * output.shape[0])

            handle = flexproj.get_projector(model).register_forward_hook(hook)
            try:
                result = super().compute_loss(model, inputs, *args, **kwargs)
            finally:
                handle.remove()
            images = [len(ex["images"]) for ex in inputs["examples"]]
            calls.append((self.state.global_step, images, tokens))
            return result

    monkeypatch.setattr(trainer_module, "FlexTrainer", Hooked)
    return calls


def run(data, out, *extra):
    argv = [
        "--model", "tiny:llava", "--data", str(data), "--output_dir", str(out),
        "--schedule", SCHEDULE, "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
        "--disable_tqdm", "true", "--stage", "align", *extra,
    ]  # fmt: skip
    config, training_args = parse_args(argv, get_recipe("llava").stage_defaults)
    train("llava", config, training_args, log=lambda _msg: None)


def test_per_sample_pools_each_image_to_its_own_samples_draw(data, tmp_path, ran):
    run(data, tmp_path, "--per_sample", "true")
    schedule = parse_schedule(SCHEDULE, seed=42, per_sample=True)  # --seed defaults to 42
    assert len(ran) == 6  # 3 steps x 2 micro-batches of 2 samples
    mixed = False
    for i, (step, images, tokens) in enumerate(ran):
        micro = i % 2
        draws = [schedule.budget_for_sample(step, micro * 2 + k) for k in range(len(images))]
        expected = [n for n, count in zip(draws, images, strict=True) for _ in range(count)]
        assert tokens == expected, f"step {step} micro-batch {micro}"
        mixed |= len(set(draws)) > 1
    assert mixed, "no micro-batch mixed budgets: the test would not see a batch-wide budget"


def test_without_per_sample_every_image_runs_at_the_steps_draw(data, tmp_path, ran):
    run(data, tmp_path)
    schedule = parse_schedule(SCHEDULE, seed=42)
    assert len(ran) == 6
    for step, images, tokens in ran:
        assert tokens == [schedule.budget_at(step)] * sum(images)
    assert len({schedule.budget_at(s) for s in range(3)}) > 1  # the steps differ
    # one budget per logged step: logged as that int, not a mean of equal draws (144.0)
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    logged = [x["tokens"] for x in lines if "loss" in x]
    assert logged == [schedule.budget_at(s) for s in range(3)]
    assert all(type(t) is int for t in logged), logged
