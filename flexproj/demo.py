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
import os
import platform
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
from flexproj.schedule import TokenSchedule
from flexproj.testing import tiny_vlm
from flexproj.testing.datasets import KINDS, VOCAB, Sample, make_sample, write_llava_dataset

__all__ = ["DemoConfig", "format_table", "run_demo"]


PROMPTS = {
    "image_first": "USER: <image>\n{question} ASSISTANT: {answer}",  # LLaVA-1.5's layout
    "question_first": "USER: {question} <image> ASSISTANT: {answer}",
}


# ----------------------------------------------------------------------------- defaults


@dataclass
class DemoConfig:
    """Everything a demo run depends on (written into ``results.json``)."""

    # geometry: 96 px / 8 px patches = 12x12 = 144 native tokens (LLaVA-1.5: 24x24 = 576)
    image_size: int = 96
    patch_size: int = 8
    board: int = 4  # position questions name a cell of a board x board grid (24 px cells)
    kinds: tuple[str, ...] = ("colour", "position")  # "count" too: see docs/DEMO.md
    prompt: str = "question_first"  # or "image_first" (LLaVA-1.5's layout; see PROMPTS)
    # training budgets and the flexible schedule's weights (paper: 64/144/256, 2:3:5)
    train_tokens: tuple[int, ...] = (16, 36, 64)
    flex_weights: tuple[float, ...] = (2.0, 3.0, 5.0)
    # evaluation budgets: the training ones, and ones no model trained on
    eval_tokens: tuple[int, ...] = (4, 9, 16, 25, 36, 49, 64, 100, 144)
    # model: a 2-layer LLM trained from scratch, a frozen 1-layer CLIP tower
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2  # head_dim 32
    rope_theta: float = 100.0  # prompts are ~20-170 tokens long, not thousands
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_pos: str = "sincos"  # "sincos": fixed 2-D sin-cos position embeddings; "random"
    train_vision: bool = False
    # optimisation (identical for every run)
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # evaluation
    eval_per_kind: int = 200
    eval_batch_size: int = 100
    eval_seed: int = 1_000_003  # held out: training streams use seeds 0, 1, 2, ...
    prefill_repeats: int = 7
    # repetition
    seeds: int = 3
    threads: int | None = None

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.train_tokens = tuple(self.train_tokens)
        self.flex_weights = tuple(self.flex_weights)
        native = self.native_tokens
        self.eval_tokens = tuple(sorted({*self.eval_tokens, *self.train_tokens}))
        for n in (*self.train_tokens, *self.eval_tokens):
            if not 0 < n <= native:
                raise ValueError(f"budget {n} is outside 1..{native} (the native grid)")
        if len(self.flex_weights) != len(self.train_tokens):
            raise ValueError("one flexible-schedule weight per training budget")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown question kinds {sorted(unknown)}; choose from {KINDS}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {sorted(PROMPTS)}, got {self.prompt!r}")
        if self.seeds < 1 or self.steps < 1:
            raise ValueError("seeds and steps must be at least 1")

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def native_tokens(self) -> int:
        return self.grid_side**2

    def schedules(self, seed: int) -> dict[str, TokenSchedule]:
        """The training runs of one seed: one per fixed budget, then the flexible one."""
        runs = {f"fixed-{n}": TokenSchedule.fixed(n, seed=seed) for n in self.train_tokens}
        ratio = ":".join(f"{w:g}" for w in self.flex_weights)
        runs[f"flex {ratio}"] = TokenSchedule(self.train_tokens, self.flex_weights, seed=seed)
        return runs


def quick_config(**overrides: Any) -> DemoConfig:
    """About a minute on two cores: fewer steps, fewer budgets, a small eval set."""
    base: dict[str, Any] = {
        "steps": 120,
        "batch_size": 16,
        "eval_per_kind": 16,
        "eval_batch_size": 32,
        "eval_tokens": (4, 16, 36, 64, 144),
        "seeds": 1,
        "prefill_repeats": 2,
        "warmup_steps": 5,
    }
    base.update(overrides)
    return DemoConfig(**base)


# ----------------------------------------------------------------------------- model and data


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


def build_base(cfg: DemoConfig, seed: int) -> tuple[nn.Module, Any]:
    """The demo's tiny stock LLaVA (unpatched, stock projector) and its processor."""
    hidden = cfg.text_hidden
    model, processor = tiny_vlm(
        "llava",
        seed=seed,
        vision_config={
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": 2 * cfg.vision_hidden,
            "num_hidden_layers": cfg.vision_layers,
        },
        vision_feature_layer=-1,
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": max(1, cfg.text_heads // 2),
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        },
        extra_words=list(VOCAB),
        # the images are drawn at the model's size: no resize or crop needed (saves time)
        image_processor={"do_resize": False, "do_center_crop": False},
    )
    if cfg.vision_pos == "sincos":
        _set_sincos_positions(model, cfg.grid_side)
    elif cfg.vision_pos != "random":
        raise ValueError(f"vision_pos must be 'sincos' or 'random', got {cfg.vision_pos!r}")
    return model, processor


def sincos_2d(side: int, dim: int, temperature: float = 100.0) -> torch.Tensor:
    """MAE-style fixed 2-D sin-cos embeddings of a ``side x side`` grid, row-major: ``(side**2, dim)``.

    Half the channels encode the row, half the column, each as sin/cos pairs of
    geometrically spaced frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2-D embeddings need a width divisible by 4, got {dim}")
    freqs = temperature ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(x: torch.Tensor) -> torch.Tensor:
        angles = x.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


def _set_sincos_positions(model: nn.Module, side: int) -> None:
    """Give the random CLIP tower fixed 2-D sin-cos positions, at the scale of its patch features.

    A pretrained encoder's features know where they are; a random one's barely do (CLIP
    initialises its learned position table with std 0.02, an order of magnitude below
    the patch signal). The CLS row is zeroed.
    """
    llava: Any = model
    embeddings = llava.model.vision_tower.embeddings
    table = embeddings.position_embedding.weight
    grid = sincos_2d(side, table.shape[1])
    patch_std = float(embeddings.patch_embedding.weight.detach().std()) * math.sqrt(
        embeddings.patch_embedding.weight[0].numel()
    )
    with torch.no_grad():
        table.zero_()
        table[-side * side :] = grid * (patch_std / float(grid.std()))


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


# ----------------------------------------------------------------------------- training


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


# ----------------------------------------------------------------------------- evaluation


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


# ----------------------------------------------------------------------------- the run


def _mean_spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages (wall times mean little on a busy machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
    load_start = _loadavg()
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
            str(n): {k: _mean_spread([s["accuracy"][str(n)][k] for s in seeds]) for k in kinds}
            for n in cfg.eval_tokens
        }
        rec["vision_tokens"] = statistics.fmean(s["vision_tokens"] for s in seeds)
        rec["wall_s"] = _mean_spread([s["wall_s"] for s in seeds])
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
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
            "platform": platform.platform(),
        },
    }
    plot_path = out / "accuracy_vs_budget.png"
    plot(results, plot_path)
    results["plot"] = plot_path.name
    results["total_wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("")
    log(format_report(results))
    log(f"\nwrote {out / 'results.json'} and {plot_path} in {results['total_wall_s']:.0f} s")
    return results


# ----------------------------------------------------------------------------- reporting


def _pipe_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first is the header) as an aligned markdown table: labels left, cells right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(stat: dict[str, float], seeds: int, pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    if seeds > 1:
        return f"{stat['mean'] * scale:.1f}±{stat['std'] * scale:.1f}"
    return f"{stat['mean'] * scale:.1f}"


def format_table(results: dict[str, Any], kind: str = "all") -> str:
    """The paper's layout: rows = training schedule, columns = evaluation budget."""
    budgets = results["eval_tokens"]
    train = set(results["train_tokens"])
    head = ["train \\ eval"] + [f"{n}{'*' if n in train else ''}" for n in budgets]
    rows = [head]
    for name, rec in results["runs"].items():
        seeds = len(rec["seeds"])
        rows.append([name] + [_cell(rec["accuracy"][str(n)][kind], seeds) for n in budgets])
    return _pipe_table(rows)


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


def _budget_axes(ax: Any, budgets: Sequence[int], train_tokens: Sequence[int], kind: str) -> None:
    """Accuracy-vs-budget axes: log budgets, training budgets marked, one panel per kind."""
    for n in train_tokens:
        ax.axvline(n, color="0.85", lw=0.8, zorder=0)
    ax.set_ylim(0, 105)
    ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(n) for n in budgets], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("vision tokens at evaluation")
    ax.set_title(kind if kind != "all" else "all questions")
    ax.grid(alpha=0.3)


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy vs evaluation budget, one line per training schedule (error bars: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = results["eval_tokens"]
    kinds = ["all", *results["kinds"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, rec in results["runs"].items():
            mean = [rec["accuracy"][str(n)][kind]["mean"] * 100 for n in budgets]
            std = [rec["accuracy"][str(n)][kind]["std"] * 100 for n in budgets]
            style = "-" if name.startswith("flex") else "--"
            width = 2.4 if name.startswith("flex") else 1.4
            ax.errorbar(
                budgets,
                mean,
                yerr=std,
                fmt=style,
                marker="o",
                ms=3,
                lw=width,
                capsize=2,
                label=name,
            )
        _budget_axes(ax, budgets, results["train_tokens"], kind)
    axes[0][0].set_ylabel("exact-match accuracy (%)")
    axes[0][0].legend(fontsize=8, title="trained with", title_fontsize=8)
    seeds = results["config"]["seeds"]
    fig.suptitle(
        f"flexproj demo: tiny LLaVA, native {results['native_tokens']} tokens, "
        f"{seeds} seed(s), error bars = std over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================= conversion
#
# The default experiment: convert a VLM someone already trained. A tiny VLM is trained
# the way its family is trained, with its stock projector at its native budget (the
# recipe with --projector stock --schedule fixed:<native>); then each conversion row
# starts from that model's weights, through the same code users run: the family recipe
# and its trainer (flexproj.recipes.trainer), the distiller (flexproj.recipes.distill)
# and the evaluator (flexproj.recipes.evaluate).

#: per family: recipe, tiny model, image size (the board's cells must be resolvable at the
#: native grid), native tokens, training budgets (the paper's 1/9, 1/4, 4/9 of the native
#: grid where the grid allows) and evaluation budgets
FAMILY_SETUPS: dict[str, dict[str, Any]] = {
    "llava": {
        "recipe": "llava",
        "image_size": 96,
        "native": 144,
        "train_tokens": (16, 36, 64),
        "eval_tokens": (4, 9, 16, 25, 36, 49, 64, 100, 144),
    },
    "qwen2_5_vl": {
        "recipe": "qwen_vl",
        "image_size": 96,
        "native": 36,  # 96 px: 12x12 patches, 6x6 merged units
        "train_tokens": (4, 9, 16),
        "eval_tokens": (1, 4, 9, 16, 25, 36),
    },
    "internvl": {
        "recipe": "internvl",
        "image_size": 64,
        "native": 16,  # one 64 px tile: 8x8 ViT grid, 4x4 after pixel shuffle
        "train_tokens": (1, 4, 9),
        "eval_tokens": (1, 4, 9, 16),
    },
}

ROW_LABELS = {
    "stock": "stock (native budget)",
    "pool_after": "stock + pool-after, no training",
    "distilled": "distilled FlexProjector, no LLM training",
    "tokenflex_align": "TokenFLEX: distilled + flex recipe (align)",
    "tokenflex_finetune": "TokenFLEX: distilled + flex recipe (finetune)",
    "tokenflex_per_sample": "TokenFLEX, one budget per sample: distilled + flex recipe (align)",
    "pool_after_flex": "pool-after + flex recipe (align)",
}


@dataclass
class ConvertConfig:
    """Everything the conversion run depends on (written into ``results.json``)."""

    family: str = "llava"
    # the stock reference: projector + LLM trained at the native budget from a random init
    # (the default run: about 4m20s on 2 CPU cores, docs/DEMO.md)
    stock_steps: int = 800
    stock_lr: float = 3e-3
    # conversion: K optimiser steps per recipe row (a fraction of the stock training)
    convert_steps: int = 160  # 20% of the stock training
    align_lr: float = 3e-3
    finetune_lr: float = 1e-3
    distill_steps: int = 100
    distill_lr: float = 3e-3
    batch_size: int = 24
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    flex_weights: tuple[float, ...] = (2.0, 3.0, 5.0)
    # None: the family's (FAMILY_SETUPS)
    train_tokens: tuple[int, ...] | None = None
    eval_tokens: tuple[int, ...] | None = None
    image_size: int | None = None
    kinds: tuple[str, ...] = ("colour", "position")
    board: int = 4
    eval_per_kind: int = 100
    eval_batch_size: int = 100
    eval_seed: int = 1_000_003
    data_seed: int = 7
    seeds: int = 3
    # torch threads per task: one (two one-thread workers beat one two-thread process on
    # these tiny tensors, and a busy machine punishes oversubscription hard)
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.family not in FAMILY_SETUPS:
            raise ValueError(f"family must be one of {sorted(FAMILY_SETUPS)}, got {self.family!r}")
        setup = FAMILY_SETUPS[self.family]
        self.kinds = tuple(self.kinds)
        self.flex_weights = tuple(self.flex_weights)
        self.train_tokens = tuple(self.train_tokens or setup["train_tokens"])
        self.image_size = self.image_size or setup["image_size"]
        native = self.native_tokens
        self.eval_tokens = tuple(
            sorted({*(self.eval_tokens or setup["eval_tokens"]), *self.train_tokens, native})
        )
        for n in self.eval_tokens:
            if not 0 < n <= native:
                raise ValueError(f"budget {n} is outside 1..{native} (the native grid)")
        if len(self.flex_weights) != len(self.train_tokens):
            raise ValueError("one flexible-schedule weight per training budget")
        if self.seeds < 1 or min(self.stock_steps, self.convert_steps, self.distill_steps) < 1:
            raise ValueError("seeds and steps must be at least 1")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown question kinds {sorted(unknown)}; choose from {KINDS}")

    @property
    def native_tokens(self) -> int:
        return int(FAMILY_SETUPS[self.family]["native"])

    @property
    def recipe(self) -> str:
        return str(FAMILY_SETUPS[self.family]["recipe"])

    @property
    def flex_schedule(self) -> str:
        return ",".join(
            f"{n}:{w:g}" for n, w in zip(self.train_tokens or (), self.flex_weights, strict=True)
        )

    def rows(self) -> list[str]:
        """Table rows, in order (fixed-N: one per training budget)."""
        fixed = [f"fixed_{n}" for n in self.train_tokens or ()]
        return [*ROW_LABELS, *fixed]


def quick_convert_config(**overrides: Any) -> ConvertConfig:
    """A smoke run (tests): few steps, a small eval set, one seed."""
    base: dict[str, Any] = {
        "stock_steps": 30,
        "convert_steps": 8,
        "distill_steps": 6,
        "batch_size": 8,
        "eval_per_kind": 8,
        "eval_batch_size": 16,
        "seeds": 1,
    }
    base.update(overrides)
    return ConvertConfig(**base)


def row_label(row: str) -> str:
    if row.startswith("fixed_"):
        return f"fixed-{row.removeprefix('fixed_')}: distilled + fixed recipe (align)"
    return ROW_LABELS[row]


# ----------------------------------------------------------------------------- data, base models


def _write_split(samples: Sequence[Sample], out: Path, name: str, prefix: str) -> Path:
    """PNGs + LLaVA JSON, question first (``"{question} <image>"``: see docs/DEMO.md)."""
    return write_llava_dataset(samples, out, name, prefix=prefix, question_first=True)


def write_convert_data(cfg: ConvertConfig, out: Path) -> tuple[Path, Path]:
    """Training data (one fresh sample per image of the stock training; the conversion rows
    read its first K steps' worth) and the held-out evaluation set."""
    assert cfg.image_size is not None
    size, board = cfg.image_size, cfg.board
    rng = random.Random(f"convert-train:{cfg.data_seed}")
    kinds = cfg.kinds
    train = [
        make_sample(rng, kinds[i % len(kinds)], size, board)
        for i in range(cfg.stock_steps * cfg.batch_size)
    ]
    rng = random.Random(f"convert-eval:{cfg.eval_seed}")
    held_out = [
        make_sample(rng, kind, size, board) for _ in range(cfg.eval_per_kind) for kind in kinds
    ]
    return _write_split(train, out, "train.json", "t"), _write_split(
        held_out, out, "eval.json", "e"
    )


def write_base_model(cfg: ConvertConfig, seed: int, out: Path) -> tuple[str, str | None]:
    """The randomly initialised stock model of ``seed``: ``(--model, --weights)`` for the recipe.

    LLaVA: the demo's tiny LLaVA (96 px, 8 px patches, 12x12 = 144 tokens, sin-cos vision
    positions) saved with its processor, so ``--model`` is that directory. Other families:
    ``tiny:<family>`` (its processor is built in code) with the seed's weights.
    """
    if cfg.family == "llava":
        model, processor = build_base(DemoConfig(image_size=cfg.image_size or 96), seed)
        llava: Any = model
        llava.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        return str(out), None
    tiny, _ = tiny_vlm(cfg.family, seed=seed, extra_words=list(VOCAB))
    tiny.save_pretrained(str(out))
    return f"tiny:{cfg.family}", str(out)


# ----------------------------------------------------------------------------- one task


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


def _evaluate_run(
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
        record["accuracy"], record["auto"] = _evaluate_run(out, cfg, eval_json)
    log_file.write_text(buffer.getvalue())
    return record


# ----------------------------------------------------------------------------- the run


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


def _run_tasks(
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


def run_convert(
    cfg: ConvertConfig,
    out_dir: str | Path,
    *,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the stock reference per seed, convert it every way, evaluate, write the outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    load_start = _loadavg()
    log(
        f"flexproj demo (convert, {cfg.family}): native {cfg.native_tokens} tokens; stock "
        f"reference {cfg.stock_steps} steps x {cfg.batch_size} images; conversion rows "
        f"{cfg.convert_steps} steps ({cfg.convert_steps / cfg.stock_steps:.0%}); flex schedule "
        f"{cfg.flex_schedule}; eval budgets {list(cfg.eval_tokens or ())}; {cfg.seeds} seed(s); "
        f"{workers} worker(s)"
    )
    write_convert_data(cfg, work / "data")
    for seed in range(cfg.seeds):
        seed_dir = work / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        base = write_base_model(cfg, seed, seed_dir / "init")
        (seed_dir / "base.json").write_text(json.dumps(list(base)))
    records = _run_tasks(cfg, work, workers, log)
    results = convert_results(cfg, records)
    results["workers"] = workers
    results["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "platform": platform.platform(),
    }
    plot_path = out / "accuracy_vs_budget.png"
    plot_convert(results, plot_path)
    results["plot"] = plot_path.name
    results["total_wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("")
    log(format_convert_report(results))
    log(f"\nwrote {out / 'results.json'} and {plot_path} in {results['total_wall_s']:.0f} s")
    return results


def convert_results(cfg: ConvertConfig, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows x budgets, mean/std over seeds, and each row's conversion cost."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for rec in sorted(records, key=lambda r: r["seed"]):
        by_task.setdefault(rec["task"], []).append(rec)
    kinds = ["all", *cfg.kinds]
    budgets = [str(n) for n in cfg.eval_tokens or ()]
    native = str(cfg.native_tokens)
    stock = by_task["stock"]
    stock_cost = {
        "steps": statistics.fmean(r["steps"] for r in stock),
        "vision_tokens": statistics.fmean(r["vision_tokens"] for r in stock),
        "train_s": statistics.fmean(r["train_s"] for r in stock),
    }
    rows: dict[str, dict[str, Any]] = {}
    for row in cfg.rows():
        task = "stock" if row == "pool_after" else row
        seeds = by_task[task]
        cols = [native] if row == "stock" else budgets
        accuracy = {
            n: {k: _mean_spread([s["accuracy"][n][k] for s in seeds]) for k in kinds} for n in cols
        }
        if row in ("stock", "pool_after"):
            cost = {"steps": 0, "vision_tokens": 0, "train_s": 0.0, "images": 0}
            if row == "stock":
                cost = {**stock_cost, "images": stock[0]["images"]}
        else:
            cost = {
                "steps": statistics.fmean(r["steps"] for r in seeds),
                "vision_tokens": statistics.fmean(r["vision_tokens"] for r in seeds),
                "train_s": statistics.fmean(r["train_s"] for r in seeds),
                "images": statistics.fmean(r["images"] for r in seeds),
            }
        if row.startswith(("tokenflex", "fixed_")):  # the distillation comes first
            distilled = by_task["distilled"]
            cost["distill_steps"] = cfg.distill_steps
            cost["distill_s"] = statistics.fmean(r["train_s"] for r in distilled)
        autos = [s["auto"] for s in seeds]  # pool_after: the stock run, evaluated pooled
        rows[row] = {
            "label": row_label(row),
            "accuracy": accuracy,
            # flexproj.adaptive_generate over training budgets + native (chosen threshold)
            "auto": {
                "accuracy": _mean_spread([a["accuracy"] for a in autos]),
                "native_accuracy": _mean_spread([a["native_accuracy"] for a in autos]),
                "threshold": [a["threshold"] for a in autos],
                "vision_tokens_per_image": _mean_spread(
                    [a["vision_tokens_per_image_spent"] for a in autos]
                ),
                "mean_budget_by_kind": {
                    k: statistics.fmean(a["mean_budget_by_kind"].get(k, 0) for a in autos)
                    for k in cfg.kinds
                },
            }
            if autos and row != "stock"
            else None,
            "seeds": [
                {"seed": s["seed"], "accuracy": {n: s["accuracy"][n] for n in cols}} for s in seeds
            ],
            "cost": cost,
            "cost_vs_stock": {
                "steps": cost["steps"] / stock_cost["steps"],
                "vision_tokens": cost["vision_tokens"] / stock_cost["vision_tokens"],
                "train_s": (cost["train_s"] + cost.get("distill_s", 0.0)) / stock_cost["train_s"],
            },
        }
    distill = [r["distill"] for r in by_task.get("distilled", [])]
    distill_summary = {
        n: {
            key: statistics.fmean(d["per_budget"][n][key] for d in distill)
            for key in ("cosine_before", "cosine_after", "mse_before", "mse_after")
        }
        for n in (distill[0]["per_budget"] if distill else {})
    }
    return {
        "experiment": "convert",
        "config": dataclasses.asdict(cfg),
        "family": cfg.family,
        "native_tokens": cfg.native_tokens,
        "train_tokens": list(cfg.train_tokens or ()),
        "eval_tokens": list(cfg.eval_tokens or ()),
        "kinds": list(cfg.kinds),
        "metric": "exact match of the greedy answer (flexproj.recipes.evaluate)",
        "rows": rows,
        "distill": distill_summary,
        "records": list(records),
    }


def format_convert_table(results: dict[str, Any], kind: str = "all") -> str:
    budgets = [str(n) for n in results["eval_tokens"]]
    train = {str(n) for n in results["train_tokens"]}
    head = ["row \\ eval"] + [f"{n}{'*' if n in train else ''}" for n in budgets]
    lines = [head]
    for rec in results["rows"].values():
        seeds = len(rec["seeds"])
        lines.append(
            [rec["label"]]
            + [
                _cell(rec["accuracy"][n][kind], seeds) if n in rec["accuracy"] else ""
                for n in budgets
            ]
        )
    return _pipe_table(lines)


def format_convert_report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    spread = " (mean±std over seeds)" if cfg["seeds"] > 1 else ""
    parts = [
        f"Accuracy (%) of each conversion (rows) at each evaluation budget (columns){spread}; "
        f"{results['family']}, native = {results['native_tokens']} tokens; * = a training budget "
        "of the recipe rows.",
        "",
        "All questions:",
        format_convert_table(results, "all"),
    ]
    for kind in results["kinds"]:
        parts += ["", f"{kind}:", format_convert_table(results, kind)]
    parts += [
        "",
        "Conversion cost per row (mean over seeds; relative to training the stock model):",
        "| row | steps | vision tokens | train s | vs stock: steps / tokens / time |",
        "|---|---|---|---|---|",
    ]
    for rec in results["rows"].values():
        c, rel = rec["cost"], rec["cost_vs_stock"]
        train_s = c["train_s"] + c.get("distill_s", 0.0)
        steps = f"{c['steps']:.0f}" + (
            f" + {c['distill_steps']} distill" if "distill_steps" in c else ""
        )
        parts.append(
            f"| {rec['label']} | {steps} | {c['vision_tokens'] / 1e6:.3f} M | {train_s:.1f} | "
            f"{rel['steps']:.0%} / {rel['vision_tokens']:.0%} / {rel['train_s']:.0%} |"
        )
    autos = [rec for rec in results["rows"].values() if rec.get("auto")]
    if autos:
        kinds = results["kinds"]
        parts += [
            "",
            "Automatic budget (flexproj.adaptive_generate over the training budgets + native): "
            "per seed, the cheapest threshold within 1 point of the native budget's accuracy "
            "on half the evaluation questions (`flexproj eval --auto`'s sweep), scored on the "
            "other half, next to the native budget on that same half:",
            "| row | accuracy (held out) | native budget, same questions | vision tokens / image spent | "
            + " | ".join(f"mean budget: {k}" for k in kinds)
            + " |",
            "|---|---|---|---|" + "---|" * len(kinds),
        ]
        for rec in autos:
            auto = rec["auto"]
            seeds = len(rec["seeds"])
            tokens = auto["vision_tokens_per_image"]
            spread = f" ± {tokens['std']:.1f}" if seeds > 1 else ""
            parts.append(
                f"| {rec['label']} | {_cell(auto['accuracy'], seeds)} | "
                f"{_cell(auto['native_accuracy'], seeds)} | {tokens['mean']:.1f}{spread} | "
                + " | ".join(f"{auto['mean_budget_by_kind'][k]:.1f}" for k in kinds)
                + " |"
            )
    if results["distill"]:
        parts += ["", "Distillation (mean over seeds; fixed probe batch): per budget, cosine and "
                  "relative MSE to the pooled stock outputs, before -> after:"]  # fmt: skip
        for n, d in results["distill"].items():
            name = n if int(n) <= results["native_tokens"] else "native (uncapped)"
            parts.append(
                f"  N={name:>4}: cosine {d['cosine_before']:.3f} -> {d['cosine_after']:.3f}, "
                f"rel. MSE {d['mse_before']:.3f} -> {d['mse_after']:.3f}"
            )
    return "\n".join(parts)


def plot_convert(results: dict[str, Any], path: Path) -> None:
    """Accuracy vs evaluation budget, one line per row, spread (±std) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = results["eval_tokens"]
    kinds = ["all", *results["kinds"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.0 * len(kinds), 4.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for row, rec in results["rows"].items():
            ns = [n for n in budgets if str(n) in rec["accuracy"]]
            mean = [rec["accuracy"][str(n)][kind]["mean"] * 100 for n in ns]
            std = [rec["accuracy"][str(n)][kind]["std"] * 100 for n in ns]
            if row == "stock":
                ax.errorbar(
                    ns, mean, yerr=std, fmt="*", ms=12, color="black", label=rec["label"], zorder=5
                )
                continue
            style = "--" if row.startswith(("fixed_", "pool_after")) else "-"
            (line,) = ax.plot(
                ns,
                mean,
                style,
                marker="o",
                ms=3,
                lw=2.0 if "tokenflex" in row else 1.3,
                label=rec["label"],
            )
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(ns, low, high, color=line.get_color(), alpha=0.15, lw=0)
        _budget_axes(ax, budgets, results["train_tokens"], kind)
    axes[0][0].set_ylabel("exact-match accuracy (%)")
    axes[0][-1].legend(fontsize=6.5, loc="lower right")
    seeds = results["config"]["seeds"]
    fig.suptitle(
        f"flexproj demo: converting a trained tiny {results['family']} (native "
        f"{results['native_tokens']} tokens), {seeds} seed(s), shaded = ±std",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
