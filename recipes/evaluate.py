"""Evaluate trained FlexProjectors at several vision-token budgets (``flexproj eval``).

For each run directory (written by ``flexproj train``; see ``recipes/trainer.py``) the
base model is loaded, the saved projector put on it with
:func:`flexproj.from_pretrained` (plus the run's LoRA adapters or fine-tuned weights),
and, at every budget N, on a LLaVA-format dataset:

* **loss**: teacher-forced cross-entropy on the answer tokens (the training loss,
  averaged over all answer tokens of the dataset);
* **accuracy**: exact match of the greedy answer (``generate``, stopped at the family's
  end-of-turn marker) with the reference, both lower-cased, punctuation removed and
  whitespace collapsed; meant for short answers (VQA-style single words or phrases);
* **prefill time**: wall time of one forward pass over the prompts (what ``generate``
  spends before the first new token), per sample: the fastest of ``prefill_repeats``
  passes per batch, then the median over batches (robust to a busy machine; the mean
  is kept too), after one warm-up pass per N;
* the vision tokens per sample the LLM actually received, and the accuracy per question
  ``kind`` when the records carry one (the synthetic shapes data does).

The prompt is the conversation up to its last answer, formatted as the run was trained
(``recipe.json`` records the prompt format). Results go to ``eval.json``, a markdown
table ``eval.md`` and a plot ``eval.png`` of accuracy and loss against N, one line per
run.
"""

from __future__ import annotations

import json
import re
import statistics
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import flexproj
from flexproj._types import Model
from flexproj.adaptive import answer_confidence
from flexproj.errors import BudgetError, FlexprojError

__all__ = [
    "EvalError",
    "EvalRun",
    "auto_point",
    "auto_sweep",
    "check_budgets",
    "evaluate",
    "evaluate_model",
    "load_run",
    "normalize_answer",
    "run_batcher",
    "write_report",
]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


class EvalError(FlexprojError, ValueError):
    """An evaluation that cannot run as asked (missing run files, unknown family ...)."""


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed: ``" Red."`` -> ``"red"``."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass
class EvalRun:
    """A loaded run: the model with its projector (and adapters), ready to evaluate."""

    label: str
    path: Path
    model: Model
    processor: Any
    recipe: Any
    info: dict[str, Any] = field(default_factory=dict)
    keep: Any = None  # the peft wrapper, kept alive with its adapters


def load_run(
    run: str | Path,
    *,
    label: str | None = None,
    model: str | None = None,
    family: str | None = None,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
) -> EvalRun:
    """Load base model + the run's projector (+ LoRA adapters / fine-tuned weights).

    The base model and family come from the run's ``recipe.json``; ``model`` / ``family``
    override them (a bare projector directory needs ``model``; the family is then inferred
    from the model's ``model_type``).
    """
    from flexproj.recipes.family import get_recipe, recipe_for_model

    path = Path(run)
    info_file = path / "recipe.json"
    info: dict[str, Any] = json.loads(info_file.read_text()) if info_file.is_file() else {}
    outputs = info.get("outputs", {})
    config = info.get("config", {})
    stock = config.get("projector", "flex") == "stock"
    if stock and not outputs.get("model"):
        raise EvalError(f"--run {path}: a --projector stock run without its model/ directory")
    if not stock and not (path / "flexproj.safetensors").is_file():
        raise EvalError(f"--run {path}: no flexproj.safetensors (not a flexproj train output_dir?)")
    spec = model or info.get("model")
    if not spec:
        raise EvalError(f"--run {path} has no recipe.json: pass --model (the base model)")
    family = family or info.get("family")
    recipe = get_recipe(family) if family else recipe_for_model(str(spec))
    weights = str(path / outputs["model"]) if outputs.get("model") else config.get("weights")
    base, processor = recipe.load(
        str(spec),
        dtype=dtype,
        attn_implementation=config.get("attn_implementation"),
        processor_kwargs=json.loads(config["processor_kwargs"])
        if config.get("processor_kwargs")
        else None,
        weights=weights,
    )
    if stock:  # the trained stock projector, its outputs pooled to the budget
        flexproj.patch(base, processor, projector="stock")
    else:
        flexproj.from_pretrained(base, path, processor)
    keep = None
    if outputs.get("lora"):
        from peft import PeftModel

        keep = PeftModel.from_pretrained(
            base, str(path / outputs["lora"])
        )  # LoRA layers go into `base`
    base.to(device).eval()
    return EvalRun(label or path.name, path, base, processor, recipe, info, keep)


def check_budgets(model: Model, budgets: Sequence[int], flag: str = "--tokens") -> None:
    """Raise :class:`BudgetError` naming the first budget ``model`` cannot serve."""
    from flexproj.registry import adapter_for

    adapter = adapter_for(model)
    native = adapter.native_tokens(model)
    for n in budgets:
        try:
            adapter.check_budget(n, native)
        except BudgetError as exc:
            raise BudgetError(f"{flag} {n}: {exc}") from None


def run_batcher(run: EvalRun) -> Any:
    """The :class:`~flexproj.recipes.data.Batcher` that formats prompts as ``run`` was
    trained (prompt format, system prompt and padding from its ``recipe.json``)."""
    from flexproj.recipes.data import Batcher

    recipe, processor, info = run.recipe, run.processor, run.info
    return Batcher(
        recipe,
        processor,
        prompt_format=recipe.resolve_prompt_format(processor, info.get("prompt_format", "auto")),
        system_prompt=info.get("system_prompt"),
        pad_to_square=bool(info.get("pad_to_square", recipe.use_pad_to_square(run.model, None))),
    )


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _check_budgets(model: Model, budgets: Sequence[int]) -> None:
    from flexproj.registry import adapter_for

    adapter = adapter_for(model)
    native = adapter.native_tokens(model)
    for n in budgets:
        try:
            adapter.check_budget(n, native)
        except BudgetError as exc:
            raise BudgetError(f"--tokens {n}: {exc}") from None


def _prefill_seconds(
    model: Model, prompts: dict[str, Any], repeats: int, warm_up: bool
) -> float | None:
    """The fastest of ``repeats`` timed prefills of ``prompts``, per sample (None: no timing)."""
    if repeats < 1:
        return None
    device = next(model.parameters()).device
    if warm_up:  # the first batch of a budget: not timed
        model(**prompts)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(**prompts)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) / int(prompts["input_ids"].shape[0])


@dataclass
class _Tally:
    """What one budget's batches add up to."""

    loss_sum: float = 0.0
    answer_tokens: int = 0
    vision: int = 0
    prefill: list[float] = field(default_factory=list)  # seconds per sample, one per batch
    #: every sample: id, kind, reference and generated answer, hit, confidence, vision tokens
    per_sample: list[dict[str, Any]] = field(default_factory=list)

    def result(self, n: int, with_loss: bool) -> dict[str, Any]:
        samples = len(self.per_sample)
        by_kind: dict[str, list[int]] = {}
        for s in self.per_sample:
            if s["kind"] is not None:
                by_kind.setdefault(str(s["kind"]), []).append(int(s["hit"]))
        return {
            "tokens": n,
            "vision_tokens_per_sample": self.vision / samples,
            "loss": self.loss_sum / max(self.answer_tokens, 1) if with_loss else None,
            "accuracy": sum(s["hit"] for s in self.per_sample) / samples,
            "prefill_ms_per_sample": 1000 * statistics.median(self.prefill)
            if self.prefill
            else None,
            "prefill_ms_per_sample_mean": 1000 * statistics.fmean(self.prefill)
            if self.prefill
            else None,
            "samples": samples,
            "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "examples": [
                {"id": s["id"], "answer": s["answer"], "generated": s["generated"]}
                for s in self.per_sample[:5]
            ],
            "per_sample": self.per_sample,
        }


def _generate(
    run: EvalRun, batcher: Any, prompts: dict[str, Any], answers: Sequence[str],
    examples: Sequence[dict[str, Any]], max_new_tokens: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy answers of one batch, one record per sample (what eval.json keeps)."""
    model, recipe, tokenizer = run.model, run.recipe, run.processor.tokenizer
    stop = recipe.stop_token_ids(run.processor)
    generated = model.generate(
        **prompts, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
        pad_token_id=batcher.pad_id, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    new = generated.sequences[:, prompts["input_ids"].shape[1] :]
    confidence = answer_confidence(generated.scores, new, stop).tolist()
    row_vision = (prompts["input_ids"] == recipe.image_token_id(model)).sum(-1).tolist()
    records = []
    for row, (ids, ref, ex) in enumerate(zip(new.tolist(), answers, examples, strict=True)):
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))  # end of turn
        answer = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
        records.append({
            "id": ex["id"], "kind": ex.get("kind"), "answer": ref, "generated": answer,
            "hit": normalize_answer(answer) == normalize_answer(ref),
            "confidence": confidence[row],
            "vision_tokens_per_image": row_vision[row] / max(1, len(ex["images"])),
        })  # fmt: skip
    return records


@torch.no_grad()
def evaluate_model(
    run: EvalRun,
    dataset: Any,
    budgets: Sequence[int],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prefill_repeats: int = 3,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    with_loss: bool = True,
) -> list[dict[str, Any]]:
    """Per-budget ``{"tokens", "loss", "accuracy", "prefill_ms_per_sample", ...}`` of one run.

    ``prefill_repeats=0`` skips the timing (``prefill_ms_*`` are then None) and
    ``with_loss=False`` the teacher-forced loss (None): accuracy only, about three times
    faster. ``per_sample`` holds every sample's reference and generated answer.
    """
    from tqdm.auto import tqdm

    say = log or tqdm.write
    model, recipe = run.model, run.recipe
    check_budgets(model, budgets)
    batcher = run_batcher(run)
    device = next(model.parameters()).device
    image_token = recipe.image_token_id(model)
    starts = list(range(0, len(dataset), batch_size))
    results = []
    for n in budgets:
        tally = _Tally()
        with flexproj.tokens(n):
            bar = tqdm(starts, desc=f"{run.label} N={n}", disable=not progress, leave=False)
            for b, start in enumerate(bar):
                examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                if with_loss:
                    batch = _to(batcher.train_batch(examples), device)
                    count = int((batch["labels"][:, 1:] != -100).sum())
                    tally.loss_sum += float(model(**batch).loss) * count
                    tally.answer_tokens += count
                prompts, answers = batcher.generation_batch(examples)
                prompts = _to(prompts, device)
                seconds = _prefill_seconds(model, prompts, prefill_repeats, warm_up=b == 0)
                if seconds is not None:
                    tally.prefill.append(seconds)
                tally.per_sample += _generate(
                    run, batcher, prompts, answers, examples, max_new_tokens
                )
                tally.vision += int((prompts["input_ids"] == image_token).sum())
        result = tally.result(n, with_loss)
        loss_text = "" if result["loss"] is None else f"loss {result['loss']:.4f}  "
        prefill = result["prefill_ms_per_sample"]
        say(
            f"{run.label}: N={n:>4} vision tokens/sample {result['vision_tokens_per_sample']:.1f}  "
            f"{loss_text}accuracy {result['accuracy']:.3f}"
            + ("" if prefill is None else f"  prefill {prefill:.2f} ms/sample")
        )
        results.append(result)
    return results


# ----------------------------------------------------------------------------- automatic budget


def _ladder(
    results: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    ladder = sorted(results, key=lambda r: r["tokens"])
    rungs = [r["per_sample"] for r in ladder]
    if not rungs or not rungs[0] or any(len(r) != len(rungs[0]) for r in rungs):
        raise EvalError("auto sweep: every budget must have scored the same samples")
    return ladder, rungs


def auto_point(results: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Accuracy and vision tokens of :func:`flexproj.adaptive_generate` at ``threshold`` on
    these samples: each answers at the first budget whose answer's confidence reaches the
    threshold (else the largest), exactly as ``adaptive_generate`` decides, and costs the
    vision tokens of every rung it went through."""
    ladder, rungs = _ladder(results)
    n = len(rungs[0])
    hits, answered, spent = 0, 0.0, 0.0
    chosen: dict[int, int] = {}
    by_kind: dict[str, list[int]] = {}
    for i in range(n):
        level = next(
            (lv for lv, rung in enumerate(rungs) if rung[i]["confidence"] >= threshold),
            len(rungs) - 1,
        )
        sample, budget = rungs[level][i], ladder[level]["tokens"]
        spent += sum(rung[i]["vision_tokens_per_image"] for rung in rungs[: level + 1])
        hits += sample["hit"]
        answered += sample["vision_tokens_per_image"]
        chosen[budget] = chosen.get(budget, 0) + 1
        if sample.get("kind") is not None:
            by_kind.setdefault(str(sample["kind"]), []).append(budget)
    return {
        "threshold": threshold,
        "accuracy": hits / n,
        "vision_tokens_per_image": answered / n,
        "vision_tokens_per_image_spent": spent / n,
        "answered_at": dict(sorted(chosen.items())),
        "mean_budget_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    }


def auto_sweep(results: Sequence[dict[str, Any]], margin: float = 0.01) -> dict[str, Any]:
    """:func:`auto_point` at every threshold that matters, on these samples.

    ``results``: one run's per-budget results (with ``per_sample``), the budgets being the
    ladder. Returns every threshold's point, the Pareto front with the fixed budgets, and
    the cheapest threshold whose accuracy is within ``margin`` of the largest budget's.
    """
    ladder, rungs = _ladder(results)
    n = len(rungs[0])
    grid = {round(i / 20, 2) for i in range(21)}
    thresholds = sorted(grid | {s["confidence"] for rung in rungs for s in rung} | {1.01})
    points = [auto_point(ladder, t) for t in thresholds]
    fixed = [
        {
            "tokens": r["tokens"],
            "accuracy": sum(s["hit"] for s in r["per_sample"]) / n,
            "vision_tokens_per_image": sum(s["vision_tokens_per_image"] for s in r["per_sample"])
            / n,
        }
        for r in ladder
    ]
    target = fixed[-1]["accuracy"] - margin
    within = [p for p in points if p["accuracy"] >= target]
    best = min(within, key=lambda p: (p["vision_tokens_per_image_spent"], -p["accuracy"]))
    candidates = [("fixed", f["vision_tokens_per_image"], f["accuracy"], f) for f in fixed] + [
        ("auto", p["vision_tokens_per_image_spent"], p["accuracy"], p) for p in points
    ]
    pareto = [
        {"kind": kind, **entry}
        for kind, cost, acc, entry in candidates
        if not any(
            c2 <= cost and a2 >= acc and (c2, a2) != (cost, acc) for _, c2, a2, _ in candidates
        )
    ]
    return {
        "margin": margin,
        "thresholds": points,
        "fixed": fixed,
        "chosen": best,
        "pareto": pareto,
    }


# ----------------------------------------------------------------------------- reports


def write_report(report: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """``eval.json``, ``eval.md`` and ``eval.png`` (accuracy and loss vs N) in ``output_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md", "plot": out / "eval.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")

    lines = [
        f"# flexproj eval: {report['data']}",
        "",
        f"{report['samples']} samples; accuracy = exact match after lower-casing and removing punctuation.",
        "",
        "| run | N | vision tokens / sample | loss | accuracy | prefill ms / sample |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        for r in run["results"]:
            loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
            prefill = r["prefill_ms_per_sample"]
            lines.append(
                f"| {run['label']} | {r['tokens']} | {r['vision_tokens_per_sample']:.1f} | {loss} "
                f"| {r['accuracy']:.3f} | {'-' if prefill is None else f'{prefill:.2f}'} |"
            )
    autos = [run for run in report["runs"] if "auto" in run]
    for run in autos:
        auto = run["auto"]
        chosen = auto["chosen"]
        lines += [
            "",
            f"## {run['label']}: automatic budget (flexproj.adaptive_generate, ladder "
            f"{[f['tokens'] for f in auto['fixed']]})",
            "",
            f"Chosen threshold {chosen['threshold']:.3f} (the cheapest within "
            f"{100 * auto['margin']:.1f} points of the largest budget): accuracy "
            f"{chosen['accuracy']:.3f} at {chosen['vision_tokens_per_image_spent']:.1f} vision tokens "
            f"per image spent ({chosen['vision_tokens_per_image']:.1f} in the answering rung); "
            f"answered at {chosen['answered_at']}; mean budget by question kind "
            f"{chosen['mean_budget_by_kind']}.",
            "",
            "| point | threshold / N | accuracy | vision tokens / image |",
            "|---|---:|---:|---:|",
        ]
        for p in auto["pareto"]:
            label = p["tokens"] if p["kind"] == "fixed" else f"{p['threshold']:.3f}"
            cost = p.get("vision_tokens_per_image_spent", p["vision_tokens_per_image"])
            lines.append(f"| {p['kind']} | {label} | {p['accuracy']:.3f} | {cost:.1f} |")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    if autos:
        paths["auto_plot"] = out / "eval_auto.png"
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in autos:
            auto = run["auto"]
            points = sorted(auto["thresholds"], key=lambda p: p["vision_tokens_per_image_spent"])
            ax.plot([p["vision_tokens_per_image_spent"] for p in points],
                    [p["accuracy"] for p in points], alpha=0.6, label=f"{run['label']} auto")  # fmt: skip
            ax.plot([f["vision_tokens_per_image"] for f in auto["fixed"]],
                    [f["accuracy"] for f in auto["fixed"]], "o", label=f"{run['label']} fixed N")  # fmt: skip
            chosen = auto["chosen"]
            ax.plot([chosen["vision_tokens_per_image_spent"]], [chosen["accuracy"]], "*",
                    markersize=12, label=f"{run['label']} chosen threshold")  # fmt: skip
        ax.set_xlabel("vision tokens per image (auto: every rung spent)")
        ax.set_ylabel("accuracy (exact match)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(paths["auto_plot"], dpi=120)
        plt.close(fig)

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for run in report["runs"]:
        ns = [r["tokens"] for r in run["results"]]
        acc_ax.plot(ns, [r["accuracy"] for r in run["results"]], marker="o", label=run["label"])
        loss_ax.plot(ns, [r["loss"] for r in run["results"]], marker="o", label=run["label"])
    for ax, name in ((acc_ax, "accuracy (exact match)"), (loss_ax, "answer loss")):
        ax.set_xlabel("vision tokens N")
        ax.set_ylabel(name)
        ax.set_xticks(report["budgets"])
        ax.grid(True, alpha=0.3)
        ax.legend()
    acc_ax.set_ylim(-0.02, 1.02)
    fig.suptitle(f"flexproj eval: {Path(report['data']).name}")
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)
    return paths


def evaluate(
    runs: Sequence[str | Path],
    data: str | Path,
    budgets: Sequence[int] = (64, 144, 256),
    *,
    labels: Sequence[str] | None = None,
    output_dir: str | Path = "eval",
    image_folder: str | Path | None = None,
    max_samples: int | None = None,
    model: str | None = None,
    family: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prefill_repeats: int = 3,
    dtype: str = "auto",
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    auto: bool = False,
    auto_margin: float = 0.01,
) -> dict[str, Any]:
    """Evaluate every run at every budget; writes the reports and returns the JSON report.

    ``auto``: also the automatic budget's calibration per run (:func:`auto_sweep` over the
    budgets as the ladder)."""
    from flexproj.recipes.data import ConversationDataset

    if not runs:
        raise EvalError("give at least one --run directory")
    if labels and len(labels) != len(runs):
        raise EvalError(
            f"{len(labels)} --label(s) for {len(runs)} --run(s); give one per run or none"
        )
    if not budgets:
        raise EvalError("give at least one budget (--tokens)")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise EvalError(f"--{name} must be at least 1, got {value}")
    if prefill_repeats < 0:
        raise EvalError(f"--prefill_repeats must be 0 (no timing) or more, got {prefill_repeats}")
    dataset = ConversationDataset(data, image_folder, max_samples)  # checked before any model loads
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report: dict[str, Any] = {
        "data": str(data),
        "samples": len(dataset),
        "budgets": [int(n) for n in budgets],
        "device": str(target),
        "runs": [],
    }
    for i, run_dir in enumerate(runs):
        label = labels[i] if labels else None
        run = load_run(run_dir, label=label, model=model, family=family, dtype=dtype, device=target)
        results = evaluate_model(
            run,
            dataset,
            budgets,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            prefill_repeats=prefill_repeats,
            progress=progress,
            log=log,
        )
        entry: dict[str, Any] = {
            "label": run.label,
            "run": str(run.path),
            "model": run.info.get("model", model),
            "results": results,
        }
        if auto:
            sweep = entry["auto"] = auto_sweep(results, auto_margin)
            chosen = sweep["chosen"]
            (log or print)(
                f"{run.label}: auto threshold {chosen['threshold']:.3f}: accuracy "
                f"{chosen['accuracy']:.3f} at {chosen['vision_tokens_per_image_spent']:.1f} vision "
                f"tokens per image (largest budget: {results[-1]['accuracy']:.3f} at "
                f"{sweep['fixed'][-1]['vision_tokens_per_image']:.1f})"
            )
        report["runs"].append(entry)
        del run
    paths = write_report(report, output_dir)
    (log or print)(f"wrote {', '.join(str(p) for p in paths.values())}")
    return report
