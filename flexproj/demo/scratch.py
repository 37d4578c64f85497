"""``flexproj demo``: a miniature of the TokenFLEX table that runs on a laptop CPU.

The paper (arXiv 2504.03154) trains LLaVA-style models with a fixed number of vision
tokens N and one with a *flexible* N drawn per step from {64, 144, 256} (weights
2:3:5, of a 24x24 = 576 native grid), then evaluates every model at every N. Its
claim: the flexible model matches each fixed model at that model's own N and beats it
away from it (fixed-256 drops 60.6 -> 53.3 when run with 64 tokens).

The miniature, scaled down so that it trains in minutes on two CPU cores:

* model: a tiny, randomly initialised ``LlavaForConditionalGeneration`` from
  :func:`flexproj.testing.tiny_vlm` (CLIP tower, Llama text tower), 96 px images with
  8 px patches, so a native 12x12 = 144-token grid. The projector slot is patched with a
  :class:`~flexproj.FlexProjector` (adaptive average pooling, then LayerNorm + SwiGLU) by
  :func:`flexproj.patch`; the processor is patched too, so every batch is built by the
  real ``LlavaProcessor`` inside ``with flexproj.tokens(N)``.
* budgets: {16, 36, 64} of 144 with weights 2:3:5: the same fractions of the native
  grid as the paper's {64, 144, 256} of 576 (1/9, 1/4, 4/9; pooled sides 1/3, 1/2, 2/3).
* what trains: the projector and the whole text tower (2 layers, width 64, from
  scratch, so it learns the words too). The 1-layer vision tower is frozen; it stands in
  for a pretrained encoder, so its position table is a fixed 2-D sin-cos one at the
  scale of the patch features (``vision_pos="random"`` keeps CLIP's init, whose
  positions are ten times weaker than the pixels).
* data: :mod:`flexproj.testing.datasets` shapes VQA, drawn fresh every step (no
  epochs): the colour of one large shape (survives heavy pooling) and the colour of
  the shape in a named cell of a 4x4 board (needs at least a 4x4 token grid). The
  evaluation set is held out (another seed) and the same for every model.
* prompt: ``USER: {question} <image> ASSISTANT: {answer}``. With LLaVA-1.5's
  image-first layout a 2-layer LLM learned from scratch does not learn to find a cell
  within minutes; with the question first the image tokens can see it (docs/DEMO.md).
* every run of a seed starts from the **same initial weights**, sees the **same
  batches** in the same order and takes the **same number of steps**; only the token
  schedule differs. Loop: flat, AdamW, warm-up + cosine learning rate, cross-entropy
  on the answer token only.
* metric: exact match of the greedy answer. Answers are one word and one token, so the
  greedy answer is the argmax of the logits at the answer position (what ``generate``
  would emit first), over the whole vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import flexproj
from flexproj.demo.base_model import build_base
from flexproj.demo.config import PROMPTS, DemoConfig
from flexproj.demo.plot import plot
from flexproj.demo.report import (
    cell,
    environment,
    loadavg,
    mean_spread,
    pipe_table,
    write_outputs,
)
from flexproj.schedule import TokenSchedule
from flexproj.testing.datasets import Sample, make_sample

__all__ = [
    "EvalSet",
    "RunStats",
    "answer_logits",
    "build_model",
    "encode",
    "eval_samples",
    "evaluate",
    "format_report",
    "format_table",
    "lr_at",
    "majority_baseline",
    "prefill_times",
    "run_demo",
    "run_one",
    "sample_stream",
    "train",
]


def build_model(cfg: DemoConfig, seed: int) -> tuple[nn.Module, Any]:
    """A tiny LLaVA with a patched FlexProjector and processor, initialised from ``seed``."""
    model, processor = build_base(cfg, seed)
    torch.manual_seed(seed)  # the new projector's weights come from this seed too
    flexproj.patch(model, processor, tokens=max(cfg.train_tokens), kernel="eager")
    processor.tokenizer.padding_side = "right"  # answer positions: last real token
    if not cfg.train_vision:
        llava: Any = model
        llava.model.vision_tower.requires_grad_(False)
    return model, processor


def sample_stream(cfg: DemoConfig, seed: int) -> Iterator[list[Sample]]:
    """Endless batches, the same for every run of a seed; kinds cycle within a batch."""
    rng = random.Random(f"demo-train:{seed}")
    i = 0
    while True:
        batch = []
        for _ in range(cfg.batch_size):
            batch.append(make_sample(rng, cfg.kinds[i % len(cfg.kinds)], cfg.image_size, cfg.board))
            i += 1
        yield batch


def eval_samples(cfg: DemoConfig) -> list[Sample]:
    """The held-out set: ``eval_per_kind`` of each kind, from a seed no training run uses."""
    rng = random.Random(f"demo-eval:{cfg.eval_seed}")
    return [
        make_sample(rng, kind, cfg.image_size, cfg.board)
        for _ in range(cfg.eval_per_kind)
        for kind in cfg.kinds
    ]


def encode(
    processor: Any, samples: Sequence[Sample], tokens: int, prompt: str = "question_first"
) -> dict[str, torch.Tensor]:
    """Processor inputs for ``tokens`` vision tokens per image, plus answer bookkeeping.

    The prompt holds the answer (teacher forcing); ``answer_pos`` is its index and
    ``answer_id`` its token. With causal attention the logits at ``answer_pos - 1`` do
    not see the answer, so the same tensors serve training and greedy evaluation.
    """
    template = PROMPTS[prompt]
    texts = [template.format(question=s.question, answer=s.answer) for s in samples]
    with flexproj.tokens(tokens):
        batch = processor(
            text=texts, images=[s.image for s in samples], return_tensors="pt", padding=True
        )
    pos = batch["attention_mask"].sum(dim=1) - 1
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": batch["pixel_values"],
        "answer_pos": pos,
        "answer_id": batch["input_ids"].gather(1, pos[:, None])[:, 0],
    }


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
    """Logits of the token after the prompt (the answer) only: ``(B, vocab)``.

    The LM head runs on one position per sample instead of the whole sequence.
    """
    llava: Any = model  # LlavaForConditionalGeneration: .model (LlavaModel) and .lm_head
    with flexproj.tokens(tokens):
        hidden = llava.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).last_hidden_state
    rows = torch.arange(hidden.shape[0])
    return llava.lm_head(hidden[rows, batch["answer_pos"] - 1])


def lr_at(step: int, cfg: DemoConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@dataclass
class RunStats:
    vision_tokens: int = 0  # vision tokens fed to the LLM over the run (sum of N * batch)
    wall_s: float = 0.0
    steps_per_budget: dict[int, int] = field(default_factory=dict)
    final_loss: float = float("nan")


def train(
    model: nn.Module,
    processor: Any,
    schedule: TokenSchedule,
    cfg: DemoConfig,
    seed: int,
    desc: str = "train",
    position: int = 0,
) -> RunStats:
    """The flat loop: one budget per step from ``schedule``, loss on the answer token."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    stats = RunStats()
    stream = sample_stream(cfg, seed)
    model.train()
    ema: float | None = None
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, position=position, dynamic_ncols=True)
    for step in bar:
        tokens = schedule.budget_at(step)
        batch = encode(processor, next(stream), tokens, cfg.prompt)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = answer_logits(model, batch, tokens)
        loss = F.cross_entropy(logits.float(), batch["answer_id"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

        stats.vision_tokens += tokens * len(batch["answer_id"])
        stats.steps_per_budget[tokens] = stats.steps_per_budget.get(tokens, 0) + 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(N=tokens, loss=f"{ema:.3f}")
    stats.wall_s = time.perf_counter() - start
    stats.final_loss = float("nan") if ema is None else ema
    model.eval()
    return stats


class EvalSet:
    """The held-out samples, encoded once per budget (shared by every model)."""

    def __init__(self, processor: Any, cfg: DemoConfig) -> None:
        self.samples = eval_samples(cfg)
        self.kinds = [s.kind for s in self.samples]
        self.batch_size = cfg.eval_batch_size
        self._cache: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._processor = processor
        self._prompt = cfg.prompt

    def batches(self, tokens: int) -> list[dict[str, torch.Tensor]]:
        if tokens not in self._cache:
            bs = self.batch_size
            self._cache[tokens] = [
                encode(self._processor, self.samples[i : i + bs], tokens, self._prompt)
                for i in range(0, len(self.samples), bs)
            ]
        return self._cache[tokens]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    evalset: EvalSet,
    budgets: Sequence[int],
    desc: str = "eval",
    position: int = 0,
) -> dict[int, dict[str, float]]:
    """Accuracy per budget: ``{N: {"all": acc, kind: acc, ...}}``."""
    model.eval()
    out: dict[int, dict[str, float]] = {}
    for tokens in tqdm(budgets, desc=desc, leave=False, position=position, dynamic_ncols=True):
        hits: list[bool] = []
        for batch in evalset.batches(tokens):
            pred = answer_logits(model, batch, tokens).argmax(dim=-1)
            hits.extend((pred == batch["answer_id"]).tolist())
        acc = {"all": sum(hits) / len(hits)}
        for kind in dict.fromkeys(evalset.kinds):
            mine = [h for h, k in zip(hits, evalset.kinds, strict=True) if k == kind]
            acc[kind] = sum(mine) / len(mine)
        out[tokens] = acc
    return out


@torch.inference_mode()
def _llm_inputs(model: nn.Module, batch: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
    """The LLM's input embeddings: text embeddings with the projected image tokens in place."""
    llava: Any = model
    base = llava.model
    with flexproj.tokens(tokens):
        embeds = base.get_input_embeddings()(batch["input_ids"])
        features = base.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    features = torch.cat(list(features), dim=0).to(embeds.dtype)
    mask = (batch["input_ids"] == llava.config.image_token_id)[..., None].expand_as(embeds)
    return embeds.masked_scatter(mask, features)


def _llm_answer_logits(
    model: nn.Module, embeds: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    llava: Any = model
    hidden = llava.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return llava.lm_head(hidden[torch.arange(hidden.shape[0]), batch["answer_pos"] - 1])


@torch.inference_mode()
def prefill_times(
    model: nn.Module, evalset: EvalSet, budgets: Sequence[int], repeats: int
) -> dict[int, dict[str, float]]:
    """Seconds of one prefill (prompt -> first answer logits) per budget, on one eval batch.

    Two timings: ``full`` (vision tower + projector + LLM) and ``llm`` (the LLM alone,
    on ready input embeddings; the part that the vision-token count scales). Measured
    side by side: each repeat runs every budget once, in a shuffled order, so a change
    in the machine's speed hits all budgets alike. Median and min over repeats.
    """
    model.eval()
    batches = {n: evalset.batches(n)[0] for n in budgets}
    embeds = {n: _llm_inputs(model, batches[n], n) for n in budgets}
    # the LLM-only path gives the full path's logits (a check that it times the same work)
    for n in budgets:
        full = answer_logits(model, batches[n], n)
        torch.testing.assert_close(_llm_answer_logits(model, embeds[n], batches[n]), full)
    times: dict[int, dict[str, list[float]]] = {n: {"full": [], "llm": []} for n in budgets}
    order = list(budgets)
    rng = random.Random(0)
    for _ in tqdm(range(repeats), desc="prefill timing", leave=False, dynamic_ncols=True):
        rng.shuffle(order)
        for n in order:
            start = time.perf_counter()
            answer_logits(model, batches[n], n)
            mid = time.perf_counter()
            _llm_answer_logits(model, embeds[n], batches[n])
            times[n]["full"].append(mid - start)
            times[n]["llm"].append(time.perf_counter() - mid)
    return {
        n: {
            "median_s": statistics.median(ts["full"]),
            "min_s": min(ts["full"]),
            "llm_median_s": statistics.median(ts["llm"]),
            "llm_min_s": min(ts["llm"]),
            "batch_size": int(batches[n]["input_ids"].shape[0]),
            "seq_len": int(batches[n]["input_ids"].shape[1]),
        }
        for n, ts in times.items()
    }


def majority_baseline(cfg: DemoConfig) -> dict[str, float]:
    """Accuracy of always giving a kind's most common held-out answer (a floor to read against)."""
    samples = eval_samples(cfg)
    out = {}
    for kind in cfg.kinds:
        answers = Counter(s.answer for s in samples if s.kind == kind)
        out[kind] = answers.most_common(1)[0][1] / sum(answers.values())
    return out


def _checksum(model: nn.Module) -> float:
    """A fingerprint of the weights (to show every run of a seed starts alike)."""
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.state_dict().values()))


_EVALSETS: dict[str, EvalSet] = {}  # per process: the held-out set, encoded once per budget


def run_one(cfg: DemoConfig, seed: int, name: str, position: int = 0) -> dict[str, Any]:
    """One training run (``name`` of ``cfg.schedules(seed)``), then its evaluation."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    schedule = cfg.schedules(seed)[name]
    model, processor = build_model(cfg, seed)  # same seed, same initial weights
    init = _checksum(model)
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _EVALSETS:
        _EVALSETS[key] = EvalSet(processor, cfg)
    evalset = _EVALSETS[key]
    stats = train(
        model, processor, schedule, cfg, seed, desc=f"seed {seed} {name}", position=position
    )
    acc = evaluate(model, evalset, cfg.eval_tokens, desc=f"eval {name}", position=position)
    return {
        "seed": seed,
        "name": name,
        "init_checksum": init,
        "accuracy": {str(n): a for n, a in acc.items()},
        "vision_tokens": stats.vision_tokens,
        "wall_s": stats.wall_s,
        "steps_per_budget": {str(k): v for k, v in sorted(stats.steps_per_budget.items())},
        "final_loss": stats.final_loss,
    }


_WORKER_SLOT: int = 0


def _init_worker(slots: Any, threads: int) -> None:
    global _WORKER_SLOT
    torch.set_num_threads(threads)
    _WORKER_SLOT = slots.get()


def _run_in_worker(cfg: DemoConfig, seed: int, name: str) -> dict[str, Any]:
    return run_one(cfg, seed, name, position=_WORKER_SLOT)


def _train_all(cfg: DemoConfig, workers: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every (seed, schedule) run, serially or on ``workers`` processes of one thread."""
    tasks = [(seed, name) for seed in range(cfg.seeds) for name in cfg.schedules(seed)]
    records: list[dict[str, Any]] = []

    def report(rec: dict[str, Any]) -> None:
        records.append(rec)
        accs = " ".join(f"{n}:{rec['accuracy'][str(n)]['all']:.2f}" for n in cfg.eval_tokens)
        log(
            f"  seed {rec['seed']} {rec['name']:>12}: loss {rec['final_loss']:.3f}, "
            f"train {rec['wall_s']:.1f} s, acc {accs}"
        )

    bar = tqdm(total=len(tasks), desc="runs", position=0, dynamic_ncols=True)
    if workers <= 1:
        for seed, name in tasks:
            report(run_one(cfg, seed, name, position=1))
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")  # no fork after OpenMP threads have started
        with ctx.Manager() as manager:
            slots = manager.Queue()  # each worker takes a progress-bar row
            for i in range(workers):
                slots.put(i + 1)
            with ProcessPoolExecutor(
                workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(slots, cfg.threads or 1),
            ) as pool:
                futures = [pool.submit(_run_in_worker, cfg, seed, name) for seed, name in tasks]
                for future in as_completed(futures):
                    report(future.result())
                    bar.update()
    bar.close()
    order = {task: i for i, task in enumerate(tasks)}
    return sorted(records, key=lambda r: order[(r["seed"], r["name"])])


def run_demo(
    cfg: DemoConfig,
    out_dir: str | Path,
    *,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every schedule for every seed, evaluate at every budget, write the outputs.

    ``workers > 1`` trains that many runs at once, each in its own one-thread process.
    The tensors are tiny, so threads help little: on two cores a step at N=64 took 52 ms
    on one thread and 40 ms on two, so two one-thread workers do 1.5x the work of one
    two-thread process. Results do not depend on ``workers``. Prefill times are measured
    afterwards, in this process, all budgets side by side.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    load_start = loadavg()
    log(
        f"flexproj demo: native grid {cfg.grid_side}x{cfg.grid_side} = {cfg.native_tokens} "
        f"tokens; train budgets {list(cfg.train_tokens)} (flex weights "
        f"{[f'{w:g}' for w in cfg.flex_weights]}); eval budgets {list(cfg.eval_tokens)}; "
        f"{cfg.steps} steps x {cfg.batch_size} images; {cfg.seeds} seed(s); "
        f"{workers} worker(s)"
    )
    records = _train_all(cfg, workers, log)

    runs: dict[str, dict[str, Any]] = {}
    for rec in records:
        name = rec.pop("name")
        schedule = cfg.schedules(rec["seed"])[name].to_dict()
        schedule.pop("seed")
        runs.setdefault(name, {"schedule": schedule, "seeds": []})["seeds"].append(rec)
    kinds = ["all", *cfg.kinds]
    for rec in runs.values():
        seeds = rec["seeds"]
        rec["accuracy"] = {
            str(n): {k: mean_spread([s["accuracy"][str(n)][k] for s in seeds]) for k in kinds}
            for n in cfg.eval_tokens
        }
        rec["vision_tokens"] = statistics.fmean(s["vision_tokens"] for s in seeds)
        rec["wall_s"] = mean_spread([s["wall_s"] for s in seeds])
    train_wall = time.perf_counter() - t0

    model, processor = build_model(cfg, 0)  # compute does not depend on the weights' values
    prefill = prefill_times(model, EvalSet(processor, cfg), cfg.eval_tokens, cfg.prefill_repeats)

    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "native_tokens": cfg.native_tokens,
        "train_tokens": list(cfg.train_tokens),
        "eval_tokens": list(cfg.eval_tokens),
        "kinds": list(cfg.kinds),
        "metric": "exact match of the greedy one-token answer (argmax at the answer position)",
        "majority_baseline": majority_baseline(cfg),
        "runs": runs,
        "prefill": {str(n): v for n, v in prefill.items()},
        "workers": workers,
        "train_eval_wall_s": train_wall,
        "environment": environment(load_start),
    }
    write_outputs(results, out, plot, format_report, t0, log)
    return results


def format_table(results: dict[str, Any], kind: str = "all") -> str:
    """The paper's layout: rows = training schedule, columns = evaluation budget."""
    budgets = results["eval_tokens"]
    train = set(results["train_tokens"])
    head = ["train \\ eval"] + [f"{n}{'*' if n in train else ''}" for n in budgets]
    rows = [head]
    for name, rec in results["runs"].items():
        seeds = len(rec["seeds"])
        rows.append([name] + [cell(rec["accuracy"][str(n)][kind], seeds) for n in budgets])
    return pipe_table(rows)


def format_report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    seeds = cfg["seeds"]
    spread = " (mean±std over seeds)" if seeds > 1 else ""
    parts = [
        f"Accuracy (%) by training schedule (rows) and evaluation budget (columns){spread}; "
        f"* = a training budget; native = {results['native_tokens']} tokens.",
        "",
        "All kinds:",
        format_table(results, "all"),
    ]
    for kind in results["kinds"]:
        parts += ["", f"{kind}:", format_table(results, kind)]
    base = results.get("majority_baseline", {})
    if base:
        parts += [
            "",
            "Majority-answer baseline: "
            + ", ".join(f"{k} {v * 100:.1f}%" for k, v in base.items()),
        ]
    parts += ["", "Training cost (per run, mean over seeds):"]
    fixed_max = max(
        (rec["vision_tokens"] for name, rec in results["runs"].items() if name.startswith("fixed")),
        default=None,
    )
    for name, rec in results["runs"].items():
        rel = f" ({rec['vision_tokens'] / fixed_max:.0%} of fixed-max)" if fixed_max else ""
        parts.append(
            f"  {name:>12}: {rec['vision_tokens'] / 1e6:.3f} M vision tokens{rel}, "
            f"wall {rec['wall_s']['mean']:.1f} s (min {rec['wall_s']['min']:.1f}, max {rec['wall_s']['max']:.1f})"
        )
    if results["prefill"]:
        first = next(iter(results["prefill"].values()))
        parts += [
            "",
            f"Prefill of {first['batch_size']} prompts (ms, median / min of "
            f"{results['config']['prefill_repeats']}, all budgets side by side in one process):",
            "|    N | prompt tokens | full prefill | LLM part |",
            "|------|---------------|--------------|----------|",
        ]
        for n, p in results["prefill"].items():
            parts.append(
                f"| {n:>4} | {p['seq_len']:>13} | {p['median_s'] * 1e3:5.0f} / {p['min_s'] * 1e3:4.0f} "
                f"| {p['llm_median_s'] * 1e3:4.0f} / {p['llm_min_s'] * 1e3:3.0f} |"
            )
    return "\n".join(parts)
