"""The shared trainer: stochastic vision-token budgets on Hugging Face ``Trainer``.

One code path for every engine ``Trainer`` / accelerate supports: a single process,
``torchrun`` / ``accelerate launch`` (DDP), FSDP and DeepSpeed (``--fsdp``,
``--deepspeed``), with mixed precision, gradient accumulation and checkpointing, logs and
progress bars all from ``Trainer`` (every ``TrainingArguments`` flag passes through).

Why tokenisation happens inside the training step: the number of image placeholders in
``input_ids`` depends on the budget N. So the data collator returns raw examples, and
:meth:`FlexTrainer.compute_loss` takes the budgets of its micro-batch from
``schedule.budgets_for(state.global_step, batch_size, first)`` (:meth:`FlexTrainer.sample_budgets`):
one N per optimiser step, or with ``--per_sample`` one N per sample drawn by its index in
the step's global batch. Either is a pure function of the seed, the optimiser step and
the sample's index: the same on every rank, the same for every micro-batch of a step under
gradient accumulation, and the same after a resume. It then runs the patched processor
*and* the model inside ``flexproj.tokens(...)`` (one budget, or one per image).
The loss is the model's causal-LM loss on answer tokens only (labels are -100 on the
prompt, the image placeholders and padding), a mean per micro-batch.

Logged with every ``loss`` (and so shown by the progress bar, kept in
``trainer_state.json`` and in ``<output_dir>/train_log.jsonl``): ``tokens`` (the N of the
latest step), ``tokens_mean`` (mean N over the logging window), ``vision_tokens`` (image
placeholder tokens the LLM consumed in the window, all ranks) and ``vision_tokens_total``.
Every rank also appends one line per micro-batch to ``<output_dir>/budgets/rank<r>.jsonl``
(step, counted from 1 as in the logs, N, images, vision tokens, example ids): the record
that all ranks trained at the same N, each on its own share of the batch.

Outputs in ``output_dir``: ``flexproj.safetensors`` + ``flexproj_config.json`` (the
projector, with the token schedule, via :func:`flexproj.save_pretrained`), ``lora/``
(peft adapters, ``--lora``) or ``model/`` (the full model in transformers format with
the *stock* projector back in its slot, full ``finetune``), ``recipe.json`` (how the run
was made; ``flexproj eval --run`` reads it), ``distill.json`` (``--init distill``).
Intermediate ``checkpoint-<step>/`` directories hold only the trainable parameters
(``trainable.safetensors``), the projector, and ``Trainer``'s optimizer / scheduler / RNG
state, so resuming continues the exact loss sequence. (Under FSDP / DeepSpeed the
engine's own checkpoint format is used instead.)

DeepSpeed ZeRO-3 (``--deepspeed recipes/zero3.json``): the process group is set up and
the checkpoint loaded inside ``deepspeed.zero.Init`` (sharded as it loads: the
TrainingArguments' HfDeepSpeedConfig is alive by then); saving gathers the full weights
(``stage3_gather_16bit_weights_on_model_save``, checked before the model loads).
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import flexproj
from flexproj._types import Model
from flexproj.checkpoint import write_atomically
from flexproj.errors import BudgetError, FlexprojError, PatchError
from flexproj.recipes.config import ConfigError, RecipeConfig, parse_args
from flexproj.recipes.data import Batcher, ConversationDataset, collate_examples
from flexproj.recipes.family import FamilyRecipe, get_recipe
from flexproj.registry import adapter_for
from flexproj.schedule import TokenSchedule

__all__ = ["FlexTrainer", "main", "set_trainable", "train"]

TRAINABLE_NAME = "trainable.safetensors"
RECIPE_NAME = "recipe.json"
DISTILL_NAME = "distill.json"
TRAIN_LOG_NAME = "train_log.jsonl"
BUDGET_DIR = "budgets"
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def _unwrap_peft(model: Model) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise PatchError("the FlexProjector is not a submodule of the trained model")


class JsonlLogCallback(TrainerCallback):
    """Appends every log entry (with its step) to ``path`` on the main process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: Any = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class FlexTrainer(Trainer):
    """``Trainer`` whose step tokenises raw examples under the step's vision-token budget."""

    def __init__(
        self,
        *args: Any,
        batcher: Batcher,
        schedule: TokenSchedule,
        image_token_id: int,
        native_rule: str = "projector",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.native_rule = native_rule  # recorded in checkpoints (flexproj.patch(native=))
        if self.args.fsdp and not self.is_fsdp_enabled:
            # accelerate enables FSDP on accelerators only; on CPU it would train plain DDP
            raise ConfigError(
                f"--fsdp was given but accelerate runs this job as "
                f"{self.accelerator.distributed_type.value} without FSDP (accelerate "
                "enables FSDP on GPUs and other accelerators only, not on CPU processes). "
                "Drop --fsdp to train with DDP, or run on accelerators."
            )
        self.batcher = batcher
        self.schedule = schedule
        self.image_token_id = image_token_id
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self.model_accepts_loss_kwargs = False
        self._window_budgets: dict[int, list[int]] = {}  # step -> its samples' budgets
        self._micro_batch: dict[int, int] = {}  # step -> micro-batches seen (per-sample index)
        self._window_vision = 0
        self._vision_total: int | None = None
        budget_dir = Path(str(self.args.output_dir)) / BUDGET_DIR
        budget_dir.mkdir(parents=True, exist_ok=True)
        self.budget_log = budget_dir / f"rank{self.args.process_index}.jsonl"

    def compute_loss(
        self,
        model: Model,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        examples = inputs["examples"]
        step = self.state.global_step  # advances after the optimiser step: shared by micro-batches
        budgets = self.sample_budgets(step, len(examples))
        per_image = [n for ex, n in zip(examples, budgets, strict=True) for _ in ex["images"]]
        with flexproj.tokens(per_image if len(set(per_image)) > 1 else budgets[0]):
            batch = self._prepare_inputs(self.batcher.train_batch(examples))
            outputs = model(**batch)
        vision = int((batch["input_ids"] == self.image_token_id).sum())
        self._record(
            step,
            budgets,
            sum(len(ex["images"]) for ex in examples),
            vision,
            [ex["id"] for ex in examples],
        )
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def sample_budgets(self, step: int, batch_size: int) -> list[int]:
        """Budgets of this rank's next micro-batch of step ``step``: the step's budget, or
        (``--per_sample``) each sample's draw by its index in the step's global batch."""
        micro = self._micro_batch.get(step, 0)
        self._micro_batch = {step: micro + 1}  # earlier steps are done
        stride = self.args.per_device_train_batch_size
        first = (micro * self.args.world_size + self.args.process_index) * stride
        return self.schedule.budgets_for(step, batch_size, first)

    def _record(
        self, step: int, budgets: list[int], images: int, vision: int, ids: list[str]
    ) -> None:
        self._window_budgets.setdefault(step, []).extend(budgets)
        self._window_vision += vision
        tokens: int | list[int] = budgets if self.schedule.per_sample else budgets[0]
        line = {"step": step + 1, "tokens": tokens, "images": images, "vision_tokens": vision,
                "rank": self.args.process_index, "ids": ids}  # fmt: skip
        with self.budget_log.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs come from _maybe_log_save_evaluate, which every rank runs: the
        # reduce below is matched on all ranks.
        if "loss" in logs and self._window_budgets:
            vision = torch.tensor(float(self._window_vision), device=self.args.device)
            if self.args.world_size > 1:
                vision = self.accelerator.reduce(vision, reduction="sum")
            if self._vision_total is None:  # resumed runs continue the count
                previous = [
                    e["vision_tokens_total"]
                    for e in self.state.log_history
                    if "vision_tokens_total" in e
                ]
                self._vision_total = int(previous[-1]) if previous else 0
            self._vision_total += int(vision.item())
            # a step's budget (the mean of its samples' under --per_sample)
            budgets = [_mean(self._window_budgets[s]) for s in sorted(self._window_budgets)]
            logs["tokens"] = budgets[-1]
            logs["tokens_mean"] = sum(budgets) / len(budgets)
            logs["vision_tokens"] = int(vision.item())
            logs["vision_tokens_total"] = self._vision_total
            self._window_budgets, self._window_vision = {}, 0
        super().log(logs, start_time)

    # --- checkpoints: trainable parameters only (DDP / single process) --------------
    def _sharded(self) -> bool:
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._sharded():
            super().save_model(output_dir, _internal_call)
            return
        from safetensors.torch import save_file

        if not self.args.should_save:
            return
        directory = Path(str(output_dir or self.args.output_dir))
        directory.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        trainable = {
            n: p.detach().to("cpu").contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        write_atomically(  # the mode a plain write gets (safetensors' own is 0o600)
            directory / TRAINABLE_NAME,
            lambda tmp: save_file(trainable, tmp, metadata={"format": "pt"}),
        )
        base = _unwrap_peft(model)
        if (
            flexproj.patch_info(base).mode == "flex"
        ):  # a stock projector is in trainable.safetensors
            flexproj.save_pretrained(
                base, directory, schedule=self.schedule.to_dict(), native=self.native_rule
            )
        torch.save(self.args, directory / "training_args.bin")

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: Model | None = None
    ) -> None:
        file = Path(resume_from_checkpoint) / TRAINABLE_NAME
        if self._sharded() or not file.is_file():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        from safetensors.torch import load_file

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        tensors = load_file(str(file))
        expected = {n for n, p in target.named_parameters() if p.requires_grad}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ConfigError(
                f"{file} does not fit this run (different --stage / --lora?): missing "
                f"{missing[:3]}, unexpected {extra[:3]}"
            )
        try:
            target.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:
            raise ConfigError(
                f"{file} does not fit this run (different --lora_r / model?): {str(exc).splitlines()[-1].strip()}"
            ) from None


def _mean(values: list[int]) -> float | int:
    mean = sum(values) / len(values)
    return int(mean) if all(v == values[0] for v in values) else mean


# ----------------------------------------------------------------------------- set-up


def set_trainable(model: Model, recipe: FamilyRecipe, *, llm: bool) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the projector (+ the LLM with ``llm``: full
    finetune); returns the trainable parameters. The vision tower always stays frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    if llm:
        for module in recipe.llm_modules(model):
            module.requires_grad_(True)
    flexproj.get_projector(model).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _set_trainable(model: Model, recipe: FamilyRecipe, config: RecipeConfig) -> None:
    set_trainable(model, recipe, llm=config.stage == "finetune" and not config.lora)


def _apply_lora(model: Model, recipe: FamilyRecipe, config: RecipeConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=recipe.lora_target(model, config.lora_target),
    )
    projector = flexproj.get_projector(model)
    peft_model = get_peft_model(model, lora)
    projector.requires_grad_(True)  # trained in full, saved by flexproj.save_pretrained
    return peft_model


def _check_schedule(model: Model, schedule: TokenSchedule, log: Callable[[str], None]) -> None:
    adapter = adapter_for(model)
    native = adapter.native_tokens(model)
    for n in schedule.tokens:
        try:
            adapter.check_budget(n, native)
        except BudgetError as exc:
            raise BudgetError(f"--schedule {list(schedule.tokens)}: {exc}") from None
    if adapter.caps_budget:
        log(f"note: budgets above an {adapter.unit}'s native count are capped by this family")


def _count(model: Model) -> tuple[int, int]:
    params = list({id(p): p for p in model.parameters()}.values())
    numel = [getattr(p, "ds_numel", p.numel()) for p in params]  # ZeRO-3: the full size
    return sum(n for n, p in zip(numel, params, strict=True) if p.requires_grad), sum(numel)


def _zero3(training_args: TrainingArguments) -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(training_args.deepspeed) and is_deepspeed_zero3_enabled()


def _check_zero3(config: RecipeConfig, training_args: TrainingArguments) -> None:
    """What ZeRO-3 cannot do here, said before the model loads rather than after training."""
    if not _zero3(training_args):
        return
    zero = training_args.hf_deepspeed_config.config.get("zero_optimization", {})
    if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError(
            f"--deepspeed {training_args.deepspeed}: ZeRO-3 shards the weights, and the trained "
            'projector is saved from the gathered ones: set "zero_optimization": '
            '{"stage3_gather_16bit_weights_on_model_save": true} in the DeepSpeed config '
            "(recipes/zero3.json has it)"
        )
    if config.init == "distill":
        raise ConfigError(
            "--init distill runs the model outside the DeepSpeed engine, which ZeRO-3's sharded "
            "weights do not allow: distill without --deepspeed (or under ZeRO-2) and pass the "
            "result as --init DIR"
        )


def _prepare_zero3(training_args: TrainingArguments) -> None:
    """Under ZeRO-3 transformers builds the model inside ``deepspeed.zero.Init`` (the
    TrainingArguments' HfDeepSpeedConfig is alive), which shards every parameter as it is
    created and checks the batch sizes against DeepSpeed's world size. On CPU processes
    accelerate sets up torch's process group but not DeepSpeed's (it waits for
    ``deepspeed.initialize``), so DeepSpeed would count one process: set it up first."""
    if not _zero3(training_args) or training_args.world_size < 2:
        return
    import torch.distributed as dist
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def _full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``tensors`` with ZeRO-3 partitioned parameters gathered to their full
    values (a collective: every rank calls it); plain tensors are copied as they are."""
    sharded = [t for t in tensors.values() if hasattr(t, "ds_id")]
    if not sharded:
        return {k: t.detach().clone() for k, t in tensors.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded):
        return {k: t.detach().clone() for k, t in tensors.items()}


#: written last into a checkpoint by Trainer: a directory without it was cut off mid-save
TRAINER_STATE = "trainer_state.json"


def _resume_arg(value: Any, output_dir: Path) -> Any:
    """``--resume_from_checkpoint``: ``true`` / ``last`` is the newest *complete*
    ``checkpoint-<step>`` of ``output_dir`` (one cut off mid-save is skipped, with a
    warning); a named checkpoint must be complete."""
    if isinstance(value, str) and value.lower() in ("true", "last"):
        value = True
    if value is True:
        found = sorted(
            (p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
            key=lambda p: int(p.name.split("-")[-1]),
            reverse=True,
        )
        complete = [p for p in found if (p / TRAINER_STATE).is_file()]
        if not complete:
            raise ConfigError(
                f"--resume_from_checkpoint {value}: {output_dir} holds no complete checkpoint-<step>"
            )
        skipped = [
            p.name
            for p in found
            if p not in complete
            and int(p.name.split("-")[-1]) > int(complete[0].name.split("-")[-1])
        ]
        if skipped:
            warnings.warn(
                f"resuming from {complete[0].name}: {', '.join(skipped)} is incomplete "
                f"(no {TRAINER_STATE}; cut off while saving)",
                stacklevel=2,
            )
        return str(complete[0])
    if value and not (Path(value) / TRAINER_STATE).is_file():
        raise ConfigError(
            f"--resume_from_checkpoint {value}: not a complete checkpoint (no {TRAINER_STATE}; "
            "cut off while saving?); pass true to resume from the last complete one"
        )
    return value or None


def _save_final(
    trainer: FlexTrainer,
    config: RecipeConfig,
    processor: Any,
    stock_projector: dict[str, torch.Tensor],
    output_dir: Path,
) -> dict[str, str]:
    """Projector (always), LoRA adapters or the full model (finetune); main process writes."""
    sharded = trainer._sharded()
    state_dict = trainer.accelerator.get_state_dict(
        trainer.model_wrapped if sharded else trainer.model
    )
    if not trainer.args.should_save:
        return {}
    unwrapped: Model = trainer.accelerator.unwrap_model(trainer.model)
    base: Model = _unwrap_peft(unwrapped)
    live = flexproj.get_projector(base)
    # state-dict names, without the wrapper modules FSDP / activation checkpointing insert
    prefix = _WRAPPERS.sub("", _module_name(unwrapped, live)) + "."
    if flexproj.patch_info(base).mode == "stock":
        # the trained stock projector lives in the model: transformers format, stock key names
        # (the patched save_pretrained writes what the stock class loads)
        base.save_pretrained(str(output_dir / "model"), state_dict=state_dict)
        if not config.is_tiny:
            processor.save_pretrained(str(output_dir / "model"))
        return {"model": "model"}
    tensors = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    # save the gathered weights (under FSDP the live module holds only this rank's shard)
    flexproj.save_pretrained(
        base,
        output_dir,
        schedule=trainer.schedule.to_dict(),
        state_dict=tensors,
        native=config.native_rule,  # align trained the native budget too; hands over "stock"
    )
    outputs = {"projector": "."}
    if config.lora:
        unwrapped.save_pretrained(str(output_dir / "lora"), state_dict=state_dict)
        outputs["lora"] = "lora"
    elif config.stage == "finetune":
        # transformers format, with the stock projector back where it was: loads with the
        # family's class; flexproj.from_pretrained(model, output_dir) adds the FlexProjector.
        full = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        full.update(stock_projector)
        base.save_pretrained(str(output_dir / "model"), state_dict=full)
        if not config.is_tiny:
            processor.save_pretrained(str(output_dir / "model"))
        outputs["model"] = "model"
    return outputs


# ----------------------------------------------------------------------------- entry points


def _load_base(
    recipe: FamilyRecipe, config: RecipeConfig, training_args: TrainingArguments
) -> tuple[Model, Any]:
    """``recipe.load``, under ZeRO-3 too. A checkpoint loads inside ``deepspeed.zero.Init``
    (sharded as it loads) with the random-number state left as a plain load leaves it (it
    draws none), so the projector starts from the same weights as under DDP. A tiny model
    is built in code, which ``zero.Init`` does not support (transformers initialises the
    outer model after the inner ones were sharded): it is built whole on every rank, and
    ``deepspeed.initialize`` shards it."""

    def load() -> tuple[Model, Any]:
        return recipe.load(
            str(config.model),
            dtype=config.dtype,
            attn_implementation=config.attn_implementation,
            processor_kwargs=config.processor_options(),
            weights=config.weights,
        )

    if not _zero3(training_args):
        return load()
    from transformers.integrations.deepspeed import (
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    if not config.is_tiny:
        with torch.random.fork_rng():
            return load()
    unset_hf_deepspeed_config()
    try:
        return load()
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)


def _load_model(
    family: str,
    recipe: FamilyRecipe,
    config: RecipeConfig,
    training_args: TrainingArguments,
    say: Callable[[str], None],
) -> tuple[Model, Any, dict[str, torch.Tensor]]:
    """The base model with its projector in place: ``(model, processor, stock projector
    weights)`` (the stock weights in full, to put back into a saved full model)."""
    from transformers import set_seed

    _prepare_zero3(training_args)
    set_seed(training_args.seed)
    model, processor = _load_base(recipe, config, training_args)
    model_type = model.config.model_type
    if model_type not in recipe.model_types:
        raise ConfigError(
            f"{config.model} is a {model_type!r} model, not one the {family} recipe trains"
        )
    stock_keys = model.state_dict(keep_vars=True)  # the parameters (ZeRO-3: still sharded)
    if config.projector == "stock":
        flexproj.patch(model, projector="stock")
        say("projector: the stock one, its outputs pooled to each step's budget")
    elif config.init in ("random", "distill"):
        native = config.training_native_rule
        flexproj.patch(model, kernel=config.kernel, hidden_dim=config.hidden_dim, native=native)
    else:
        flexproj.from_pretrained(
            model, config.init, kernel=config.kernel, native=config.training_native_rule
        )
        say(f"projector: loaded from {config.init}")
    patched_keys = set(model.state_dict())
    stock_projector = _full_tensors({k: v for k, v in stock_keys.items() if k not in patched_keys})
    return model, processor, stock_projector


def _make_batcher(
    recipe: FamilyRecipe,
    model: Model,
    processor: Any,
    config: RecipeConfig,
    dataset: ConversationDataset,
) -> Batcher:
    """The step's tokeniser, checked on the first conversations (template problems surface
    now, not at step 10k)."""
    batcher = Batcher(
        recipe,
        processor,
        prompt_format=recipe.resolve_prompt_format(processor, config.prompt_format),
        system_prompt=config.system_prompt,
        pad_to_square=recipe.use_pad_to_square(model, config.pad_to_square),
        max_length=config.max_length,
    )
    for record in dataset.records[:64]:
        batcher.segments(record.messages)
    return batcher


def _start_logs(output_dir: Path, training_args: TrainingArguments, resume: Any) -> None:
    """A fresh run starts fresh logs; a resumed one appends."""
    if resume:
        return
    (output_dir / BUDGET_DIR / f"rank{training_args.process_index}.jsonl").unlink(missing_ok=True)
    if training_args.process_index == 0:
        (output_dir / TRAIN_LOG_NAME).unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def train(
    family: str,
    config: RecipeConfig,
    training_args: TrainingArguments,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one recipe stage; returns a summary (also written to ``recipe.json``)."""
    recipe = get_recipe(family)
    is_main = training_args.process_index == 0
    say: Callable[[str], None] = log or (print if is_main else (lambda _msg: None))
    output_dir = Path(str(training_args.output_dir))

    # 1. everything that can be checked without the model
    dataset = ConversationDataset(config.data or "", config.image_folder, config.max_samples)
    schedule = config.token_schedule(training_args.seed)
    _check_zero3(config, training_args)
    say(f"data: {len(dataset)} conversations from {config.data}")

    # 2. model, projector, budgets
    model, processor, stock_projector = _load_model(family, recipe, config, training_args, say)
    stock_count = adapter_for(model).native_tokens(model, "stock")  # the stock tokens per unit
    schedule = config.with_native(schedule, stock_count, say)
    _check_schedule(model, schedule, say)
    say(f"schedule: {dict(zip(schedule.tokens, schedule.probabilities, strict=True))} "
        f"(expected {schedule.expected_tokens:.1f} vision tokens per {adapter_for(model).unit})")  # fmt: skip
    batcher = _make_batcher(recipe, model, processor, config, dataset)

    # 3. warm start
    distill: dict[str, Any] | None = None
    if config.init == "distill":
        distill = _run_distill(model, processor, recipe, dataset, config, training_args, say)
    flexproj.patch_processor(model, processor)
    with flexproj.tokens(schedule.max_tokens):  # one batch through the processor, before training
        probe = batcher.train_batch([dataset[0]])
    if not (probe["labels"] != -100).any():
        raise ConfigError("the first conversation has no answer tokens to train on")

    # 4. what trains
    _set_trainable(model, recipe, config)
    if config.lora:
        model = _apply_lora(model, recipe, config)
    trainable, total = _count(model)
    say(f"stage {config.stage}{' (LoRA)' if config.lora else ''}: {trainable:,} of {total:,} "
        f"parameters trainable; prompt format: {batcher.prompt_format}")  # fmt: skip
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}

    summary: dict[str, Any] = {
        "family": family,
        "model": config.model,
        "model_type": model.config.model_type,
        "stage": config.stage,
        "lora": config.lora,
        "prompt_format": batcher.prompt_format,
        "system_prompt": config.system_prompt,
        "pad_to_square": batcher.pad_to_square,
        "schedule": schedule.to_dict(),
        "flexproj_version": flexproj.__version__,
        "config": config.to_dict(),
    }
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / RECIPE_NAME, {**summary, "status": "training"})
        if distill is not None:
            _write_json(output_dir / DISTILL_NAME, distill)

    # 5. train
    resume = _resume_arg(training_args.resume_from_checkpoint, output_dir)
    _start_logs(output_dir, training_args, resume)
    trainer = FlexTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collate_examples,
        batcher=batcher,
        schedule=schedule,
        image_token_id=recipe.image_token_id(_unwrap_peft(model)),
        native_rule=config.native_rule,
        callbacks=[JsonlLogCallback(output_dir / TRAIN_LOG_NAME)],
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    summary["train_seconds"] = time.perf_counter() - start
    # how the job actually ran (accelerate may not do what the flags asked: see --fsdp)
    summary["distributed"] = trainer.accelerator.distributed_type.value
    summary["world_size"] = training_args.world_size
    summary["global_step"] = result.global_step
    summary["train_loss"] = result.training_loss
    if distill is not None:
        summary["distill"] = {k: v for k, v in distill.items() if k != "history"}

    # 6. save
    summary["outputs"] = _save_final(trainer, config, processor, stock_projector, output_dir)
    if is_main:
        trainer.save_state()
        trainer.save_metrics("train", result.metrics)
        summary["status"] = "done"
        _write_json(output_dir / RECIPE_NAME, summary)
        say(
            f"saved to {output_dir}: {', '.join(f'{k}={v}' for k, v in summary['outputs'].items())}"
        )
    return summary


def _run_distill(
    model: Model,
    processor: Any,
    recipe: FamilyRecipe,
    dataset: ConversationDataset,
    config: RecipeConfig,
    training_args: TrainingArguments,
    say: Callable[[str], None],
) -> dict[str, Any]:
    from flexproj.recipes.distill import distill_projector

    device = training_args.device
    model.to(device)
    records = (
        dataset.records[: config.distill_samples] if config.distill_samples else dataset.records
    )
    return distill_projector(
        model,
        processor,
        recipe,
        records,
        steps=config.distill_steps,
        lr=config.distill_lr,
        batch_size=config.distill_batch_size,
        cosine_weight=config.distill_cosine_weight,
        seed=training_args.seed,
        budgets=config.token_schedule(training_args.seed).tokens,
        log=say,
    )


def main(family: str, argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Command-line entry: ``python -m flexproj.recipes.<family>`` / ``flexproj train <family>``."""
    done = False
    try:
        recipe = get_recipe(family)
        config, training_args = parse_args(argv, recipe.stage_defaults, prog=prog)
        train(family, config, training_args)
        done = True
    except FlexprojError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        _close_process_group(wait=done)
    return 0


def _close_process_group(*, wait: bool) -> None:
    """Tear the process group down before exit: a gloo group left to the interpreter's
    shutdown can abort a rank ("terminate called without an active exception"). Only a
    rank that finished waits for the others: one that failed may be alone in failing, and
    a barrier would then hang every rank instead of letting the launcher stop the job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":  # python -m flexproj.recipes.trainer <family> ...
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: python -m flexproj.recipes.trainer FAMILY [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
