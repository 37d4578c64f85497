"""``flexproj demo --quick`` (the conversion experiment) for every family, end to end.

Checked from results.json: every row at every budget (the stock row at its native budget
only), means recomputed from the seeds, accuracies that count whole answers, the stock
row equal to training-free pooling at the native budget (the same model and questions),
vision tokens that follow each recipe row's schedule, distillation that lowers the error
at every budget, and the plot.
"""

from __future__ import annotations

import json
import statistics

import pytest
from PIL import Image

from flexproj.cli import main
from flexproj.demo import FAMILY_SETUPS, quick_convert_config


@pytest.fixture(scope="module", params=list(FAMILY_SETUPS))
def quick_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"convert-{request.param}")
    argv = ["demo", "--quick", "--family", request.param, "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_row_is_evaluated_at_every_budget(quick_run):
    _, results = quick_run
    cfg = quick_convert_config(family=results["family"])
    budgets = [str(n) for n in results["eval_tokens"]]
    native = str(results["native_tokens"])
    assert budgets[-1] == native and list(results["rows"]) == cfg.rows()
    size = cfg.eval_per_kind * len(cfg.kinds)
    for row, rec in results["rows"].items():
        assert list(rec["accuracy"]) == ([native] if row == "stock" else budgets)
        for n, stats in rec["accuracy"].items():
            for kind in ["all", *results["kinds"]]:
                per_seed = [s["accuracy"][n][kind] for s in rec["seeds"]]
                assert stats[kind]["mean"] == pytest.approx(statistics.fmean(per_seed))
            for s in rec["seeds"]:
                acc = s["accuracy"][n]["all"]
                assert acc * size == pytest.approx(round(acc * size))  # whole answers
    stock, pooled = results["rows"]["stock"], results["rows"]["pool_after"]
    assert stock["accuracy"][native] == pooled["accuracy"][native]


def test_costs_follow_the_schedules(quick_run):
    _, results = quick_run
    cfg = quick_convert_config(family=results["family"])
    rows = results["rows"]
    images = cfg.stock_steps * cfg.batch_size
    assert rows["stock"]["cost"]["steps"] == cfg.stock_steps
    assert rows["stock"]["cost"]["vision_tokens"] == cfg.native_tokens * images
    assert rows["pool_after"]["cost"]["steps"] == 0  # training-free
    converted = cfg.convert_steps * cfg.batch_size
    for n in cfg.train_tokens or ():
        rec = rows[f"fixed_{n}"]
        assert rec["cost"]["steps"] == cfg.convert_steps
        assert rec["cost"]["vision_tokens"] == n * converted
        assert rec["cost_vs_stock"]["steps"] == pytest.approx(cfg.convert_steps / cfg.stock_steps)
    low, high = min(cfg.train_tokens or ()), max(cfg.train_tokens or ())
    for row in ("tokenflex_align", "tokenflex_finetune", "tokenflex_per_sample", "pool_after_flex"):
        tokens = rows[row]["cost"]["vision_tokens"]
        assert low * converted <= tokens <= high * converted
    assert rows["distilled"]["cost"]["vision_tokens"] == 0  # the LLM sees nothing


def test_the_automatic_budget_is_scored_on_held_out_questions(quick_run):
    """Per seed: a threshold chosen on half the questions, accuracy and tokens counted on the
    other half (whole answers of that half), next to the native budget on the same half."""
    _, results = quick_run
    cfg = quick_convert_config(family=results["family"])
    half = cfg.eval_per_kind * len(cfg.kinds) // 2
    assert results["rows"]["stock"]["auto"] is None
    smallest = min(cfg.train_tokens or ())
    for record in results["records"]:  # every trained run, the stock one included (pool-after)
        auto = record["auto"]
        assert auto["questions"] == half
        for key in ("accuracy", "native_accuracy"):
            assert auto[key] * half == pytest.approx(round(auto[key] * half))
        assert 0.0 <= auto["threshold"] <= 1.01
        assert auto["vision_tokens_per_image_spent"] >= auto["vision_tokens_per_image"] > 0
        assert sum(auto["answered_at"].values()) == half
        assert min(int(n) for n in auto["answered_at"]) >= smallest
    for name in ("tokenflex_align", "tokenflex_per_sample", "pool_after"):
        by_kind = results["rows"][name]["auto"]["mean_budget_by_kind"]
        assert set(by_kind) == set(results["kinds"])
        assert all(b >= smallest for b in by_kind.values())  # both kinds in the held-out half


def test_distillation_lowers_the_error_at_every_budget(quick_run):
    _, results = quick_run
    distill = results["distill"]
    assert {int(n) for n in distill} >= set(results["train_tokens"])
    for d in distill.values():
        assert d["cosine_after"] > d["cosine_before"]
        assert d["mse_after"] < d["mse_before"]


def test_plot_is_a_png(quick_run):
    out, results = quick_run
    with Image.open(out / results["plot"]) as image:
        assert image.format == "PNG" and image.size[0] > 400
