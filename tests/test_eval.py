"""``flexproj eval``: per-budget loss / accuracy / prefill time, JSON + markdown + PNG."""

import json

import pytest
from PIL import Image

from flexproj.errors import BudgetError
from flexproj.recipes.evaluate import EvalError, evaluate, normalize_answer
from flexproj.recipes.trainer import main as train_main
from flexproj.testing.datasets import make_samples, write_llava_dataset


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny LLaVA align runs: the paper-style mix and a fixed budget."""
    root = tmp_path_factory.mktemp("eval")
    data = write_llava_dataset(make_samples(6, seed=0), root / "train")
    test = write_llava_dataset(make_samples(4, seed=1), root / "test")
    dirs = {}
    for name, schedule in (("flex", "4:2,9:3,16:5"), ("fixed16", "fixed:16")):
        dirs[name] = root / name
        argv = ["--model", "tiny:llava", "--data", str(data), "--output_dir", str(dirs[name]),
                "--schedule", schedule, "--max_steps", "2", "--per_device_train_batch_size", "2",
                "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip
        assert train_main("llava", argv) == 0
    return dirs, test


def test_eval_command_writes_json_markdown_and_plot(runs, tmp_path, capsys):
    from flexproj.cli import main

    dirs, test = runs
    out = tmp_path / "report"
    argv = ["eval", "--run", str(dirs["flex"]), "--label", "flex", "--run", str(dirs["fixed16"]),
            "--label", "fixed-16", "--data", str(test), "--tokens", "4", "9", "16",
            "--output_dir", str(out), "--batch_size", "3", "--max_new_tokens", "3", "--prefill_repeats", "1",
            "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "flex: N=   4" in printed and "fixed-16: N=  16" in printed

    report = json.loads((out / "eval.json").read_text())
    assert report["budgets"] == [4, 9, 16] and report["samples"] == 4
    assert [r["label"] for r in report["runs"]] == ["flex", "fixed-16"]
    for run in report["runs"]:
        results = run["results"]
        assert [r["tokens"] for r in results] == [4, 9, 16]
        # one image per sample: the LLM sees exactly the pooled grid (2x2, 3x3, 4x4)
        assert [r["vision_tokens_per_sample"] for r in results] == [4, 9, 16]
        for r in results:
            hits = [
                normalize_answer(e["generated"]) == normalize_answer(e["answer"])
                for e in r["examples"]
            ]
            assert len(hits) == 4 and r["accuracy"] == sum(hits) / 4  # every sample listed
            assert r["loss"] > 0 and r["prefill_ms_per_sample"] > 0
            assert (
                r["samples"] == 4
                and r["examples"]
                and {"answer", "generated"} <= set(r["examples"][0])
            )

    table = (out / "eval.md").read_text()
    assert "| run | N | vision tokens / sample | loss | accuracy | prefill ms / sample |" in table
    assert table.count("| flex |") == 3 and table.count("| fixed-16 |") == 3
    with Image.open(out / "eval.png") as image:
        assert image.format == "PNG" and image.width > 400


def test_eval_loss_matches_between_calls_and_depends_on_budget(runs, tmp_path):
    dirs, test = runs
    kwargs = dict(
        output_dir=tmp_path,
        batch_size=4,
        max_new_tokens=2,
        prefill_repeats=1,
        progress=False,
        log=lambda _m: None,
    )
    first = evaluate([dirs["flex"]], test, [4, 16], **kwargs)["runs"][0]["results"]
    again = evaluate([dirs["flex"]], test, [16, 4], **kwargs)["runs"][0]["results"]
    assert first[0]["loss"] == pytest.approx(again[1]["loss"], rel=1e-5)
    assert first[1]["loss"] == pytest.approx(again[0]["loss"], rel=1e-5)
    assert first[0]["loss"] != first[1]["loss"]


def test_eval_errors(runs, tmp_path):
    dirs, test = runs
    kwargs = dict(
        output_dir=tmp_path,
        prefill_repeats=1,
        max_new_tokens=2,
        progress=False,
        log=lambda _m: None,
    )
    with pytest.raises(BudgetError, match=r"--tokens 100: .*native 64"):
        evaluate([dirs["flex"]], test, [16, 100], **kwargs)
    with pytest.raises(EvalError, match=r"no flexproj\.safetensors"):
        evaluate([tmp_path], test, [4], **kwargs)
    with pytest.raises(EvalError, match="--batch_size must be at least 1"):
        evaluate([dirs["flex"]], test, [4], batch_size=0, **kwargs)
    with pytest.raises(EvalError, match="2 --label"):
        evaluate([dirs["flex"]], test, [4], labels=["a", "b"], **kwargs)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("flexproj.safetensors", "flexproj_config.json"):
        (bare / name).write_bytes((dirs["flex"] / name).read_bytes())
    with pytest.raises(EvalError, match="pass --model"):
        evaluate([bare], test, [4], **kwargs)
    # a bare projector directory works with --model (the family follows from the model)
    report = evaluate([bare], test, [4], model="tiny:llava", max_samples=1, **kwargs)
    assert report["runs"][0]["results"][0]["samples"] == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Red.", "red"),
        ("TWO", "two"),
        ("top-left, corner!", "top left corner"),
        ("  a   b ", "a b"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def _sample(hit, confidence, tokens, kind):
    return {"id": "x", "kind": kind, "hit": hit, "confidence": confidence,
            "vision_tokens_per_image": tokens}  # fmt: skip


def test_auto_sweep_decides_as_adaptive_generate_does():
    from flexproj.recipes.evaluate import auto_point, auto_sweep

    # three samples on a 4 / 16 ladder: (hit, confidence) at 4, then at 16
    at4 = [_sample(True, 0.9, 4, "colour"), _sample(False, 0.3, 4, "position"),
           _sample(False, 0.6, 4, "position")]  # fmt: skip
    at16 = [_sample(True, 0.95, 16, "colour"), _sample(True, 0.8, 16, "position"),
            _sample(False, 0.7, 16, "position")]  # fmt: skip
    results = [
        {"tokens": 16, "accuracy": 2 / 3, "per_sample": at16},  # any order: sorted by budget
        {"tokens": 4, "accuracy": 1 / 3, "per_sample": at4},
    ]
    sweep = auto_sweep(results, margin=0.0)
    point = {round(p["threshold"], 2): p for p in sweep["thresholds"]}
    assert auto_point(results, 0.5) == point[0.5]  # the sweep is auto_point at each threshold
    assert point[0.0]["accuracy"] == pytest.approx(1 / 3)  # nobody escalates
    assert point[0.0]["vision_tokens_per_image_spent"] == 4
    # threshold 0.5: the 0.3 sample escalates (and is right at 16); 0.6 and 0.9 stay
    assert point[0.5]["accuracy"] == pytest.approx(2 / 3)
    assert point[0.5]["answered_at"] == {4: 2, 16: 1}
    assert point[0.5]["vision_tokens_per_image_spent"] == pytest.approx((4 + 20 + 4) / 3)
    assert point[0.5]["mean_budget_by_kind"] == {"colour": 4, "position": 10}
    assert point[1.0]["answered_at"] == {16: 3}  # every answer escalates
    # the cheapest threshold reaching the largest budget's accuracy (2/3) is 0.3 < t <= 0.6
    assert sweep["chosen"]["accuracy"] == pytest.approx(2 / 3)
    assert 0.3 < sweep["chosen"]["threshold"] <= 0.6
    assert sweep["fixed"] == [
        {"tokens": 4, "accuracy": 1 / 3, "vision_tokens_per_image": 4},
        {"tokens": 16, "accuracy": 2 / 3, "vision_tokens_per_image": 16},
    ]
    front = {(p["kind"], p.get("tokens", p.get("threshold"))) for p in sweep["pareto"]}
    assert ("fixed", 4) in front and ("fixed", 16) not in front  # auto beats fixed-16


def test_eval_auto_writes_the_calibration(runs, tmp_path, capsys):
    from flexproj.cli import main

    dirs, test = runs
    out = tmp_path / "report"
    argv = ["eval", "--run", str(dirs["flex"]), "--data", str(test), "--tokens", "4", "16",
            "--output_dir", str(out), "--max_new_tokens", "3", "--prefill_repeats", "1",
            "--no_progress", "--auto"]  # fmt: skip
    assert main(argv) == 0
    assert "auto threshold" in capsys.readouterr().out
    run = json.loads((out / "eval.json").read_text())["runs"][0]
    auto, results = run["auto"], run["results"]
    by_t = {p["threshold"]: p for p in auto["thresholds"]}
    assert by_t[0.0]["accuracy"] == results[0]["accuracy"]  # nobody escalates
    assert by_t[1.01]["accuracy"] == results[1]["accuracy"]  # everybody does
    assert auto["chosen"]["accuracy"] >= results[1]["accuracy"] - 0.01
    assert "automatic budget" in (out / "eval.md").read_text()
    with Image.open(out / "eval_auto.png") as image:
        assert image.format == "PNG"


def test_eval_json_keeps_every_answer_and_prefill_repeats_0_is_accepted(runs, tmp_path):
    """Every sample's reference and generated answer is in eval.json (not only the first
    five), so a model that always answers the same is visible; `--prefill_repeats 0`
    (documented by the Python API: no timing) is accepted by the command."""
    from flexproj.cli import main

    dirs, _ = runs
    test = write_llava_dataset(make_samples(7, seed=2), tmp_path / "test7")
    out = tmp_path / "report"
    argv = ["eval", "--run", str(dirs["flex"]), "--data", str(test), "--tokens", "4",
            "--output_dir", str(out), "--max_new_tokens", "3", "--prefill_repeats", "0",
            "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    (result,) = json.loads((out / "eval.json").read_text())["runs"][0]["results"]
    records = json.loads(test.read_text())
    assert [s["id"] for s in result["per_sample"]] == [r["id"] for r in records]
    for sample, record in zip(result["per_sample"], records, strict=True):
        assert sample["answer"] == record["conversations"][1]["value"]
        assert isinstance(sample["generated"], str)
        assert sample["hit"] == (
            normalize_answer(sample["generated"]) == normalize_answer(sample["answer"])
        )
    assert result["accuracy"] == sum(s["hit"] for s in result["per_sample"]) / 7
    assert result["prefill_ms_per_sample"] is None
    assert "| 4 | 4.0 |" in (out / "eval.md").read_text()  # the row is written, timing "-"


def test_recipe_json_paths_work_from_another_directory(tmp_path, monkeypatch):
    """`--model ./base` (a relative path) is stored absolute in recipe.json, so `flexproj
    eval --run` from another directory loads the base model."""
    from pathlib import Path

    from flexproj.cli import main
    from flexproj.testing import tiny_vlm
    from flexproj.testing.datasets import VOCAB

    model, processor = tiny_vlm("llava", extra_words=VOCAB)
    model.save_pretrained(tmp_path / "work" / "base")
    processor.save_pretrained(tmp_path / "work" / "base")
    write_llava_dataset(make_samples(4, seed=0), tmp_path / "work" / "data")
    monkeypatch.chdir(tmp_path / "work")
    argv = ["--model", "base", "--data", "data/data.json", "--output_dir", "run",
            "--schedule", "fixed:16", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    assert train_main("llava", argv) == 0
    recipe = json.loads((tmp_path / "work" / "run" / "recipe.json").read_text())
    assert recipe["model"] == str((tmp_path / "work" / "base").resolve())
    assert Path(recipe["config"]["data"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["eval", "--run", str(tmp_path / "work" / "run"), "--data",
            str(tmp_path / "work" / "data" / "data.json"), "--tokens", "16", "--prefill_repeats",
            "0", "--max_new_tokens", "2", "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    assert (elsewhere / "eval" / "eval.json").is_file()
