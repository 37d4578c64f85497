"""LLaVA-format conversation data: loading, validation, and turning samples into tensors.

Input format (LLaVA-1.5 / ShareGPT style)::

    [{"id": "0001", "image": "images/0001.png",            # or a list of paths
      "conversations": [{"from": "human", "value": "<image>\\nWhat colour is it?"},
                        {"from": "gpt", "value": "Red."},
                        ...]}]

``image`` paths are relative to ``--image_folder`` when given, else to the JSON's
folder. ``<image>`` marks where each image goes; every image must be marked, all in
the first human turn. A ``.jsonl`` file (one record per line) works too. Everything
is checked when the dataset is built, so a broken record stops the run before the
model loads, with the record and the reason.

Tokenisation depends on the vision-token budget N (the processor writes N image
placeholders per image), so it cannot happen in the data loader: the dataset yields
raw examples (PIL images + messages), the collator just lists them, and the trainer
calls :meth:`Batcher.train_batch` inside ``flexproj.tokens(N)``.

How a conversation becomes ``input_ids`` and ``labels`` (:meth:`Batcher.train_batch`):
the family recipe renders it into segments ``[(text, is_target), ...]``; the first
segment (the prompt, with every image placeholder) goes through the *patched
processor* together with the images, exactly as at inference; the later segments
(answers, follow-up turns) through the tokenizer alone (``add_special_tokens=False``).
Labels are the token ids on target segments (assistant answers and their end-of-turn
marker) and -100 everywhere else: prompt, image placeholders, padding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from flexproj.errors import FlexprojError

if TYPE_CHECKING:
    from flexproj.recipes.family import FamilyRecipe

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TAG",
    "Batcher",
    "ConversationDataset",
    "DataError",
    "Record",
    "Segment",
    "collate_examples",
    "load_records",
]

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_MAX_LISTED = 5


class DataError(FlexprojError, ValueError):
    """The dataset cannot be used as it is (missing file, malformed record ...)."""


@dataclass(frozen=True)
class Record:
    """One validated conversation: image files and ``(role, text)`` turns."""

    id: str
    images: tuple[Path, ...]
    messages: tuple[tuple[str, str], ...]
    kind: str | None = None  # the record's optional "kind" (question type), for per-kind scores


@dataclass(frozen=True)
class Segment:
    text: str
    target: bool


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path) -> list[Any]:
    try:
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of records, got {type(data).__name__}")
    return data


def _record(raw: Any, index: int, root: Path) -> Record:
    where = f"record {index}"
    if not isinstance(raw, dict):
        raise DataError(f"{where} is a {type(raw).__name__}, expected an object")
    rid = str(raw.get("id", index))
    where = f"record {index} (id {rid!r})"
    if "image" not in raw or raw["image"] in (None, "", []):
        raise DataError(
            f"{where} has no 'image'; the recipes train vision-token budgets and need an image "
            "per record (filter text-only records out of the dataset)"
        )
    names = raw["image"] if isinstance(raw["image"], list) else [raw["image"]]
    if not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{where}: 'image' must be a path or a list of paths, got {raw['image']!r}")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where} has no 'conversations' list")
    messages: list[tuple[str, str]] = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(
                f"{where}, turn {j}: expected {{'from': ..., 'value': str}}, got {turn!r}"
            )
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(
                f"{where}, turn {j}: unknown speaker {turn.get('from')!r} (use human/gpt, "
                "user/assistant or system)"
            )
        messages.append((role, turn["value"]))
    if [i for i, (role, _) in enumerate(messages) if role == "system"] not in ([], [0]):
        raise DataError(f"{where}: a system turn may only come first")
    dialogue = [m for m in messages if m[0] != "system"]
    expected = ["user", "assistant"] * len(dialogue)
    if [r for r, _ in dialogue] != expected[: len(dialogue)] or len(dialogue) < 2:
        raise DataError(
            f"{where}: turns must alternate human, gpt, human, gpt ... starting with human and "
            "with at least one gpt answer"
        )
    tags = [text.count(IMAGE_TAG) for _, text in dialogue]
    if sum(tags) == 0:
        raise DataError(
            f"{where} has {len(names)} image(s) but no {IMAGE_TAG} in its conversation; put "
            f"{IMAGE_TAG} where the image goes in the first human turn (e.g. '{IMAGE_TAG}\\nWhat ...')"
        )
    if sum(tags) != len(names) or tags[0] != len(names):
        raise DataError(
            f"{where} has {len(names)} image(s) and {sum(tags)} {IMAGE_TAG} tag(s) "
            f"({tags[0]} in the first human turn); each image needs exactly one tag, all in "
            "the first human turn"
        )
    paths = tuple(Path(n) if os.path.isabs(n) else root / n for n in names)
    kind = raw.get("kind")
    return Record(rid, paths, tuple(messages), None if kind is None else str(kind))


def load_records(
    path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None = None,
    max_samples: int | None = None,
    *,
    check_files: bool = True,
) -> list[Record]:
    """Validated records of a LLaVA-format JSON/JSONL file (see the module docstring)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--data {file}: no such file")
    root = Path(image_folder) if image_folder is not None else file.parent
    if image_folder is not None and not root.is_dir():
        raise DataError(f"--image_folder {root}: no such directory")
    raw = _read_json(file)
    if max_samples is not None:
        raw = raw[:max_samples]
    if not raw:
        raise DataError(f"{file} holds no records")
    records = [_record(r, i, root) for i, r in enumerate(raw)]
    if check_files:
        missing = [(r.id, p) for r in records for p in r.images if not p.is_file()]
        if missing:
            listed = "; ".join(f"id {rid!r}: {p}" for rid, p in missing[:_MAX_LISTED])
            more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
            hint = (
                "" if image_folder is not None else "; pass --image_folder if they live elsewhere"
            )
            raise DataError(f"{len(missing)} image file(s) not found: {listed}{more}{hint}")
    return records


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


class ConversationDataset(torch.utils.data.Dataset):
    """Map-style dataset of raw examples ``{"id", "images": [PIL.Image], "messages", "kind"}``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_folder: str | os.PathLike[str] | None = None,
        max_samples: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.records = load_records(path, image_folder, max_samples)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        return {
            "id": record.id,
            "images": [open_image(p) for p in record.images],
            "messages": list(record.messages),
            "kind": record.kind,
        }


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The data collator: raw examples, untouched (tokenised later, under the step's budget)."""
    return {"examples": list(examples)}


# ----------------------------------------------------------------------------- tensors


def _per_token_keys(encoding: dict[str, Any]) -> list[str]:
    """Outputs with one value per token (input_ids, attention_mask, mm_token_type_ids ...)."""
    ids = encoding["input_ids"]
    return [
        k for k, v in encoding.items()
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == ids.shape
    ]  # fmt: skip


class Batcher:
    """Builds model inputs from raw examples under the budget in force (see module docstring)."""

    def __init__(
        self,
        recipe: FamilyRecipe,
        processor: Any,
        *,
        prompt_format: str,
        system_prompt: str | None,
        pad_to_square: bool,
        max_length: int | None = None,
    ) -> None:
        self.recipe = recipe
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt_format = prompt_format  # "chat_template" or "plain"
        self.system_prompt = system_prompt
        self.pad_to_square = pad_to_square
        self.max_length = max_length
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)

    # --- text
    def segments(self, messages: Sequence[tuple[str, str]]) -> list[Segment]:
        return self.recipe.render(messages, self.processor, self.prompt_format, self.system_prompt)

    def images(self, example: dict[str, Any]) -> list[Image.Image]:
        return [
            self.recipe.prepare_image(im, self.processor, self.pad_to_square)
            for im in example["images"]
        ]

    def _encode_prompts(
        self, prompts: list[str], examples: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        images = self.recipe.processor_images([self.images(ex) for ex in examples])
        return dict(self.processor(text=prompts, images=images, return_tensors="pt", padding=True))

    # --- training / teacher-forced evaluation
    def train_batch(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Inputs + ``labels`` (answers only), right-padded. Call inside ``flexproj.tokens(N)``."""
        rendered = [self.segments(ex["messages"]) for ex in examples]
        encoding = self._encode_prompts([segs[0].text for segs in rendered], examples)
        per_token = _per_token_keys(encoding)
        mask = encoding["attention_mask"].bool()
        rows: list[dict[str, torch.Tensor]] = []
        for i, segs in enumerate(rendered):
            row = {k: encoding[k][i][mask[i]] for k in per_token}
            labels = [torch.full_like(row["input_ids"], IGNORE_INDEX)]
            pieces = [row["input_ids"]]
            for seg in segs[1:]:
                ids = torch.tensor(
                    self.tokenizer(seg.text, add_special_tokens=False)["input_ids"],
                    dtype=torch.long,
                )
                pieces.append(ids)
                labels.append(ids.clone() if seg.target else torch.full_like(ids, IGNORE_INDEX))
            extra = sum(p.numel() for p in pieces[1:])
            for k in per_token:
                if k == "input_ids":
                    continue
                fill = 1 if k == "attention_mask" else 0
                row[k] = torch.cat([row[k], row[k].new_full((extra,), fill)])
            row["input_ids"] = torch.cat(pieces)
            row["labels"] = torch.cat(labels)
            if self.max_length is not None and row["input_ids"].numel() > self.max_length:
                if pieces[0].numel() >= self.max_length:
                    raise DataError(
                        f"example {examples[i].get('id')!r}: its prompt alone is {pieces[0].numel()} tokens "
                        f"(image tokens included), over --max_length {self.max_length}"
                    )
                row = {k: v[: self.max_length] for k, v in row.items()}
            rows.append(row)

        length = max(r["input_ids"].numel() for r in rows)
        batch: dict[str, Any] = {k: v for k, v in encoding.items() if k not in per_token}
        for key in [*per_token, "labels"]:
            fill = self.pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            out = rows[0][key].new_full((len(rows), length), fill)
            for i, r in enumerate(rows):
                out[i, : r[key].numel()] = r[key]
            batch[key] = out
        return batch

    # --- generation
    def generation_batch(
        self, examples: Sequence[dict[str, Any]]
    ) -> tuple[dict[str, Any], list[str]]:
        """Left-padded prompts (everything before the last answer) and the last answers."""
        prompts, answers = [], []
        for ex in examples:
            segs = self.segments(ex["messages"])
            last = max(i for i, s in enumerate(segs) if s.target)
            prompts.append("".join(s.text for s in segs[:last]))
            answers.append(self.recipe.answer_text(segs[last].text, self.processor))
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            encoding = self._encode_prompts(prompts, examples)
        finally:
            self.tokenizer.padding_side = side
        return encoding, answers
