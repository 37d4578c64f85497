"""DeepSpeed ZeRO-3 on two CPU processes, against DDP on the same two processes.

ZeRO-3 shards every parameter; transformers builds (and loads) the model inside
``deepspeed.zero.Init`` while the TrainingArguments' HfDeepSpeedConfig is alive. Each
case trains the same tiny LLaVA twice, with DDP and with ``recipes/zero3.json`` (the file
the docs give), and compares what ran: the loss and budget of every step, each rank's
budget log, and the saved weights, which under ZeRO-3 are gathered from the shards.
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
from flexproj.recipes.evaluate import load_run
from flexproj.recipes.family import get_recipe
from flexproj.testing import tiny_images
from flexproj.testing.datasets import make_samples, write_llava_dataset

ROOT = Path(__file__).resolve().parent.parent
ZERO3 = ROOT / "recipes" / "zero3.json"
SCHEDULE = "4:2,9:3,16:5"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_dataset(make_samples(8, seed=0), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny LLaVA saved in transformers format: ``--model DIR`` loads it with
    ``from_pretrained``, the path a real checkpoint takes (sharded as it loads)."""
    model, processor = get_recipe("llava").load("tiny:llava")
    out = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model, data, out, *extra):
    return [
        "--model", str(model), "--dtype", "float32", "--data", str(data),
        "--output_dir", str(out), "--schedule", SCHEDULE, "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def _two_processes(model, data, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "flexproj.recipes.llava", *_args(model, data, out, *extra)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "recipe.json").read_text())


def _steps(out):
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [(x["loss"], x["tokens"], x["vision_tokens"]) for x in lines if "loss" in x]


def _budget_log(out, rank):
    lines = [json.loads(x) for x in (out / f"budgets/rank{rank}.jsonl").read_text().splitlines()]
    return [(x["step"], x["tokens"], x["ids"]) for x in lines]


def _train_both(model, data, tmp_path, *extra):
    ddp, zero = tmp_path / "ddp", tmp_path / "zero3"
    ran = {
        "ddp": _two_processes(model, data, ddp, *extra),
        "zero3": _two_processes(model, data, zero, *extra, "--deepspeed", str(ZERO3)),
    }
    assert ran["ddp"]["distributed"] == "MULTI_CPU" and ran["zero3"]["distributed"] == "DEEPSPEED"
    assert ran["ddp"]["world_size"] == ran["zero3"]["world_size"] == 2
    assert ran["zero3"]["global_step"] == 3
    # the same budget, vision tokens and loss at every step, and the same samples per rank.
    # The losses agree to float rounding, not bit for bit: ZeRO-3 reduce-scatters the
    # gradients where DDP all-reduces them (another summation order) from the second
    # optimiser step on; a different initial projector moves them by ~1e-2.
    steps = {name: _steps(out) for name, out in (("ddp", ddp), ("zero3", zero))}
    assert len(steps["zero3"]) == 3
    assert [s[1:] for s in steps["zero3"]] == [s[1:] for s in steps["ddp"]]
    assert [s[0] for s in steps["zero3"]] == pytest.approx([s[0] for s in steps["ddp"]], rel=1e-5)
    for rank in (0, 1):
        assert _budget_log(zero, rank) == _budget_log(ddp, rank)
    return ddp, zero


def _generates(model, processor):
    with flexproj.tokens(4):
        inputs = processor(text=["<image> what color ?"], images=tiny_images([(64, 64)]),
                           return_tensors="pt")  # fmt: skip
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.slow
@pytest.mark.parametrize("source", ["checkpoint", "tiny"])
def test_zero3_trains_what_ddp_trains_and_saves_the_full_projector(
    source, checkpoint, data, tmp_path
):
    """The FlexProjector under ZeRO-3: a checkpoint loaded sharded (``zero.Init``) and a
    tiny model built in code (whole, sharded by the engine) train step for step like DDP;
    the saved projector, gathered from the shards, equals DDP's and loads onto a fresh
    model (a sharded save would hold empty tensors)."""
    model = checkpoint if source == "checkpoint" else "tiny:llava"
    ddp, zero = _train_both(model, data, tmp_path)
    saved = [load_file(out / "flexproj.safetensors") for out in (ddp, zero)]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert saved[1][key].shape == saved[0][key].shape and saved[0][key].numel() > 0
        torch.testing.assert_close(saved[1][key], saved[0][key], rtol=1e-4, atol=1e-6)
    loaded = load_run(zero)  # base model from recipe.json, projector from the run
    projector = dict(flexproj.get_projector(loaded.model).state_dict())
    assert all(torch.equal(projector[k], saved[1][k]) for k in saved[1])
    _generates(loaded.model, loaded.processor)


@pytest.mark.slow
def test_zero3_trains_the_stock_projector_like_ddp(checkpoint, data, tmp_path):
    """``--projector stock`` under ZeRO-3: the stock projector trains as under DDP and the
    saved full model (gathered) equals DDP's."""
    ddp, zero = _train_both(checkpoint, data, tmp_path, "--projector", "stock")
    models = [load_run(out).model for out in (ddp, zero)]
    weights = [dict(m.state_dict()) for m in models]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:  # to float rounding (see _train_both)
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-6)
    trained = dict(flexproj.get_projector(models[1]).named_parameters())
    before = load_file(checkpoint / "model.safetensors")
    stock = {k.removeprefix("model."): v for k, v in before.items() if "projector" in k}
    assert trained and any(  # it trained: some projector weight moved from the checkpoint's
        not torch.equal(p, stock[k]) for name, p in trained.items()
        for k in stock if k.endswith(name)
    )  # fmt: skip
    _generates(models[1], load_run(zero).processor)
