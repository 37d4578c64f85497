"""Step 4: each trained row evaluated with the recipe evaluator (``flexproj eval``): accuracy
per budget and question kind, and the automatic budget scored on held-out questions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexproj.demo.config import ConvertConfig

__all__ = ["evaluate_run"]


def evaluate_run(
    run_dir: Path, cfg: ConvertConfig, eval_json: Path
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Accuracy per budget (all questions and per kind) with the recipe evaluator, and the
    automatic budget over the ladder of training budgets + native (what
    ``flexproj.adaptive_generate`` would do): the threshold chosen by ``flexproj eval
    --auto``'s sweep on half the questions, scored on the other half."""
    from flexproj.recipes.data import ConversationDataset
    from flexproj.recipes.evaluate import auto_point, auto_sweep, evaluate_model, load_run

    run = load_run(run_dir)
    dataset = ConversationDataset(eval_json)
    results = evaluate_model(
        run, dataset, list(cfg.eval_tokens or ()), batch_size=cfg.eval_batch_size,
        max_new_tokens=3, prefill_repeats=0, progress=False, log=lambda _m: None, with_loss=False,
    )  # fmt: skip
    accuracy = {str(r["tokens"]): {"all": r["accuracy"], **r["accuracy_by_kind"]} for r in results}
    ladder = [r for r in results if r["tokens"] in {*(cfg.train_tokens or ()), cfg.native_tokens}]
    # held out: the threshold is chosen on half the questions of each kind, scored on the
    # other half (the evaluation set interleaves kinds, so plain parity would split by kind)
    by_kind: dict[Any, list[int]] = {}
    for i, sample in enumerate(ladder[0]["per_sample"]):
        by_kind.setdefault(sample.get("kind"), []).append(i)
    first = {i for ids in by_kind.values() for i in ids[0::2]}

    def half(keep: bool) -> list[dict[str, Any]]:
        return [
            {**r, "per_sample": [s for i, s in enumerate(r["per_sample"]) if (i in first) == keep]}
            for r in ladder
        ]

    calibrate, held_out = half(True), half(False)
    threshold = auto_sweep(calibrate)["chosen"]["threshold"]
    point = auto_point(held_out, threshold)
    native = max(held_out, key=lambda r: r["tokens"])["per_sample"]
    point["native_accuracy"] = sum(s["hit"] for s in native) / len(native)
    point["questions"] = len(native)
    return accuracy, point
