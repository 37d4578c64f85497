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
