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
from flexproj.registry import adapter_for
from flexproj.testing import tiny_vlm


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
    # the native-budget rule: the projector-only conversions are the stock model at native
    for row in (
        "distilled",
        "tokenflex_align",
        "tokenflex_per_sample",
        "fixed_" + str(cfg.train_tokens[0]),
    ):
        assert results["rows"][row]["accuracy"][native] == stock["accuracy"][native], row


def test_costs_follow_the_schedules(quick_run):
    out, results = quick_run
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
    for row in ("tokenflex_align", "tokenflex_per_sample"):
        tokens = rows[row]["cost"]["vision_tokens"]
        assert low * converted <= tokens <= high * converted
    # where the LLM or the stock projector trains, the native budget joins the schedule; a
    # family whose count varies per image (Qwen) has no one native budget to add
    model, _ = tiny_vlm(results["family"])
    fixed = adapter_for(model).native_tokens(model, "stock") is not None
    added = [cfg.native_tokens] if fixed else []
    for row in ("tokenflex_finetune", "pool_after_flex"):
        record = next(r for r in results["records"] if r["task"] == row)
        recipe = json.loads(
            (out / "work" / f"seed{record['seed']}" / row / "recipe.json").read_text()
        )
        assert recipe["schedule"]["tokens"] == [*cfg.train_tokens, *added]
        assert low * converted <= rows[row]["cost"]["vision_tokens"]
        assert rows[row]["cost"]["vision_tokens"] <= cfg.native_tokens * converted
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


def test_the_docs_sections_are_written_and_checked_from_the_results(quick_run, tmp_path):
    """--docs write puts the run's tables and reading between the task's markers; --docs
    check finds nothing to report on what was written, and a changed digit in a table (or
    missing markers) is reported."""
    from pathlib import Path

    from flexproj.demo.docs import DocsError, check_docs, sections, write_docs

    out, results = quick_run
    if results["family"] != "llava":
        pytest.skip("the docs hold the LLaVA run")
    root = Path(__file__).resolve().parents[1]
    for rel in ("README.md", "docs/DEMO.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((root / rel).read_text())
    write_docs(results, tmp_path, plot=out / results["plot"])
    shown = tmp_path / "docs" / "demo_convert_accuracy_vs_budget.png"
    assert shown.read_bytes() == (out / results["plot"]).read_bytes()
    made = sections(results)
    readme = (tmp_path / "README.md").read_text()
    assert made["table"] in readme and made["reading"] in readme
    assert made["report"] in (tmp_path / "docs" / "DEMO.md").read_text()
    assert check_docs(results, tmp_path) == []
    stock = results["rows"]["stock"]["accuracy"][str(results["native_tokens"])]["all"]["mean"]
    cell = f"{stock * 100:.1f}"
    (tmp_path / "README.md").write_text(readme.replace(f"| {cell} |", "| 12.3 |", 1))
    problems = check_docs(results, tmp_path)
    assert len(problems) == 1 and "README.md: section flag:table differs" in problems[0]
    assert "-| stock (native budget)" in problems[0]  # the diff names the row
    (tmp_path / "docs" / "DEMO.md").write_text("no markers")
    with pytest.raises(DocsError, match="no section <!-- demo:flag:report -->"):
        check_docs(results, tmp_path)


def test_docs_check_without_markers_is_one_error_before_any_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--out", "o", "--docs", "check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --docs check:") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_reading_is_computed_from_the_numbers():
    """Hand-made results: the reading states the stock and pool-after numbers, the ratio,
    and the cells where the flexible row loses."""
    from flexproj.demo.docs import reading

    def acc(all_, fine=None):
        fine = all_ if fine is None else fine
        return {
            k: {"mean": v, "std": 0.0} for k, v in (("all", all_), ("colour", all_), ("flag", fine))
        }

    budgets = [16, 36, 64, 144]
    table = {
        "stock": {144: acc(1.0)},
        "pool_after": {16: acc(0.5, 0.2), 36: acc(0.6, 0.3), 64: acc(0.7), 144: acc(1.0)},
        "tokenflex_align": {16: acc(0.5), 36: acc(0.6), 64: acc(0.8), 144: acc(1.0)},
        "tokenflex_finetune": {16: acc(0.6), 36: acc(0.7), 64: acc(0.8), 144: acc(0.9)},
        "fixed_16": {16: acc(0.7), 36: acc(0.4), 64: acc(0.4), 144: acc(1.0)},
        "fixed_36": {16: acc(0.3), 36: acc(0.6), 64: acc(0.5), 144: acc(1.0)},
        "fixed_64": {16: acc(0.2), 36: acc(0.5), 64: acc(0.8), 144: acc(1.0)},
    }
    results = {
        "native_tokens": 144, "eval_tokens": budgets, "train_tokens": [16, 36, 64],
        "kinds": ["colour", "flag"], "config": {"distill_steps": 5},
        "rows": {
            row: {
                "label": row, "accuracy": {str(n): a for n, a in cells.items()},
                "cost_vs_stock": {"steps": 0.2, "vision_tokens": 0.06},
            }
            for row, cells in table.items()
        },
    }  # fmt: skip
    text = reading(results)
    assert "flag 30.0% (0.30x stock)" in text  # pool-after at 36 = 144 / 4
    assert "tokenflex_finetune 90.0 (-10.0, OUTSIDE max(1, std))" in text
    assert "tokenflex_align 100.0 (+0.0, within max(1, std))" in text
    assert "at 16: 50.0 vs fixed-16 70.0 (-20.0)" in text  # align loses to fixed-16 at 16
    assert "at 144: 90.0 vs stock 100.0 (-10.0)" in text
    assert "20% of its steps, 6% of its vision tokens" in text


def test_readme_shows_the_default_task_and_demo_md_every_task():
    from flexproj.demo.docs import targets

    assert set(targets("flag")) == {"README.md", "docs/DEMO.md"}
    assert set(targets("board")) == {"docs/DEMO.md"}


@pytest.mark.parametrize("head_dim", [None, 32])
def test_the_base_model_heads(tmp_path, head_dim):
    """The vision tower's heads are 32 wide; the LLM's are 16 by default (the published
    tables) and 32 with --text-head-dim 32 (what vLLM's CPU attention serves)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from flexproj.demo.base_model import write_base_model

    cfg = quick_convert_config(text_head_dim=head_dim)
    path, _ = write_base_model(cfg, 0, tmp_path / "base")
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    vision, text = model.config.vision_config, model.config.text_config
    assert vision.hidden_size // vision.num_attention_heads == 32
    assert text.head_dim == (head_dim or 16)
    assert (
        model.model.language_model.layers[0].self_attn.q_proj.out_features
        == text.head_dim * text.num_attention_heads
    )
    processor = AutoProcessor.from_pretrained(path)
    from PIL import Image

    inputs = processor(
        text=["what <image> ?"], images=[Image.new("RGB", (96, 96))], return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
