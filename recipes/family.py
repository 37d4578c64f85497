"""What differs between model families in training: the :class:`FamilyRecipe` interface.

A family recipe (``recipes/llava.py``, ``recipes/qwen_vl.py``, ``recipes/internvl.py``)
holds one family's training defaults and knowledge:

* which transformers class loads each ``model_type`` it covers, and ``tiny:`` names;
* per-stage defaults (learning rate, batch size ...) for ``TrainingArguments``;
* the prompt format: how a conversation becomes text segments, with the family's image
  placeholder and end-of-turn marker (or the processor's chat template);
* image handling before the processor (LLaVA-1.5 pads to a square);
* which modules are the LLM (trained in ``finetune``, LoRA targets) and which budget
  reproduces the stock projector's token grid (for ``--init distill``).

Everything shared (trainer, data, distillation, evaluation) goes through this interface.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from flexproj._types import Model
from flexproj.recipes.config import ConfigError
from flexproj.recipes.data import IMAGE_TAG, DataError, Segment
from flexproj.registry import adapter_for, get_adapter, load_adapters

__all__ = [
    "UNCAPPED_BUDGET",
    "FamilyRecipe",
    "get_recipe",
    "recipe_for_model",
    "recipe_for_model_type",
]

#: family name -> module holding its ``RECIPE``
#: a budget no image reaches: every image keeps its native grid (families that cap budgets)
UNCAPPED_BUDGET = 2**31 - 1


def recipe_families() -> list[str]:
    """The recipe names the registered families declare (``FamilyAdapter.recipe``)."""
    return sorted({a.recipe for a in load_adapters().values() if a.recipe})


Messages = Sequence[tuple[str, str]]


def get_recipe(family: str) -> FamilyRecipe:
    """The recipe of ``family`` (one of :func:`recipe_families`)."""
    families = recipe_families()
    if family not in families:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(families)}")
    recipe = importlib.import_module(f"flexproj.recipes.{family}").RECIPE
    assert isinstance(recipe, FamilyRecipe)
    return recipe


def recipe_for_model_type(model_type: str) -> FamilyRecipe:
    """The recipe that trains ``model_type`` (a ``tiny:<name>`` name works too)."""
    for family in recipe_families():
        recipe = get_recipe(family)
        if model_type in recipe.model_types or model_type in recipe.tiny_families:
            return recipe
    raise ConfigError(f"no training recipe covers model_type {model_type!r}")


def recipe_for_model(spec: str) -> FamilyRecipe:
    """The recipe for a ``--model`` value: ``tiny:<name>``, a local path or a hub id."""
    if spec.startswith("tiny:"):
        return recipe_for_model_type(spec.removeprefix("tiny:"))
    import transformers

    return recipe_for_model_type(transformers.AutoConfig.from_pretrained(spec).model_type)


#: TrainingArguments defaults every family starts from (each adds its stage's learning rate
#: and batch size)
COMMON_TRAINING_DEFAULTS: dict[str, Any] = {
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
    "num_train_epochs": 1,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 2,
}


class FamilyRecipe:
    """Base class of the family recipes; subclasses set the class attributes and
    override :meth:`plain_segments` (and whatever else differs)."""

    #: the family name used on the command line (``flexproj train <name>``)
    name: ClassVar[str]
    #: ``config.model_type`` -> transformers class name that loads it
    model_classes: ClassVar[dict[str, str]]
    #: ``tiny:<name>`` models (:func:`flexproj.testing.tiny_vlm`) this recipe accepts
    tiny_families: ClassVar[tuple[str, ...]]
    default_tiny: ClassVar[str]
    #: system prompt used when neither the data nor ``--system_prompt`` give one
    default_system_prompt: ClassVar[str | None] = None
    #: pad images to a square before the processor (LLaVA-1.5's ``expand2square``)
    pad_to_square: ClassVar[bool] = False
    #: per-stage defaults for ``RecipeConfig`` / ``TrainingArguments`` fields
    stage_defaults: ClassVar[dict[str, dict[str, Any]]]

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.model_classes)

    def processor_images(self, per_sample: Sequence[Sequence[Image.Image]]) -> list[Any]:
        """A batch's images as this family's processor takes them (one sequence per
        sample in; see ``FamilyAdapter.processor_images``)."""
        return get_adapter(self.model_types[0]).processor_images(per_sample) or []

    # ------------------------------------------------------------------ loading
    def load(
        self,
        spec: str,
        *,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
    ) -> tuple[Model, Any]:
        """``(model, processor)`` for ``spec`` (a path, hub id or ``tiny:<name>``).

        ``weights``: a directory in transformers format to take the weights from instead
        (a full ``finetune`` run's ``model/``); the processor still comes from ``spec``.
        """
        if spec.startswith("tiny:"):
            model, processor = self.load_tiny(spec.removeprefix("tiny:"))
            if weights is not None:
                model = type(model).from_pretrained(weights).float().eval()
            return model, processor
        return self.load_pretrained(
            spec, dtype=dtype, attn_implementation=attn_implementation,
            processor_kwargs=processor_kwargs, weights=weights,
        )  # fmt: skip

    def load_tiny(self, name: str) -> tuple[Model, Any]:
        from flexproj.testing import tiny_vlm
        from flexproj.testing.datasets import VOCAB

        name = name or self.default_tiny
        if name not in self.tiny_families:
            raise ConfigError(
                f"tiny:{name} is not a {self.name} model; this recipe takes "
                f"{', '.join('tiny:' + f for f in self.tiny_families)}"
            )
        return tiny_vlm(name, extra_words=VOCAB)

    def load_pretrained(
        self,
        spec: str,
        *,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
    ) -> tuple[Model, Any]:
        """The family's transformers class ``from_pretrained(weights or spec)`` and
        ``AutoProcessor.from_pretrained(spec)``."""
        import transformers

        model_type = transformers.AutoConfig.from_pretrained(weights or spec).model_type
        if model_type not in self.model_classes:
            raise ConfigError(
                f"{spec} is a {model_type!r} model; the {self.name} recipe trains "
                f"{', '.join(self.model_types)}"
            )
        cls = getattr(transformers, self.model_classes[model_type])
        kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = cls.from_pretrained(weights or spec, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(spec, **(processor_kwargs or {}))
        return model, processor

    # ------------------------------------------------------------------ text
    def image_placeholder(self, processor: Any) -> str:
        """What replaces one ``<image>`` of the data in a plain-format prompt."""
        return str(processor.image_token)

    def end_of_turn(self, processor: Any) -> str:
        """The marker that ends an assistant answer (trained as part of the target)."""
        return str(processor.tokenizer.eos_token)

    def stop_token_ids(self, processor: Any) -> list[int]:
        """Token ids that end generation: the end-of-turn marker and EOS."""
        tok = processor.tokenizer
        ids = {tok.convert_tokens_to_ids(self.end_of_turn(processor)), tok.eos_token_id}
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)

    def resolve_prompt_format(self, processor: Any, prompt_format: str) -> str:
        has_template = bool(getattr(processor, "chat_template", None))
        if prompt_format == "auto":
            return "chat_template" if has_template else "plain"
        if prompt_format == "chat_template" and not has_template:
            raise ConfigError("--prompt_format chat_template: the processor has no chat template")
        return prompt_format

    def system_prompt(self, messages: Messages, configured: str | None) -> str:
        for role, text in messages:
            if role == "system":
                return text
        return (self.default_system_prompt or "") if configured is None else configured

    def render(
        self, messages: Messages, processor: Any, prompt_format: str, system: str | None
    ) -> list[Segment]:
        """Text segments ``[prompt, answer, prompt, answer ...]``; the first holds every image."""
        system_text = self.system_prompt(messages, system)
        dialogue = [(r, t) for r, t in messages if r != "system"]
        if prompt_format == "chat_template":
            return self.chat_segments(dialogue, processor, system_text)
        return self.plain_segments(dialogue, processor, system_text)

    def plain_segments(self, dialogue: Messages, processor: Any, system: str) -> list[Segment]:
        raise NotImplementedError

    def chatml_segments(
        self, dialogue: Messages, processor: Any, system: str, placeholder: str
    ) -> list[Segment]:
        """ChatML (``<|im_start|>role\\n...<|im_end|>``), used by Qwen and InternVL."""
        end = self.end_of_turn(processor)
        segments: list[Segment] = []
        head = f"<|im_start|>system\n{system}{end}\n" if system else ""
        for role, text in dialogue:
            if role == "user":
                prompt = text.replace(IMAGE_TAG, placeholder)
                segments.append(
                    Segment(
                        f"{head}<|im_start|>user\n{prompt}{end}\n<|im_start|>assistant\n", False
                    )
                )
                head = "\n"
            else:
                segments.append(Segment(f"{text}{end}", True))
        return segments

    @staticmethod
    def _content(role: str, text: str) -> list[dict[str, str]]:
        if role != "user":
            return [{"type": "text", "text": text}]
        items: list[dict[str, str]] = []
        for i, part in enumerate(text.split(IMAGE_TAG)):
            if i > 0:
                items.append({"type": "image"})
                part = part.removeprefix("\n")
            if part:
                items.append({"type": "text", "text": part})
        return items

    def chat_segments(self, dialogue: Messages, processor: Any, system: str) -> list[Segment]:
        """Segments from the processor's chat template: each answer is what rendering the
        assistant turn adds to the prompt rendered with ``add_generation_prompt=True``."""
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages += [{"role": r, "content": self._content(r, t)} for r, t in dialogue]
        end = self.end_of_turn(processor)

        def render(upto: int, generation: bool) -> str:
            return str(processor.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation
            ))  # fmt: skip

        segments: list[Segment] = []
        previous = ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, full = render(k, True), render(k + 1, False)
            if not prompt.startswith(previous) or not full.startswith(prompt):
                raise DataError(
                    "the processor's chat template does not render conversations turn by turn "
                    "(a later rendering does not extend the earlier one); use --prompt_format plain"
                )
            answer = full[len(prompt) :]
            if end not in answer:
                answer = answer.rstrip() + end
            segments += [Segment(prompt[len(previous) :], False), Segment(answer, True)]
            previous = full
        return segments

    def answer_text(self, target: str, processor: Any) -> str:
        """The reference answer inside a target segment (end marker and spaces removed)."""
        return target.split(self.end_of_turn(processor))[0].strip()

    # ------------------------------------------------------------------ images
    def use_pad_to_square(self, model: Model, configured: bool | None) -> bool:
        return self.pad_to_square if configured is None else configured

    def prepare_image(self, image: Image.Image, processor: Any, pad_to_square: bool) -> Image.Image:
        if not pad_to_square or image.width == image.height:
            return image
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        colour = tuple(round(255 * m) for m in mean)
        side = max(image.width, image.height)
        canvas = Image.new(image.mode, (side, side), colour)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return canvas

    # ------------------------------------------------------------------ model parts
    def language_model(self, model: Model) -> nn.Module:
        return model.model.language_model

    def llm_modules(self, model: Model) -> list[nn.Module]:
        """Modules trained in full by ``--stage finetune`` (besides the projector)."""
        return [self.language_model(model), model.lm_head]

    def lora_target(self, model: Model, spec: str) -> str:
        """peft ``target_modules`` regex: every ``nn.Linear`` of the language model."""
        if spec != "auto":
            return spec
        llm = self.language_model(model)
        prefix = next(name for name, module in model.named_modules() if module is llm)
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)}
        )
        if not leaves:
            raise ConfigError(
                "the language model has no nn.Linear layers for LoRA; pass --lora_target"
            )
        return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})"

    def image_token_id(self, model: Model) -> int:
        return int(model.config.image_token_id)

    def distill_tokens(self, model: Model) -> int:
        """Budget whose FlexProjector grid matches the stock projector's output grid: the
        native count, or, where each image keeps its own (Qwen), a budget that caps none."""
        native = adapter_for(model).native_tokens(model)
        return UNCAPPED_BUDGET if native is None else native
