"""Gemma 3's two training-free modes, compared without any distillation or conversion
training: ``projector="stock"`` pooling the stock projector's outputs (``stock_pooling=
"after"``) against pooling the SigLIP grid before the stock RMSNorm + linear (``"first"``).

A tiny Gemma 3 (``tiny:gemma3``: 8x8 SigLIP grid, 16 tokens stock) is trained the way the
family trains, with its stock projector at its native 16 tokens (``flexproj train gemma3
--projector stock --schedule fixed:16 --stage finetune``) on the shapes questions of
``flexproj.testing.datasets`` (colour and position on a 4x4 board); then the same trained
model is evaluated by ``flexproj.recipes.evaluate`` in both modes at 1, 4, 9 and 16 tokens
per image, on held-out questions. Run::

    python examples/gemma3_stock_pooling.py --out runs/gemma3-pooling

and it prints the accuracy table (docs/BENCHMARKS.md quotes its output).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import flexproj
from flexproj.recipes.data import ConversationDataset
from flexproj.recipes.evaluate import evaluate_model, load_run
from flexproj.recipes.trainer import main as train
from flexproj.testing.datasets import make_sample, write_llava_dataset

BUDGETS = (1, 4, 9, 16)
KINDS = ("colour", "position")


def write_data(out: Path, n_train: int, per_kind: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(f"train:{seed}")
    train_set = [make_sample(rng, KINDS[i % 2], 64, 4) for i in range(n_train)]
    rng = random.Random(f"eval:{seed}")
    held_out = [make_sample(rng, kind, 64, 4) for _ in range(per_kind) for kind in KINDS]
    return (
        write_llava_dataset(train_set, out, "train.json", prefix="t", question_first=True),
        write_llava_dataset(held_out, out, "eval.json", prefix="e", question_first=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gemma3-pooling"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--eval_per_kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_json, eval_json = write_data(
        args.out / "data", args.steps * args.batch_size, args.eval_per_kind, args.seed
    )
    run_dir = args.out / "stock"
    argv = [
        "--model", "tiny:gemma3", "--data", str(train_json), "--output_dir", str(run_dir),
        "--stage", "finetune", "--projector", "stock", "--schedule", "fixed:16",
        "--prompt_format", "plain", "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", "3e-3",
        "--warmup_steps", "20", "--lr_scheduler_type", "cosine", "--logging_strategy", "no",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--seed", str(args.seed), "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if train("gemma3", argv) != 0:
        raise SystemExit("training failed")

    run = load_run(run_dir)  # patched with projector="stock" (pool-after)
    dataset = ConversationDataset(eval_json)
    results = {}
    for pooling in ("after", "first"):
        flexproj.unpatch(run.model)
        flexproj.patch(run.model, run.processor, projector="stock", stock_pooling=pooling)
        rows = evaluate_model(
            run, dataset, BUDGETS, prefill_repeats=0, with_loss=False, progress=False
        )
        results[pooling] = {r["tokens"]: r["accuracy"] for r in rows}
    (args.out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                       "accuracy": results}, indent=2))  # fmt: skip
    print(f"| stock_pooling | {' | '.join(f'{n} tokens' for n in BUDGETS)} |")
    print(f"| --- |{' --- |' * len(BUDGETS)}")
    for pooling, acc in results.items():
        print(f"| {pooling} | {' | '.join(f'{100 * acc[n]:.1f}%' for n in BUDGETS)} |")
    print(f"({len(dataset)} held-out questions, {args.steps} training steps, seed {args.seed})")


if __name__ == "__main__":
    main()
