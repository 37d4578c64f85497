"""``flexproj demo --experiment scratch --quick`` (the paper's table from scratch) end to end:
results.json holds the whole table, the plot opens. The default experiment (conversion) is
tested in tests/test_demo_convert.py."""

from __future__ import annotations

import json
import statistics

import pytest
from PIL import Image

from flexproj.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--experiment", "scratch", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_schedule_has_a_finite_accuracy_at_every_budget(quick_run):
    _, results = quick_run
    train, budgets = results["train_tokens"], results["eval_tokens"]
    assert set(train) <= set(budgets)
    assert max(budgets) == results["native_tokens"]  # the native grid is evaluated too
    assert any(n not in train for n in budgets)  # and budgets no model trained on
    runs = results["runs"]
    per_kind = results["config"]["eval_per_kind"]
    assert list(runs) == [f"fixed-{n}" for n in train] + ["flex 2:3:5"]
    for rec in runs.values():
        assert set(rec["accuracy"]) == {str(n) for n in budgets}
        for n in budgets:
            for kind in ["all", *results["kinds"]]:
                stat = rec["accuracy"][str(n)][kind]
                per_seed = [s["accuracy"][str(n)][kind] for s in rec["seeds"]]
                assert stat["mean"] == pytest.approx(statistics.fmean(per_seed))
                assert stat["std"] >= 0.0
                # each seed's accuracy counts whole answers of the held-out set
                size = per_kind * (len(results["kinds"]) if kind == "all" else 1)
                assert all(a * size == pytest.approx(round(a * size)) for a in per_seed)
            for s in rec["seeds"]:  # equal counts per kind: "all" is the mean of the kinds
                acc = s["accuracy"][str(n)]
                assert acc["all"] == pytest.approx(
                    statistics.fmean(acc[k] for k in results["kinds"])
                )
        assert len(rec["seeds"]) == results["config"]["seeds"]
        assert rec["vision_tokens"] > 0 and rec["wall_s"]["mean"] > 0


def test_every_run_of_a_seed_starts_from_the_same_weights(quick_run):
    _, results = quick_run
    by_seed: dict[int, set[float]] = {}
    for rec in results["runs"].values():
        for s in rec["seeds"]:
            by_seed.setdefault(s["seed"], set()).add(s["init_checksum"])
    assert by_seed and all(len(sums) == 1 for sums in by_seed.values())
    assert set(results["majority_baseline"]) == set(results["kinds"])


def test_tokens_consumed_follow_the_schedules(quick_run):
    _, results = quick_run
    cfg = results["config"]
    images = cfg["steps"] * cfg["batch_size"]
    for n in results["train_tokens"]:
        assert results["runs"][f"fixed-{n}"]["vision_tokens"] == n * images
    flex = results["runs"]["flex 2:3:5"]
    assert min(results["train_tokens"]) * images <= flex["vision_tokens"]
    assert flex["vision_tokens"] <= max(results["train_tokens"]) * images
    steps = flex["seeds"][0]["steps_per_budget"]
    assert sum(steps.values()) == cfg["steps"] and set(steps) <= {
        str(n) for n in results["train_tokens"]
    }


def test_prefill_times_cover_every_budget(quick_run):
    _, results = quick_run
    prefill = results["prefill"]
    assert set(prefill) == {str(n) for n in results["eval_tokens"]}
    for n, p in prefill.items():
        assert p["median_s"] > 0 and p["min_s"] > 0
        assert p["llm_min_s"] > 0 and p["llm_median_s"] > 0
        assert p["seq_len"] > int(n)  # the prompt holds the N vision tokens and the text


def test_plot_is_a_png(quick_run):
    out, results = quick_run
    with Image.open(out / results["plot"]) as image:
        assert image.format == "PNG"
        assert image.size[0] > 200 and image.size[1] > 200


def test_argmax_at_the_answer_position_is_what_generate_answers():
    """The metric's shortcut: one-token answers, so greedy decoding's first token decides."""
    import torch

    import flexproj
    from flexproj.demo import (
        PROMPTS,
        answer_logits,
        build_model,
        encode,
        eval_samples,
        quick_config,
    )

    cfg = quick_config()
    model, processor = build_model(cfg, seed=0)
    samples = eval_samples(cfg)[:4]
    batch = encode(processor, samples, 16, cfg.prompt)
    with torch.no_grad():
        argmax = answer_logits(model, batch, 16).argmax(-1)
    for sample, expected in zip(samples, argmax.tolist()):
        prompt = PROMPTS[cfg.prompt].format(question=sample.question, answer="").rstrip()
        with flexproj.tokens(16):
            inputs = processor(text=[prompt], images=[sample.image], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        assert out[0, -1].item() == expected
