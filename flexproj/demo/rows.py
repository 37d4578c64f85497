"""Step 3: the table's rows, trained through the code users run.

Per seed, the stock model is trained the way its family is (the recipe with ``--projector
stock --schedule fixed:<native>``); then each conversion row starts from its weights: the
distiller (``flexproj distill``), and the family recipe's trainer (``flexproj train``) for
the TokenFLEX, pool-after + recipe and fixed-N rows. Tasks run in dependency order on
one-thread worker processes; each ends with step 4 (:mod:`flexproj.demo.evaluation`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flexproj.demo.config import ConvertConfig
from flexproj.demo.evaluation import evaluate_run

__all__ = ["DEPENDS", "run_convert_task"]


def _recipe_argv(cfg: ConvertConfig, seed: int, model: str, weights: str | None, out: Path,
                 *, stage: str, schedule: str, steps: int, lr: float, extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    argv = [
        "--model", model, "--data", str(out.parent.parent / "data" / "train.json"),
        "--output_dir", str(out), "--stage", stage, "--schedule", schedule,
        "--prompt_format", "plain", "--max_steps", str(steps),
        "--per_device_train_batch_size", str(cfg.batch_size), "--learning_rate", str(lr),
        "--warmup_steps", str(max(1, round(cfg.warmup_ratio * steps))),
        "--weight_decay", str(cfg.weight_decay), "--adam_beta2", "0.98", "--max_grad_norm", "1.0",
        "--lr_scheduler_type", "cosine", "--logging_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", str(seed),
        "--dataloader_num_workers", "0", "--max_samples", str(steps * cfg.batch_size),
        *extra,
    ]  # fmt: skip
    if weights:
        argv += ["--weights", weights]
    return argv


def _vision_tokens(out: Path) -> int:
    lines = (out / "budgets" / "rank0.jsonl").read_text().splitlines()
    return sum(json.loads(line)["vision_tokens"] for line in lines)


def run_convert_task(cfg: ConvertConfig, seed: int, task: str, work: str) -> dict[str, Any]:
    """One task of one seed: ``stock``, ``distilled`` or a recipe row; trains, then evaluates."""
    import contextlib
    import io

    from flexproj.recipes.config import parse_args
    from flexproj.recipes.family import get_recipe
    from flexproj.recipes.trainer import train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = Path(work)
    seed_dir = root / f"seed{seed}"
    out = seed_dir / task
    eval_json = root / "data" / "eval.json"
    spec, init_weights = json.loads((seed_dir / "base.json").read_text())
    stock_model = str(seed_dir / "stock" / "model")
    log_file = seed_dir / f"{task}.log"
    record: dict[str, Any] = {"seed": seed, "task": task}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        start = time.perf_counter()
        if task == "distilled":
            from flexproj.recipes.distill import run_distill

            report = run_distill(
                spec, root / "data" / "train.json", out, weights=stock_model,
                schedule=cfg.flex_schedule, steps=cfg.distill_steps, lr=cfg.distill_lr,
                batch_size=cfg.batch_size, seed=seed, kernel="eager",
                max_images=cfg.distill_steps * cfg.batch_size, progress=False, log=lambda _m: None,
            )  # fmt: skip
            record.update(
                steps=cfg.distill_steps, vision_tokens=0, train_s=report["seconds"],
                images=cfg.distill_steps * cfg.batch_size,
                distill={k: report[k] for k in ("budgets", "per_budget")},
            )  # fmt: skip
        else:
            if task == "stock":
                argv = _recipe_argv(cfg, seed, spec, init_weights, out, stage="finetune",
                                    schedule=f"fixed:{cfg.native_tokens}", steps=cfg.stock_steps,
                                    lr=cfg.stock_lr, extra=["--projector", "stock"])  # fmt: skip
            else:
                stage = "finetune" if task == "tokenflex_finetune" else "align"
                per_sample = ["--per_sample", "true"] if task == "tokenflex_per_sample" else []
                lr = cfg.finetune_lr if stage == "finetune" else cfg.align_lr
                if task.startswith("fixed_"):
                    schedule = f"fixed:{task.removeprefix('fixed_')}"
                else:
                    schedule = cfg.flex_schedule
                extra = (
                    ["--projector", "stock"]
                    if task == "pool_after_flex"
                    else ["--init", str(seed_dir / "distilled"), "--kernel", "eager", *per_sample]
                )
                argv = _recipe_argv(cfg, seed, spec, stock_model, out, stage=stage,
                                    schedule=schedule, steps=cfg.convert_steps, lr=lr, extra=extra)  # fmt: skip
            config, training_args = parse_args(argv, get_recipe(cfg.recipe).stage_defaults)
            summary = train(cfg.recipe, config, training_args, log=lambda _m: None)
            record.update(
                steps=summary["global_step"], vision_tokens=_vision_tokens(out),
                train_s=summary["train_seconds"], train_loss=summary["train_loss"],
                images=summary["global_step"] * cfg.batch_size,
            )  # fmt: skip
        record["wall_s"] = time.perf_counter() - start
        record["accuracy"], record["auto"] = evaluate_run(out, cfg, eval_json)
    log_file.write_text(buffer.getvalue())
    return record


#: task -> the tasks of the same seed it starts from
DEPENDS = {"stock": (), "distilled": ("stock",), "pool_after_flex": ("stock",)}


def _tasks(cfg: ConvertConfig) -> list[str]:
    recipe_rows = [
        "tokenflex_align",
        "tokenflex_finetune",
        "tokenflex_per_sample",
        "pool_after_flex",
    ]
    return ["stock", "distilled", *recipe_rows, *(f"fixed_{n}" for n in cfg.train_tokens or ())]


def _depends(task: str) -> tuple[str, ...]:
    return DEPENDS.get(task, ("distilled",))


def _run_convert_in_worker(cfg: ConvertConfig, seed: int, task: str, work: str) -> dict[str, Any]:
    return run_convert_task(cfg, seed, task, work)


def run_tasks(
    cfg: ConvertConfig, work: Path, workers: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every (seed, task), in dependency order, on ``workers`` one-thread processes."""
    pending = [(seed, task) for task in _tasks(cfg) for seed in range(cfg.seeds)]
    done: set[tuple[int, str]] = set()
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(pending), desc="runs", dynamic_ncols=True)

    def ready() -> list[tuple[int, str]]:
        return [(s, t) for s, t in pending if all((s, d) in done for d in _depends(t))]

    def report(rec: dict[str, Any]) -> None:
        records.append(rec)
        done.add((rec["seed"], rec["task"]))
        accs = " ".join(f"{n}:{a['all']:.2f}" for n, a in rec["accuracy"].items())
        log(
            f"  seed {rec['seed']} {rec['task']:>18}: {rec['steps']} steps, {rec['wall_s']:.0f} s, acc {accs}"
        )
        bar.update()

    if workers <= 1:
        while pending:
            seed, task = ready()[0]
            pending.remove((seed, task))
            report(run_convert_task(cfg, seed, task, str(work)))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=torch.set_num_threads,
                                 initargs=(cfg.threads or 1,)) as pool:  # fmt: skip
            running: dict[Any, tuple[int, str]] = {}
            while pending or running:
                for item in ready():
                    if len(running) >= workers:
                        break
                    pending.remove(item)
                    running[pool.submit(_run_convert_in_worker, cfg, *item, str(work))] = item
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    report(future.result())
    bar.close()
    return records
