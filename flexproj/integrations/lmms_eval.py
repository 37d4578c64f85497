"""lmms-eval model ``flexproj``: score a converted model on lmms-eval's benchmarks.

Registered through lmms-eval's entry point group ``lmms_eval.models`` (pyproject.toml),
so with ``pip install 'flexproj[lmms-eval]'``::

    lmms-eval --model flexproj --model_args pretrained=BASE,projector=RUN,tokens=64 \\
        --tasks mme,textvqa_val,gqa --batch_size 8

Model arguments (``--model_args k=v,...``):

* ``pretrained``: the base model (hub id, directory, or ``tiny:<family>``);
* ``projector``: a ``flexproj train`` output directory (``recipe.json`` gives the family,
  prompt format and weights; LoRA adapters and fine-tuned weights come along) or a bare
  projector directory; left out: the stock projector, its outputs pooled to the budget
  (training-free);
* ``tokens``: the vision-token budget per image (tile, ...), or ``auto``:
  :func:`flexproj.adaptive_generate` climbs ``ladder`` (default ``64/144/256``) until the
  answer's confidence reaches ``threshold`` (default 0.5); the tokens it spent are
  printed after every batch of requests and written to ``tokens_log`` (a JSON file) when
  given;
* ``family``, ``dtype`` (``auto``), ``device`` (cuda when available), ``max_new_tokens``
  (16, unless the task's ``generation_kwargs`` say otherwise).

A prompt is formatted exactly as ``flexproj eval`` formats it (the run's prompt format and
system prompt): the task's text is the user turn, with ``<image>`` put in front when the
text holds none. So a task over the questions of a ``flexproj eval`` file scores what
``flexproj eval`` scores (tests_lmms/ checks it through lmms-eval's own CLI).

Two helpers, as ``python -m flexproj.integrations.lmms_eval ...``:

* ``task --data FILE.json --out DIR``: an lmms-eval task (YAML + JSONL) over a LLaVA-format
  file of one-question records, scored by exact match as ``flexproj eval`` scores;
  run it with ``lmms-eval --include_path DIR --tasks NAME``;
* ``sweep --tokens 64 144 256 auto -- LMMS_EVAL_ARGS``: lmms-eval once per budget
  (``tokens=N`` added to ``--model_args``, results under ``--output_path``/tokens_N).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

import flexproj
from flexproj.errors import FlexprojError

__all__ = ["FlexprojLMM", "manifest", "write_task"]

MODEL_ID = "flexproj"
IMAGE_TAG = "<image>"


class LmmsEvalError(FlexprojError, ValueError):
    """Model arguments or task data lmms-eval cannot be run with."""


def manifest() -> Any:
    """The entry point lmms-eval reads (group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{FlexprojLMM.__name__}")


def _budget(value: Any) -> int | str:
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if not text.isdigit() or int(text) < 1:
        raise LmmsEvalError(f"tokens={value!r}: give a positive number of vision tokens or 'auto'")
    return int(text)


def _ladder(value: Any) -> tuple[int, ...]:
    parts = str(value).replace(":", "/").split("/")
    if not all(p.strip().isdigit() for p in parts):
        raise LmmsEvalError(f"ladder={value!r}: give budgets joined by '/', e.g. 64/144/256")
    return tuple(int(p) for p in parts)


def _to(batch: Any, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class FlexprojLMM(lmms):
    """A flexproj-converted model (or a stock one, pooled) at a fixed or automatic budget."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        projector: str | None = None,
        tokens: int | str = 144,
        family: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 16,
        ladder: str = "64/144/256",
        threshold: float | str = 0.5,
        tokens_log: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        unknown = {k: v for k, v in unknown.items() if v is not None and k != "max_batch_size"}
        if unknown:
            raise LmmsEvalError(
                f"unknown --model_args {sorted(unknown)}: flexproj takes pretrained, projector, "
                "tokens, family, dtype, device, max_new_tokens, ladder, threshold, tokens_log"
            )
        from flexproj.recipes.evaluate import EvalRun, check_budgets, load_run, run_batcher
        from flexproj.recipes.family import get_recipe, recipe_for_model

        self.tokens = _budget(tokens)
        self.ladder = _ladder(ladder)
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.tokens_log = Path(tokens_log) if tokens_log else None
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if projector:
            run = load_run(projector, model=pretrained, family=family, dtype=dtype, device=target)
        else:  # training-free: the stock projector, its outputs pooled to the budget
            recipe = get_recipe(family) if family else recipe_for_model(pretrained)
            model, processor = recipe.load(pretrained, dtype=dtype)
            flexproj.patch(model, processor, projector="stock")
            model.to(target).eval()
            run = EvalRun(pretrained, Path(pretrained), model, processor, recipe)
        self.run = run
        budgets = self.ladder if self.tokens == "auto" else (int(self.tokens),)
        try:
            check_budgets(run.model, budgets, flag="tokens")
        except FlexprojError as exc:
            raise LmmsEvalError(str(exc)) from None
        self.batcher = run_batcher(run)
        self.stop = run.recipe.stop_token_ids(run.processor)
        self.device = target
        self.spent: list[dict[str, Any]] = []  # tokens=auto: one entry per request

    # ------------------------------------------------------------------ requests
    def _example(self, context: str, visuals: Sequence[Any], answer: str = "-") -> dict[str, Any]:
        images = [v.convert("RGB") for v in visuals]
        tags = context.count(IMAGE_TAG)
        if tags == 0:
            context = "\n".join([IMAGE_TAG] * len(images) + [context])
        elif tags != len(images):
            raise LmmsEvalError(
                f"the task's text holds {tags} {IMAGE_TAG} tag(s) for {len(images)} image(s)"
            )
        return {"id": "", "images": images, "messages": [("user", context), ("assistant", answer)]}

    def _visuals(self, request: Instance) -> list[Any]:
        _context, _kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in (visuals or []) if v is not None]

    def _decode(self, ids: Sequence[int], until: Sequence[str]) -> str:
        cut = next((i for i, t in enumerate(ids) if t in self.stop), len(ids))  # end of turn
        text = self.run.processor.tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return str(text).strip()

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in request order, ``batch_size`` requests per ``generate``."""
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            kwargs = dict(chunk[0].args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_new_tokens", self.max_new_tokens))
            examples = [self._example(r.args[0], self._visuals(r)) for r in chunk]
            if self.tokens == "auto":
                rows = self._adaptive(examples, max_new)
            else:
                rows = self._fixed(examples, int(self.tokens), max_new)
            answers += [self._decode(ids, until) for ids in rows]
        if self.tokens == "auto":
            self._report()
        return answers

    @torch.no_grad()
    def _fixed(self, examples: list[dict[str, Any]], budget: int, max_new: int) -> list[list[int]]:
        model = self.run.model
        with flexproj.tokens(budget):
            prompts, _ = self.batcher.generation_batch(examples)
            prompts = _to(prompts, self.device)
            out = model.generate(
                **prompts, max_new_tokens=max_new, do_sample=False,
                eos_token_id=self.stop, pad_token_id=self.batcher.pad_id,
            )  # fmt: skip
        return [list(map(int, row)) for row in out[:, prompts["input_ids"].shape[1] :]]

    def _adaptive(self, examples: list[dict[str, Any]], max_new: int) -> list[list[int]]:
        texts = []
        for ex in examples:
            segments = self.batcher.segments(ex["messages"])
            last = max(i for i, s in enumerate(segments) if s.target)
            texts.append("".join(s.text for s in segments[:last]))
        out = flexproj.adaptive_generate(
            self.run.model, self.run.processor, text=texts,
            images=[self.batcher.images(ex) for ex in examples], budgets=self.ladder,
            threshold=self.threshold, max_new_tokens=max_new,
        )  # fmt: skip
        for budget, history in zip(out.budgets, out.history, strict=True):
            self.spent.append({"answered_at": budget, "spent": sum(b for b, _ in history)})
        return [list(map(int, seq)) for seq in out.sequences]

    def _report(self) -> None:
        n = len(self.spent)
        answered = sum(s["answered_at"] for s in self.spent) / max(n, 1)
        spent = sum(s["spent"] for s in self.spent) / max(n, 1)
        counts: dict[int, int] = {}
        for s in self.spent:
            counts[s["answered_at"]] = counts.get(s["answered_at"], 0) + 1
        summary = {
            "requests": n, "ladder": list(self.ladder), "threshold": self.threshold,
            "tokens_spent_per_image": spent, "tokens_answered_per_image": answered,
            "answered_at": dict(sorted(counts.items())),
        }  # fmt: skip
        print(
            f"flexproj tokens=auto: {n} requests, {spent:.1f} vision tokens per image spent "
            f"({answered:.1f} in the answering rung), answered at {summary['answered_at']}",
            file=sys.stderr,
        )
        if self.tokens_log is not None:
            self.tokens_log.parent.mkdir(parents=True, exist_ok=True)
            self.tokens_log.write_text(json.dumps(summary, indent=2) + "\n")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation (the assistant's answer, end-of-turn marker
        excluded) after the context, and whether greedy decoding would produce it."""
        results = []
        model = self.run.model
        budget = self.ladder[-1] if self.tokens == "auto" else int(self.tokens)
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            doc = self.task_dict[request.args[4]][request.args[5]][request.args[3]]
            visuals = [v for v in (request.args[2](doc) or []) if v is not None]
            target = continuation(doc) if callable(continuation) else continuation
            example = self._example(context, visuals, str(target).strip())
            with flexproj.tokens(budget), torch.no_grad():
                batch = _to(self.batcher.train_batch([example]), self.device)
                logits = model(**batch).logits[0, :-1].float()  # (T-1, V)
            labels = batch["labels"][0, 1:]  # (T-1,)
            answer = (labels != -100).nonzero()[:, 0]
            answer = answer[:-1] if len(answer) > 1 else answer  # drop the end-of-turn marker
            logp = logits.log_softmax(-1)[answer, labels[answer]]
            greedy = bool((logits[answer].argmax(-1) == labels[answer]).all())
            results.append((float(logp.sum()), greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("flexproj: multi-round generation is not supported")


# ----------------------------------------------------------------------------- local tasks

_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: generate_until
doc_to_visual: !function flexproj.integrations.lmms_eval.doc_to_visual
doc_to_text: !function flexproj.integrations.lmms_eval.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  do_sample: false
process_results: !function flexproj.integrations.lmms_eval.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The record's images (Pillow, RGB)."""
    from flexproj.recipes.data import open_image

    return [open_image(Path(p)) for p in doc["image"]]


def doc_to_text(doc: dict[str, Any]) -> str:
    return str(doc["question"])


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, int]:
    """Exact match after lower-casing and removing punctuation, as ``flexproj eval``."""
    from flexproj.recipes.evaluate import normalize_answer

    return {"exact_match": int(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def write_task(
    data: str | Path,
    out: str | Path,
    *,
    name: str = "flexproj_vqa",
    image_folder: str | Path | None = None,
    max_samples: int | None = None,
) -> Path:
    """An lmms-eval task over a LLaVA-format file: ``out/<name>.yaml`` and
    ``out/<name>.jsonl`` (one question per record, image paths made absolute)."""
    from flexproj.recipes.data import load_records

    records = load_records(data, image_folder, max_samples)
    rows = []
    for record in records:
        turns = [text for role, text in record.messages if role != "system"]
        if len(turns) != 2 or len(turns) != len(record.messages):
            raise LmmsEvalError(
                f"record {record.id!r}: a task takes one question and one answer per record "
                "(no system turn, no follow-up turns)"
            )
        rows.append({
            "id": record.id, "image": [str(p.resolve()) for p in record.images],
            "question": turns[0], "answer": turns[1], "kind": record.kind,
        })  # fmt: skip
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    yaml = folder / f"{name}.yaml"
    yaml.write_text(_TASK_YAML.format(name=name, jsonl=json.dumps(str(jsonl.resolve()))))
    return yaml


# ----------------------------------------------------------------------------- command line


def _with_tokens(argv: list[str], budget: str) -> list[str]:
    """lmms-eval's arguments with ``tokens=budget`` in --model_args and the output under
    --output_path/tokens_<budget>."""
    out = list(argv)
    for flag, edit in (("--model_args", lambda v: f"{v},tokens={budget}" if v else f"tokens={budget}"),
                       ("--output_path", lambda v: str(Path(v) / f"tokens_{budget}"))):  # fmt: skip
        if flag in out and out.index(flag) + 1 < len(out):
            i = out.index(flag) + 1
            if "tokens=" in out[i] and flag == "--model_args":
                raise LmmsEvalError("sweep: leave tokens= out of --model_args (--tokens sets it)")
            out[i] = edit(out[i])
        elif flag == "--model_args":
            out += [flag, edit("")]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flexproj.integrations.lmms_eval",
        description="lmms-eval helpers for flexproj models (see the module docstring).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    task = sub.add_parser("task", help="write an lmms-eval task over a LLaVA-format file")
    task.add_argument("--data", required=True, help="LLaVA-format JSON (one question each)")
    task.add_argument("--out", required=True, help="folder for the task (--include_path)")
    task.add_argument("--name", default="flexproj_vqa", help="task name (default flexproj_vqa)")
    task.add_argument("--image_folder", default=None)
    task.add_argument("--max_samples", type=int, default=None)
    sweep = sub.add_parser("sweep", help="run lmms-eval once per budget")
    sweep.add_argument("--tokens", nargs="+", required=True, help="budgets, and/or auto")
    sweep.add_argument("lmms_eval_args", nargs=argparse.REMAINDER,
                       help="-- then lmms-eval's arguments (--model flexproj ...)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.command == "task":
            yaml = write_task(args.data, args.out, name=args.name,
                              image_folder=args.image_folder, max_samples=args.max_samples)  # fmt: skip
            print(f"wrote {yaml}: lmms-eval --include_path {yaml.parent} --tasks {args.name}")
            return 0
        rest = [a for a in args.lmms_eval_args if a != "--"]
        budgets = [str(_budget(t)) for t in args.tokens]
        commands = [[sys.executable, "-m", "lmms_eval", *_with_tokens(rest, b)] for b in budgets]
    except FlexprojError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for budget, command in zip(budgets, commands, strict=True):
        print(f"== tokens={budget}: lmms-eval {' '.join(command[3:])}", flush=True)
        code = subprocess.run(command).returncode
        if code != 0:
            print(f"error: lmms-eval failed at tokens={budget} (exit {code})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
