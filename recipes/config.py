"""Recipe configuration: what to train (``RecipeConfig``) and how to parse it.

A run is described by two dataclasses: :class:`RecipeConfig` (model, data, stage,
token schedule, warm start, LoRA ...), validated in ``__post_init__``, and
transformers' own ``TrainingArguments`` (optimiser, precision, distributed engine,
checkpointing, logging), passed through untouched except for the few fields the
recipes need (``remove_unused_columns=False``).

Precedence, lowest first: the family's defaults for the stage (``recipes/<family>.py``),
then ``--config file.json`` (or ``.yaml`` when PyYAML is installed), then flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from flexproj.errors import ConfigError
from flexproj.schedule import TokenSchedule, parse_schedule

__all__ = ["ConfigError", "RecipeConfig", "load_config_file", "parse_args"]

STAGES = ("align", "finetune")
CHECKPOINT_FILE = "flexproj.safetensors"


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class RecipeConfig:
    """What to train. Every field is a ``--flag`` of ``flexproj train <family>``."""

    model: str | None = field(
        default=None,
        metadata=_help(
            "Base model: a local path or hub id (loaded with the family's transformers class "
            "and AutoProcessor), or tiny:<family> for a tiny offline model (tests, demos)."
        ),
    )
    data: str | None = field(
        default=None,
        metadata=_help(
            "LLaVA conversation JSON (or JSONL): records with 'image' (a path, or a list) and "
            "'conversations' of human/gpt turns; '<image>' marks where the image goes."
        ),
    )
    image_folder: str | None = field(
        default=None,
        metadata=_help("Folder the 'image' paths are relative to (default: the JSON's folder)."),
    )
    stage: Literal["align", "finetune"] = field(
        default="align",
        metadata=_help(
            "align: train the projector only (vision tower and LLM frozen). finetune: projector "
            "+ LLM (full, or LoRA with --lora); the vision tower stays frozen."
        ),
    )
    lora: bool = field(
        default=False,
        metadata=_help(
            "finetune only: LoRA adapters on the LLM's linear layers (peft); the "
            "projector is still trained in full."
        ),
    )
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha (scale = alpha / r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA path."))
    lora_target: str = field(
        default="auto",
        metadata=_help(
            "Modules that get LoRA: 'auto' = every nn.Linear of the language model, or a "
            "regular expression over module names (peft's target_modules)."
        ),
    )
    schedule: str = field(
        default="paper",
        metadata=_help(
            "Vision-token budget per optimiser step: 'paper' (= 64:2,144:3,256:5, TokenFLEX), "
            "'N1:w1,N2:w2,...' or 'fixed:N'. One N per step, shared by every rank and every "
            "micro-batch of that step."
        ),
    )
    schedule_seed: int | None = field(
        default=None,
        metadata=_help("Seed of the per-step budget draws (default: --seed)."),
    )
    per_sample: bool = field(
        default=False,
        metadata=_help(
            "Draw one budget per sample instead of per step (a function of seed, step and the "
            "sample's index in the step's global batch): every batch mixes budgets."
        ),
    )
    projector: Literal["flex", "stock"] = field(
        default="flex",
        metadata=_help(
            "flex: train a FlexProjector (pool the vision grid, then LayerNorm + SwiGLU). "
            "stock: keep the model's stock projector and average-pool its output tokens to "
            "each step's budget (pool-after, Matryoshka's layout; at the native budget this is "
            "the stock model); the stock projector trains, and the model is saved in "
            "transformers format (<output_dir>/model)."
        ),
    )
    train_native: bool | None = field(
        default=None,
        metadata=_help(
            "Add the model's native budget to --schedule when it is not there, with the "
            "smallest weight of the schedule's budgets. Default: yes where the LLM or the "
            "stock projector trains (--stage finetune, LoRA, --projector stock): with a "
            "FlexProjector those steps run the stock projector (the native-budget rule, "
            "flexproj.patch(native='stock')), so the LLM keeps reading the stock model's "
            "native tokens; no for --stage align (the LLM is untouched and the checkpoint "
            "runs the stock projector at the native budget: the stock model there)."
        ),
    )
    weights: str | None = field(
        default=None,
        metadata=_help(
            "A transformers-format model directory to take the weights from instead of --model "
            "(e.g. an earlier run's <output_dir>/model); the processor still comes from --model."
        ),
    )
    init: str = field(
        default="random",
        metadata=_help(
            "Projector start: 'random', 'distill' (fit it to the stock projector's outputs "
            "first, vision tower only), or a flexproj checkpoint directory (e.g. the align "
            "stage's output_dir, for finetune)."
        ),
    )
    distill_steps: int = field(default=200, metadata=_help("--init distill: optimiser steps."))
    distill_lr: float = field(default=1e-3, metadata=_help("--init distill: AdamW learning rate."))
    distill_batch_size: int = field(default=8, metadata=_help("--init distill: images per step."))
    distill_cosine_weight: float = field(
        default=1.0,
        metadata=_help("--init distill: loss = relative MSE + w * (1 - cosine similarity)."),
    )
    distill_samples: int | None = field(
        default=None,
        metadata=_help("--init distill: use the first N images of --data (default: all)."),
    )
    prompt_format: Literal["auto", "chat_template", "plain"] = field(
        default="auto",
        metadata=_help(
            "How conversations become text: the processor's chat template, or the family's "
            "plain format (see the family recipe). auto: the chat template when the processor "
            "has one."
        ),
    )
    system_prompt: str | None = field(
        default=None,
        metadata=_help("System prompt (default: the family's; '' for none)."),
    )
    pad_to_square: bool | None = field(
        default=None,
        metadata=_help(
            "Pad images to a square with the processor's mean colour before processing "
            "(LLaVA-1.5's recipe; default: the family's choice)."
        ),
    )
    max_samples: int | None = field(
        default=None, metadata=_help("Use only the first N records of --data.")
    )
    max_length: int | None = field(
        default=None,
        metadata=_help(
            "Cut each conversation to this many tokens (later turns are dropped from the end; "
            "a first prompt longer than this, image tokens included, is an error)."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help("Weights dtype when loading --model (auto: the checkpoint's)."),
    )
    attn_implementation: str | None = field(
        default=None, metadata=_help("Passed to from_pretrained (e.g. sdpa, flash_attention_2).")
    )
    processor_kwargs: str | None = field(
        default=None,
        metadata=_help(
            "JSON object passed to AutoProcessor.from_pretrained, e.g. "
            "'{\"max_pixels\": 802816}' for Qwen."
        ),
    )
    kernel: str = field(
        default="auto",
        metadata=_help(
            "SwiGLU backend of a new FlexProjector (auto, eager, compile, triton, xformers)."
        ),
    )
    hidden_dim: int | None = field(
        default=None,
        metadata=_help("Hidden width of a new FlexProjector (default 3 * vision width)."),
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("--model is required (a checkpoint path, a hub id, or tiny:<family>)")
        if not self.data:
            raise ConfigError("--data is required (a LLaVA conversation JSON)")
        if self.stage not in STAGES:
            raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.lora and self.stage != "finetune":
            raise ConfigError(
                "--lora applies to --stage finetune (align trains the projector only)"
            )
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ConfigError(
                f"--lora_r and --lora_alpha must be positive, got {self.lora_r}, {self.lora_alpha}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            parse_schedule(self.schedule)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--schedule: {exc}") from None
        if (
            self.init not in ("random", "distill")
            and not (Path(self.init) / CHECKPOINT_FILE).is_file()
        ):
            raise ConfigError(
                f"--init must be 'random', 'distill' or a flexproj checkpoint directory; "
                f"{self.init!r} has no {CHECKPOINT_FILE}"
            )
        if self.projector not in ("flex", "stock"):
            raise ConfigError(f"--projector must be flex or stock, got {self.projector!r}")
        if self.projector == "stock" and (self.init != "random" or self.lora):
            raise ConfigError(
                "--projector stock trains the model's own projector: --init and --lora apply to "
                "a FlexProjector only"
            )
        if self.weights is not None and not (Path(self.weights) / "config.json").is_file():
            raise ConfigError(
                f"--weights {self.weights!r}: no config.json (a transformers model dir)"
            )
        for name in ("distill_steps", "distill_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.distill_lr <= 0 or self.distill_cosine_weight < 0:
            raise ConfigError(
                "--distill_lr must be positive and --distill_cosine_weight non-negative"
            )
        for name in ("max_samples", "max_length", "distill_samples", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name} must be positive, got {value}")
        if self.processor_kwargs is not None:
            try:
                parsed = json.loads(self.processor_kwargs)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--processor_kwargs is not valid JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise ConfigError("--processor_kwargs must be a JSON object")
        self._absolute_paths()

    def _absolute_paths(self) -> None:
        """Local paths made absolute, so recipe.json (and ``flexproj eval --run``) works from
        any directory; hub ids and ``tiny:<family>`` stay as given."""
        for name in ("model", "data", "image_folder", "weights", "init"):
            value = getattr(self, name)
            if value and value not in ("random", "distill") and Path(value).exists():
                setattr(self, name, str(Path(value).resolve()))

    # ------------------------------------------------------------------ helpers
    @property
    def is_tiny(self) -> bool:
        return bool(self.model) and str(self.model).startswith("tiny:")

    def token_schedule(self, seed: int) -> TokenSchedule:
        """The parsed ``--schedule``; its seed is ``--schedule_seed``, else ``seed``."""
        return parse_schedule(
            self.schedule,
            seed=seed if self.schedule_seed is None else self.schedule_seed,
            per_sample=self.per_sample,
        )

    @property
    def native_rule(self) -> str:
        """What serves the native budget (``flexproj.patch(..., native=)``): with a
        FlexProjector, always the stock projector (align: the stock model there; finetune:
        the native-budget steps train the LLM on the stock projector's tokens, as the stock
        training did); with ``--projector stock`` the trained stock projector itself."""
        return "stock" if self.projector == "flex" else "projector"

    @property
    def training_native_rule(self) -> str:
        """The rule while training: align trains the FlexProjector at every budget of the
        schedule, the native one included (only the projector trains, so a stock step
        would teach nothing); the checkpoint still records :attr:`native_rule`."""
        return "projector" if self.stage == "align" else self.native_rule

    @property
    def trains_native(self) -> bool:
        """``--train_native``, default: yes where the LLM or the stock projector trains."""
        if self.train_native is not None:
            return self.train_native
        return self.stage == "finetune" or self.projector == "stock"

    def with_native(
        self, schedule: TokenSchedule, native: int | None, log: Callable[[str], None]
    ) -> TokenSchedule:
        """``schedule`` with the native budget added (``--train_native``, see its help);
        ``native=None`` (a family whose count varies per image): unchanged, said once."""
        if not self.trains_native or (native is not None and native in schedule.tokens):
            return schedule
        if native is None:
            log(
                "note: this family's native budget varies per image, so it is not added to the "
                "schedule; add a budget at least the largest image's count to --schedule to train it"
            )
            return schedule
        if native < max(schedule.tokens):
            return schedule  # budgets above native are capped to it: native trains already
        weight = min(w for w in schedule.weights if w > 0)
        log(f"schedule: the native budget {native} joins with weight {weight:g} (--train_native)")
        return dataclasses.replace(
            schedule, tokens=(*schedule.tokens, native), weights=(*schedule.weights, weight)
        )

    def processor_options(self) -> dict[str, Any]:
        return json.loads(self.processor_kwargs) if self.processor_kwargs else {}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------- files


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A flat ``{option: value}`` mapping from a ``.json`` file, or ``.yaml``/``.yml`` with PyYAML."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {file}: no such file")
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"--config {file}: reading YAML needs PyYAML (pip install pyyaml); or write JSON"
            ) from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {file} is not valid JSON: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {file} must hold one mapping of option -> value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# ----------------------------------------------------------------------------- parsing


def _argument_parser(prog: str | None) -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    dataclasses: Any = (RecipeConfig, TrainingArguments)
    parser = HfArgumentParser(dataclasses, prog=prog)
    parser.add_argument(
        "--config",
        default=None,
        help="JSON (or YAML, with PyYAML) file of option -> value; flags given on the command line win.",
    )
    return parser


def _option_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}


def _environment_defaults() -> dict[str, Any]:
    """On a machine without an accelerator: ``use_cpu`` (accelerate sets up its CPU / gloo
    process group for a multi-process launch only when told to use the CPU, and ``--bf16``
    on CPU needs it) and no pinned memory."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = (
        accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    )
    return {} if has_accelerator else {"use_cpu": True, "dataloader_pin_memory": False}


def parse_args(
    argv: Sequence[str] | None,
    stage_defaults: Mapping[str, Mapping[str, Any]],
    *,
    prog: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[RecipeConfig, Any]:
    """``(RecipeConfig, TrainingArguments)`` from ``argv``.

    ``stage_defaults[stage]`` holds the family's defaults for each stage (any field of
    either dataclass); the config file overrides them and flags override both.
    ``overrides`` (programmatic use) sit between the config file and the flags.
    """
    argv = list(argv) if argv is not None else None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--stage", default=None)
    known, _ = pre.parse_known_args(argv)

    file_values = load_config_file(known.config) if known.config else {}
    given = {**file_values, **(overrides or {})}
    stage = known.stage or given.get("stage") or "align"
    if stage not in stage_defaults:
        raise ConfigError(f"--stage must be one of {', '.join(stage_defaults)}, got {stage!r}")

    parser = _argument_parser(prog)
    dests = _option_dests(parser)
    unknown = sorted(set(given) - dests)
    if unknown:
        source = f"--config {known.config}" if known.config else "the given options"
        raise ConfigError(f"{source}: unknown option(s) {unknown}; see --help for the names")
    parser.set_defaults(
        **{**_environment_defaults(), **stage_defaults[stage], **given, "stage": stage}
    )
    config, training_args = parser.parse_args_into_dataclasses(args=argv)[:2]
    if not training_args.output_dir:
        raise ConfigError("--output_dir is required")
    if training_args.remove_unused_columns:
        # The collator hands raw examples to the trainer; column filtering would drop them.
        training_args.remove_unused_columns = False
    return config, training_args
