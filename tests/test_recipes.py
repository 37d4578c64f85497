"""Training recipes on tiny models: stages per family, resume, DDP, bad input.

Every run is a few optimiser steps of a tiny real model (``flexproj.testing.tiny_vlm``)
on a synthetic LLaVA-format dataset, with budgets the tiny grids can serve
(8x8 patch grid: 4, 9 and 16 tokens).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flexproj
from flexproj.errors import BudgetError
from flexproj.recipes.config import ConfigError, parse_args
from flexproj.recipes.data import Batcher, DataError, load_records
from flexproj.recipes.family import get_recipe, recipe_families
from flexproj.recipes.trainer import main, train
from flexproj.schedule import parse_schedule
from flexproj.testing import tiny_images, tiny_specs, tiny_vlm
from flexproj.testing.datasets import make_samples, write_llava_dataset

SCHEDULE = "4:2,9:3,16:5"
#: recipe -> its default tiny model (also a model type), from the registered families
FAMILIES = {r: get_recipe(r).default_tiny for r in recipe_families()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_dataset(make_samples(8, seed=0), tmp_path_factory.mktemp("data"))


def test_recipes_take_the_tiny_variants_their_families_declare():
    assert {"llava", "qwen_vl", "internvl"} <= set(FAMILIES)
    for name in recipe_families():
        recipe = get_recipe(name)
        declared = [n for n, s in tiny_specs().items() if s.model_type in recipe.model_types]
        assert sorted(recipe.tiny_families) == sorted(declared)
        assert recipe.default_tiny in declared


def args(family, data, out, *extra, steps=2):
    return [
        "--model", f"tiny:{FAMILIES[family]}", "--data", str(data), "--output_dir", str(out),
        "--schedule", SCHEDULE, "--max_steps", str(steps), "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def run(family, argv, recipe_overrides=None):
    config, training_args = parse_args(
        argv, get_recipe(family).stage_defaults, overrides=recipe_overrides
    )
    return train(family, config, training_args, log=lambda _msg: None)


def logged(out):
    lines = [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


def budgets(out, rank=0):
    return [
        json.loads(x) for x in (Path(out) / f"budgets/rank{rank}.jsonl").read_text().splitlines()
    ]


def exact_match_rate(examples):
    """Accuracy recomputed from the report's examples (all of them when at most 5)."""
    from flexproj.recipes.evaluate import normalize_answer

    hits = [normalize_answer(e["generated"]) == normalize_answer(e["answer"]) for e in examples]
    return sum(hits) / len(hits)


def require_adapter(family):
    model_type = FAMILIES[family]
    if model_type not in flexproj.supported_models():
        pytest.skip(
            f"no flexproj adapter registered for {model_type!r} (adapters/{family}.py missing)"
        )


# ----------------------------------------------------------------------------- stages


@pytest.mark.parametrize("family", list(FAMILIES))
def test_align_then_finetune_full_and_lora_then_evaluate(family, data, tmp_path):
    require_adapter(family)
    from flexproj.recipes.evaluate import evaluate

    align, full, lora = tmp_path / "align", tmp_path / "full", tmp_path / "lora"
    schedule = parse_schedule(SCHEDULE, seed=42)  # --seed defaults to 42

    # align, warm-started from the stock projector
    summary = run(family, args(family, data, align, "--stage", "align", "--init", "distill",
                              "--distill_steps", "3", "--distill_batch_size", "2"))  # fmt: skip
    assert summary["outputs"] == {"projector": "."} and summary["global_step"] == 2
    distill = json.loads((align / "distill.json").read_text())
    assert len(distill["history"]) == 3
    # distillation moved the projector towards the stock one on the fixed probe batch
    assert distill["cosine_after"] > distill["cosine_before"]
    assert distill["mse_after"] < distill["mse_before"]
    if family == "internvl":  # matched grid: the stock count per tile, not the 8x8 native grid
        assert distill["tokens"] == 16
    steps = logged(align)
    assert [s["tokens"] for s in steps] == [schedule.budget_at(0), schedule.budget_at(1)]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert [b["tokens"] for b in budgets(align)] == [s["tokens"] for s in steps]

    # finetune: full, and LoRA, both from the aligned projector
    run(family, args(family, data, full, "--stage", "finetune", "--init", str(align)))
    run(
        family,
        args(
            family,
            data,
            lora,
            "--stage",
            "finetune",
            "--lora",
            "--lora_r",
            "4",
            "--init",
            str(align),
        ),
    )
    assert (full / "model" / "config.json").is_file()
    assert (lora / "lora" / "adapter_config.json").is_file()

    # the saved projector loads back onto a fresh tiny model
    recipe = get_recipe(family)
    model, processor = recipe.load(f"tiny:{FAMILIES[family]}")
    flexproj.from_pretrained(model, align, processor)
    saved = load_file(str(align / "flexproj.safetensors"))
    live = flexproj.get_projector(model).state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert json.loads((align / "flexproj_config.json").read_text())["token_schedule"]["tokens"] == [
        4,
        9,
        16,
    ]

    # full finetune: the LLM changed, the stock projector is back in its slot in model/
    fresh, _ = recipe.load(f"tiny:{FAMILIES[family]}")
    trained = type(fresh).from_pretrained(full / "model").state_dict()
    stock = fresh.state_dict()
    assert set(trained) == set(stock)
    llm = recipe.language_model(fresh)
    llm_prefix = next(name for name, module in fresh.named_modules() if module is llm) + "."
    llm_keys = [k for k in trained if k.startswith(llm_prefix)]
    assert llm_keys and not all(torch.equal(trained[k], stock[k]) for k in llm_keys)
    parent, attribute = flexproj.registry.adapter_for(fresh).projector_slot(fresh)
    prefix = next(name for name, module in fresh.named_modules() if module is parent)
    slot_keys = [k for k in stock if k.startswith(f"{prefix}.{attribute}.")]
    assert slot_keys and all(torch.equal(trained[k], stock[k]) for k in slot_keys)

    # all three evaluate at two budgets
    report = evaluate([align, full, lora], data, [4, 16], output_dir=tmp_path / "eval", max_samples=2,
                      batch_size=2, max_new_tokens=3, prefill_repeats=1, progress=False, log=lambda _m: None)  # fmt: skip
    for entry in report["runs"]:
        assert [r["tokens"] for r in entry["results"]] == [4, 16]
        for r in entry["results"]:
            assert r["loss"] > 0 and r["accuracy"] == exact_match_rate(r["examples"])
        few, many = entry["results"]
        assert few["vision_tokens_per_sample"] < many["vision_tokens_per_sample"]


@pytest.mark.parametrize("tiny", ["llava_next", "qwen3_vl"])
def test_other_family_members_train(tiny, data, tmp_path):
    family = {"llava_next": "llava", "qwen3_vl": "qwen_vl"}[tiny]
    require_adapter(family)
    argv = args(
        family,
        data,
        tmp_path,
        "--init",
        "distill",
        "--distill_steps",
        "1",
        "--distill_batch_size",
        "2",
    )
    argv[1] = f"tiny:{tiny}"
    summary = run(family, argv)
    assert summary["model_type"] == tiny and summary["global_step"] == 2


# ----------------------------------------------------------------------------- what trains


@pytest.fixture
def watched(monkeypatch):
    """Each run's model, its trainable parameters, and those a step changed (by identity)."""
    from flexproj.recipes import trainer as trainer_module

    runs = []

    class Watched(trainer_module.FlexTrainer):
        def train(self, *a, **kw):
            params = dict(self.model.named_parameters())
            before = {n: p.detach().clone() for n, p in params.items()}
            result = super().train(*a, **kw)
            runs.append(
                {
                    "model": self.model,
                    "trainable": {id(p) for p in params.values() if p.requires_grad},
                    "changed": {id(p) for n, p in params.items() if not torch.equal(p, before[n])},
                }
            )
            return result

    monkeypatch.setattr(trainer_module, "FlexTrainer", Watched)
    return runs


def ids(*modules):
    return {id(p) for m in modules for p in m.parameters()}


def test_each_stage_trains_what_it_claims_and_logs_the_steps_budget(data, tmp_path, watched):
    """align: the projector only; finetune: the LLM and the projector, never the tower;
    LoRA: LoRA weights and the projector in full, the base LLM frozen. Under gradient
    accumulation with a two-step logging window, the logs carry each window's last step's
    draw (``tokens``) and the mean of its draws (``tokens_mean``)."""
    schedule = parse_schedule(SCHEDULE, seed=42)
    accum = ["--gradient_accumulation_steps", "2", "--logging_steps", "2"]
    one_step = ["--stage", "finetune", "--warmup_steps", "0"]  # lr > 0 at the single step
    run("llava", args("llava", data, tmp_path / "align", "--stage", "align", *accum, steps=4))
    run("llava", args("llava", data, tmp_path / "full", *one_step, steps=1))
    run("llava", args("llava", data, tmp_path / "lora", *one_step, "--lora", "--lora_r", "4",
                      steps=1))  # fmt: skip
    align, full, lora = watched

    model = align["model"]
    projector = ids(flexproj.get_projector(model))
    assert align["trainable"] == align["changed"] == projector

    model = full["model"]
    base = model.model
    llm = ids(base.language_model, model.lm_head)
    assert full["trainable"] == llm | ids(flexproj.get_projector(model))
    assert not full["trainable"] & ids(base.vision_tower, base.multi_modal_projector.stock)
    assert ids(flexproj.get_projector(model)) <= full["changed"] <= full["trainable"]
    assert ids(*(layer.self_attn.q_proj for layer in base.language_model.layers)) <= full["changed"]

    peft_model = lora["model"]
    model = peft_model.get_base_model()
    projector = ids(flexproj.get_projector(model))
    lora_weights = {id(p) for n, p in peft_model.named_parameters() if "lora_" in n}
    lora_b = {id(p) for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora_weights and lora["trainable"] == lora_weights | projector
    assert not lora["trainable"] & ids(model.model.vision_tower, model.lm_head)
    assert projector | lora_b <= lora["changed"] <= lora["trainable"]

    # logs: windows (steps 0-1) and (2-3); the draws differ inside each window here
    draws = [schedule.budget_at(s) for s in range(4)]
    assert draws[0] != draws[1] and draws[2] != draws[3]
    steps = logged(tmp_path / "align")
    assert [s["step"] for s in steps] == [2, 4]
    assert [s["tokens"] for s in steps] == [draws[1], draws[3]]
    assert [s["tokens_mean"] for s in steps] == [sum(draws[:2]) / 2, sum(draws[2:]) / 2]
    micro = budgets(tmp_path / "align")
    assert [(b["step"], b["tokens"]) for b in micro] == [
        (s + 1, draws[s]) for s in range(4) for _ in "ab"
    ]
    assert [s["vision_tokens"] for s in steps] == [
        sum(b["vision_tokens"] for b in micro[:4]),
        sum(b["vision_tokens"] for b in micro[4:]),
    ]
    state = json.loads((tmp_path / "align" / "trainer_state.json").read_text())
    history = [e for e in state["log_history"] if "loss" in e]
    assert [(e["tokens"], e["tokens_mean"]) for e in history] == [
        (s["tokens"], s["tokens_mean"]) for s in steps
    ]


# ----------------------------------------------------------------------------- resume


def test_resume_repeats_the_uninterrupted_loss_sequence(data, tmp_path):
    common = ["--stage", "finetune", "--gradient_accumulation_steps", "2", "--save_strategy", "steps",
              "--save_steps", "2"]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main("llava", args("llava", data, whole, *common, steps=4)) == 0
    assert (whole / "checkpoint-2" / "trainable.safetensors").is_file()
    assert main("llava", args("llava", data, resumed, *common, "--resume_from_checkpoint",
                              str(whole / "checkpoint-2"), steps=4)) == 0  # fmt: skip

    full, tail = logged(whole), logged(resumed)
    assert [s["step"] for s in full] == [1, 2, 3, 4] and [s["step"] for s in tail] == [3, 4]
    assert [s["loss"] for s in tail] == [
        s["loss"] for s in full[2:]
    ]  # exact: same data, budgets, RNG
    assert [s["tokens"] for s in tail] == [s["tokens"] for s in full[2:]]
    # every micro-batch of a step trained at the step's budget (2 per step here)
    per_step = {}
    for line in budgets(whole):
        per_step.setdefault(line["step"], set()).add(line["tokens"])
    assert all(len(v) == 1 for v in per_step.values()) and len(budgets(whole)) == 8
    # the resumed run continues the vision-token count
    assert tail[-1]["vision_tokens_total"] == full[-1]["vision_tokens_total"]


# ----------------------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_uses_one_budget_per_step(data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "flexproj.recipes.llava",
               *args("llava", data, tmp_path, steps=3)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = budgets(tmp_path, 0), budgets(tmp_path, 1)
    assert [(b["step"], b["tokens"]) for b in rank0] == [(b["step"], b["tokens"]) for b in rank1]
    schedule = parse_schedule(SCHEDULE, seed=42)
    assert [b["tokens"] for b in rank0] == [schedule.budget_at(s) for s in range(3)]
    for a, b in zip(rank0, rank1):  # each rank trains its own share of the batch
        assert not set(a["ids"]) & set(b["ids"])
    # logged vision tokens add up both ranks
    steps = logged(tmp_path)
    assert [s["vision_tokens"] for s in steps] == [
        a["vision_tokens"] + b["vision_tokens"] for a, b in zip(rank0, rank1)
    ]


def _per_sample_draws(out, ranks):
    """{step: sorted budgets of the step's global batch} from the per-rank budget logs."""
    draws: dict[int, list[int]] = {}
    for rank in range(ranks):
        for line in budgets(out, rank):
            draws.setdefault(line["step"], []).extend(line["tokens"])
    return {step: sorted(b) for step, b in draws.items()}


def test_per_sample_budgets_mix_within_a_batch(data, tmp_path):
    """--per_sample: each sample's budget is the schedule's draw for (seed, step, its index
    in the step's global batch); batches mix budgets; the logs give the mix and the mean."""
    out = tmp_path / "one"
    run("llava", args("llava", data, out, "--per_sample", "true",
                      "--gradient_accumulation_steps", "2", steps=3))  # fmt: skip
    schedule = parse_schedule(SCHEDULE, seed=42, per_sample=True)
    lines = budgets(out)
    assert len(lines) == 6  # 3 steps x 2 micro-batches of 2 samples
    for i, line in enumerate(lines):
        step, micro = line["step"] - 1, i % 2
        assert line["tokens"] == [schedule.budget_for_sample(step, micro * 2 + k) for k in (0, 1)]
    assert any(len(set(line["tokens"])) > 1 for line in lines), "no batch mixed budgets"
    for entry, step in zip(logged(out), range(3)):
        mix = [schedule.budget_for_sample(step, k) for k in range(4)]
        assert entry["tokens"] == pytest.approx(sum(mix) / 4)


@pytest.mark.slow
def test_per_sample_draws_are_the_same_on_one_and_two_processes(data, tmp_path):
    one = tmp_path / "one"
    run("llava", args("llava", data, one, "--per_sample", "true",
                      "--gradient_accumulation_steps", "2", steps=2))  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    two = tmp_path / "two"
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "flexproj.recipes.llava",
               *args("llava", data, two, "--per_sample", "true", steps=2)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # the same global batch of 4 samples per step, split over micro-batches or ranks
    assert _per_sample_draws(two, 2) == _per_sample_draws(one, 1)
    schedule = parse_schedule(SCHEDULE, seed=42, per_sample=True)
    assert _per_sample_draws(one, 1) == {
        step + 1: sorted(schedule.budget_for_sample(step, k) for k in range(4)) for step in range(2)
    }


def _torchrun(data, out, *extra, steps=2):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "flexproj.recipes.llava",
               *args("llava", data, out, *extra, steps=steps)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_processes_matches_ddp(data, tmp_path):
    """DeepSpeed ZeRO-2 (2 CPU processes, its shared-memory comm op) trains what DDP trains:
    the same losses and budgets per step, the same saved projector (to float32 rounding) that
    loads and runs on a fresh model."""
    config = tmp_path / "zero2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                  "train_micro_batch_size_per_gpu": "auto",
                                  "gradient_accumulation_steps": "auto",
                                  "train_batch_size": "auto"}))  # fmt: skip
    ddp, zero = tmp_path / "ddp", tmp_path / "zero2"
    for out, extra in ((ddp, ()), (zero, ("--deepspeed", str(config)))):
        done = _torchrun(data, out, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    ran = {out.name: json.loads((out / "recipe.json").read_text()) for out in (ddp, zero)}
    assert ran["ddp"]["distributed"] == "MULTI_CPU" and ran["zero2"]["distributed"] == "DEEPSPEED"
    assert ran["ddp"]["world_size"] == ran["zero2"]["world_size"] == 2
    assert [(s["loss"], s["tokens"]) for s in logged(zero)] == [
        (s["loss"], s["tokens"]) for s in logged(ddp)
    ]
    from safetensors.torch import load_file

    saved = [load_file(out / "flexproj.safetensors") for out in (ddp, zero)]
    assert saved[0].keys() == saved[1].keys()
    # the same weights to float32 rounding: DeepSpeed reduces the gradients in its own
    # buckets and order, gloo in DDP's, so the last bit may differ (it did after a change of
    # the tiny tokenizer's vocabulary, 1.5e-8 at most); a wrong reduction would be ~1e-3
    for k in saved[0]:
        torch.testing.assert_close(saved[1][k], saved[0][k], rtol=0, atol=1e-6)
    model, processor = tiny_vlm("llava")
    flexproj.from_pretrained(model, zero, processor)
    with flexproj.tokens(4):
        inputs = processor(text=["<image> what color ?"], images=tiny_images([(64, 64)]),
                           return_tensors="pt")  # fmt: skip
        assert (
            model.generate(**inputs, max_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2
        )


@pytest.mark.slow
def test_fsdp_on_cpu_processes_is_refused_not_silently_ddp(data, tmp_path):
    """accelerate turns --fsdp into plain DDP on CPU processes without a word; the recipe
    says so and stops instead of training something other than what was asked."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "flexproj.recipes.llava",
               *args("llava", data, tmp_path, "--fsdp", "full_shard", steps=1)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "--fsdp was given but accelerate runs this job as" in done.stderr + done.stdout
    assert not (tmp_path / "flexproj.safetensors").exists()


# ----------------------------------------------------------------------------- bad input


def test_missing_image_file_fails_before_training(tmp_path, capsys):
    path = write_llava_dataset(make_samples(3, seed=0), tmp_path / "d")
    (tmp_path / "d" / "images" / "000001.png").unlink()
    out = tmp_path / "out"
    assert main("llava", args("llava", path, out)) == 2
    err = capsys.readouterr().err
    assert "1 image file(s) not found" in err and "000001.png" in err and "--image_folder" in err
    assert not out.exists()


def test_conversation_without_image_tag_fails(tmp_path):
    path = write_llava_dataset(make_samples(2, seed=0), tmp_path)
    records = json.loads(path.read_text())
    records[1]["conversations"][0]["value"] = "what color is the large shape ?"
    path.write_text(json.dumps(records))
    with pytest.raises(
        DataError, match=r"record 1 \(id '000001'\) has 1 image\(s\) but no <image>"
    ):
        load_records(path)
    assert main("llava", args("llava", path, tmp_path / "out")) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("image"), "has no 'image'"),
        (lambda r: r["conversations"].pop(), "at least one gpt answer"),
        (lambda r: r["conversations"][0].update({"from": "robot"}), "unknown speaker 'robot'"),
        (
            lambda r: r["conversations"][1].update({"value": "<image> red"}),
            "all in the first human turn",
        ),
    ],
)
def test_malformed_records_are_named(tmp_path, edit, message):
    path = write_llava_dataset(make_samples(1, seed=0), tmp_path)
    records = json.loads(path.read_text())
    edit(records[0])
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_unknown_family(tmp_path, capsys):
    from flexproj.cli import main as cli

    assert main("mamba", ["--help"]) == 2
    assert (
        "unknown model family 'mamba'; choose one of gemma3, internvl, llava, qwen3_5, qwen_vl, smolvlm"
        in capsys.readouterr().err
    )
    assert cli(["train", "mamba", "--model", "x"]) == 2
    assert "unknown model family" in capsys.readouterr().err


def test_budget_the_model_cannot_serve_fails_before_training(data, tmp_path, capsys):
    argv = args("llava", data, tmp_path / "out")
    argv[argv.index(SCHEDULE)] = "16:1,100:1"
    assert main("llava", argv) == 2
    err = capsys.readouterr().err
    assert "--schedule [16, 100]" in err and "exceeds this model's native 64" in err
    assert not (tmp_path / "out" / "budgets").exists()
    with pytest.raises(BudgetError):
        run("llava", argv)


def test_qwen_caps_large_budgets_instead_of_failing(data):
    require_adapter("qwen_vl")
    from flexproj.recipes.trainer import _check_schedule

    recipe = get_recipe("qwen_vl")
    model, _ = recipe.load("tiny:qwen2_vl")
    flexproj.patch(model)
    notes = []
    _check_schedule(model, parse_schedule("64:2,144:3,4096:5"), notes.append)
    assert notes and "capped" in notes[0]


def test_wrong_model_for_the_family(data, tmp_path):
    with pytest.raises(ConfigError, match="tiny:qwen2_vl is not a llava model"):
        run("llava", args("qwen_vl", data, tmp_path))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stage", "align", "--lora"], "--lora applies to --stage finetune"),
        (["--schedule", "64:2,oops"], "--schedule: cannot parse"),
        (["--init", "/nowhere"], "has no flexproj.safetensors"),
        (["--processor_kwargs", "[1]"], "must be a JSON object"),
    ],
)
def test_bad_options_are_config_errors(data, tmp_path, extra, message):
    argv = args("llava", data, tmp_path)
    if "--schedule" in extra:
        i = argv.index("--schedule")
        del argv[i : i + 2]
    with pytest.raises(ConfigError, match=message):
        parse_args([*argv, *extra], get_recipe("llava").stage_defaults)


# ----------------------------------------------------------------------------- config files


def test_config_file_then_flags(data, tmp_path):
    defaults = get_recipe("llava").stage_defaults
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"model": "tiny:llava", "data": str(data), "output_dir": str(tmp_path),
                                       "stage": "finetune", "schedule": "fixed:9", "learning_rate": 0.5}))  # fmt: skip
    config, targs = parse_args(["--config", str(config_file), "--schedule", "fixed:16"], defaults)
    assert config.schedule == "fixed:16"  # the flag wins
    assert (
        config.stage == "finetune" and targs.learning_rate == 0.5
    )  # the file beats the family default
    assert targs.remove_unused_columns is False
    config, targs = parse_args(["--config", str(config_file), "--learning_rate", "0.25"], defaults)
    assert config.schedule == "fixed:9" and targs.learning_rate == 0.25

    config_file.write_text(
        json.dumps({"model": "tiny:llava", "data": str(data), "output_dir": str(tmp_path)})
    )
    _, targs = parse_args(["--config", str(config_file), "--stage", "finetune"], defaults)
    assert targs.learning_rate == defaults["finetune"]["learning_rate"]

    config_file.write_text(json.dumps({"modle": "x"}))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['modle'\]"):
        parse_args(["--config", str(config_file)], defaults)


def test_yaml_config(data, tmp_path):
    pytest.importorskip("yaml")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: tiny:llava\ndata: {data}\noutput_dir: {tmp_path}\nschedule: fixed:4\nlora: true\n"
                           "stage: finetune\n")  # fmt: skip
    config, _ = parse_args(["--config", str(config_file)], get_recipe("llava").stage_defaults)
    assert config.schedule == "fixed:4" and config.lora


def test_help_lists_recipe_and_training_flags(capsys):
    from flexproj.cli import main as cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["train", "llava", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--schedule",
        "--init",
        "--lora",
        "--gradient_accumulation_steps",
        "--fsdp",
        "--deepspeed",
        "--bf16",
    ):
        assert flag in out


# ----------------------------------------------------------------------------- batches


def _batcher(family, prompt_format):
    recipe = get_recipe(family)
    model, processor = recipe.load(f"tiny:{FAMILIES[family]}")
    flexproj.patch(model, processor)
    return Batcher(
        recipe, processor, prompt_format=prompt_format, system_prompt=None, pad_to_square=False
    ), model


@pytest.mark.parametrize("prompt_format", ["chat_template", "plain"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_cover_answers_only(family, prompt_format, data):
    require_adapter(family)
    batcher, model = _batcher(family, prompt_format)
    tok = batcher.tokenizer
    from flexproj.recipes.data import ConversationDataset

    dataset = ConversationDataset(data)
    example = dataset[0]
    example["messages"] = [
        *example["messages"],
        ("user", "how many shapes ?"),
        ("assistant", "three"),
    ]
    with flexproj.tokens(9):
        batch = batcher.train_batch([example, dataset[1]])
    labels, ids = batch["labels"], batch["input_ids"]
    assert labels.shape == ids.shape
    image_id = get_recipe(family).image_token_id(model)
    assert not (labels == image_id).any()
    assert ((ids[1] == image_id).sum()) % 9 == 0  # 9 per image (per tile for InternVL)
    end = get_recipe(family).end_of_turn(batcher.processor)
    first = tok.decode(labels[0][labels[0] != -100])
    answer0 = example["messages"][1][1]
    assert (
        first.split() == [answer0, end, "three", end]
        or first.replace(" ", "") == f"{answer0}{end}three{end}"
    )
    second = labels[1][labels[1] != -100]
    assert tok.decode(second).replace(" ", "") == f"{dataset[1]['messages'][1][1]}{end}"
    # padding (right) is masked and has no attention
    pad = batch["attention_mask"] == 0
    assert (labels[pad] == -100).all()
    # the loss is finite under the budget
    with flexproj.tokens(9):
        assert torch.isfinite(model(**batch).loss)


def test_max_length_cuts_answers_not_prompts(data):
    from flexproj.recipes.data import ConversationDataset

    batcher, _ = _batcher("llava", "plain")
    example = ConversationDataset(data)[0]
    with flexproj.tokens(4):
        length = batcher.train_batch([example])["input_ids"].shape[1]
        batcher.max_length = length - 1
        cut = batcher.train_batch([example])
        assert cut["input_ids"].shape[1] == length - 1 and (cut["labels"] != -100).sum() >= 1
        batcher.max_length = 3
        with pytest.raises(DataError, match=r"its prompt alone is .* over --max_length 3"):
            batcher.train_batch([example])


def test_llava_plain_format_is_vicuna_v1():
    recipe = get_recipe("llava")
    _, processor = recipe.load("tiny:llava")
    segments = recipe.render(
        [("user", "<image>\nWhat ?"), ("assistant", "Red")], processor, "plain", "Be brief."
    )
    assert [s.text for s in segments] == ["Be brief. USER: <image>\nWhat ? ASSISTANT:", " Red</s>"]
    assert [s.target for s in segments] == [False, True]


def test_qwen_plain_format_is_chatml_with_vision_tokens():
    recipe = get_recipe("qwen_vl")
    _, processor = recipe.load("tiny:qwen2_vl")
    segments = recipe.render(
        [("user", "<image>\nWhat ?"), ("assistant", "Red")], processor, "plain", None
    )
    assert segments[0].text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert segments[1].text == "Red<|im_end|>" and segments[1].target


def test_distill_compares_grids_without_the_stock_cls(data):
    """LLaVA with a CLIP tower under the "full" strategy: the stock projector sees the CLS
    (65 tokens on the tiny 8x8 grid), the FlexProjector drops it: matched at 64."""
    from flexproj.recipes.distill import distill_projector
    from flexproj.testing import tiny_vlm
    from flexproj.testing.datasets import VOCAB

    model, processor = tiny_vlm("llava", vision_feature_select_strategy="full", extra_words=VOCAB)
    flexproj.patch(model)
    result = distill_projector(model, processor, get_recipe("llava"), load_records(data)[:2],
                               steps=2, lr=1e-3, batch_size=2, log=lambda _m: None)  # fmt: skip
    assert result["tokens"] == 64 and len(result["history"]) == 2
    assert flexproj.is_patched(model)  # the patch is back on after the stock passes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_projector_recipe_trains_and_saves_the_stock_model(family, data, tmp_path):
    """--projector stock: the stock projector trains (outputs pooled to each step's budget),
    the model is saved in transformers format, and flexproj eval loads it in stock mode."""
    require_adapter(family)
    from flexproj.recipes.evaluate import load_run

    out = tmp_path / "stock"
    summary = run(family, args(family, data, out, "--stage", "align", "--projector", "stock"))
    assert summary["outputs"] == {"model": "model"} and summary["global_step"] == 2
    assert not (out / "flexproj.safetensors").exists()
    before, _ = get_recipe(family).load(f"tiny:{FAMILIES[family]}")
    loaded = load_run(out)
    assert flexproj.patch_info(loaded.model).mode == "stock"
    trained = dict(flexproj.get_projector(loaded.model).named_parameters())
    flexproj.patch(before, projector="stock")
    initial = dict(flexproj.get_projector(before).named_parameters())
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # the projector trained
    llm = get_recipe(family).language_model
    for (name, p), (_, q) in zip(
        llm(loaded.model).named_parameters(), llm(before).named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name  # align: the LLM is untouched
    # a later run starts from these weights (--weights), e.g. to convert the model
    run(family, args(family, data, tmp_path / "flex", "--weights", str(out / "model")))
    flex = load_run(tmp_path / "flex")  # recipe.json's weights: the trained stock model
    stock = {k.split(".stock.", 1)[1]: v for k, v in flex.model.state_dict().items()
             if ".stock." in k}  # fmt: skip
    assert set(stock) == set(trained)
    assert all(torch.equal(stock[k], trained[k]) for k in trained)
