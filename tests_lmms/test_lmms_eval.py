"""The ``flexproj`` model of lmms-eval, driven through lmms-eval's own command line
(``make test-lmms``: its own virtualenv, ``.venv-lmms``; offline, a local task).

A tiny LLaVA converted by ``flexproj train`` (the demo's conversion recipe in miniature) is
scored by ``flexproj eval`` and, on a task written over the same questions, by lmms-eval
through ``python -m flexproj.integrations.lmms_eval sweep`` (one lmms-eval run per budget):
the answers must be the same, question by question.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexproj
from flexproj.recipes.config import parse_args
from flexproj.recipes.evaluate import evaluate
from flexproj.recipes.family import get_recipe
from flexproj.recipes.trainer import train
from flexproj.testing.datasets import make_samples, write_llava_dataset

lmms_eval = pytest.importorskip("lmms_eval", reason="make test-lmms installs lmms-eval")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny LLaVA with a trained FlexProjector (budgets 4 and 9 on its 8x8 grid) and
    five held-out questions."""
    root = tmp_path_factory.mktemp("lmms")
    train_data = write_llava_dataset(make_samples(8, seed=0), root / "train")
    config, args = parse_args(
        ["--model", "tiny:llava", "--data", str(train_data), "--output_dir", str(root / "run"),
         "--schedule", "4:1,9:1", "--max_steps", "3", "--per_device_train_batch_size", "2",
         "--save_strategy", "no", "--disable_tqdm", "true"],
        get_recipe("llava").stage_defaults,
    )  # fmt: skip
    train("llava", config, args, log=lambda _msg: None)
    questions = write_llava_dataset(make_samples(5, seed=7), root / "questions")
    return root, root / "run", questions


def test_flexproj_model_is_registered_by_entry_point():
    from lmms_eval.models import get_model

    from flexproj.integrations.lmms_eval import FlexprojLMM

    assert get_model("flexproj") is FlexprojLMM


def _lmms(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(cwd / "hf"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "flexproj.integrations.lmms_eval", *args]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _samples(out, questions):
    """{record id: (answer, exact match)} from lmms-eval's logged samples (``doc_id`` is
    the record's position in the task file, which keeps the data file's order)."""
    ids = [r["id"] for r in json.loads(Path(questions).read_text())]
    (path,) = Path(out).rglob("*samples_flexproj_vqa.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {ids[r["doc_id"]]: (r["filtered_resps"].strip(), r["exact_match"]) for r in rows}


def _score(out):
    (path,) = Path(out).rglob("*_results.json")
    return json.loads(path.read_text())["results"]["flexproj_vqa"]["exact_match,none"]


def test_lmms_eval_scores_what_flexproj_eval_scores(converted):
    root, run, questions = converted
    report = evaluate([run], questions, [4, 9], output_dir=root / "eval", batch_size=8,
                      max_new_tokens=16, prefill_repeats=1, progress=False, log=lambda _m: None)  # fmt: skip
    reference = {r["tokens"]: r for r in report["runs"][0]["results"]}
    assert all(len(r["examples"]) == 5 for r in reference.values())  # every answer is listed

    _lmms("task", "--data", str(questions), "--out", str(root / "task"), cwd=root)
    tokens_log = root / "auto_tokens.json"
    done = _lmms(
        "sweep", "--tokens", "4", "auto", "--",
        "--model", "flexproj",
        "--model_args", f"pretrained=tiny:llava,projector={run},device=cpu,ladder=4/9,"
        f"threshold=1.0,tokens_log={tokens_log}",
        "--tasks", "flexproj_vqa", "--include_path", str(root / "task"),
        "--batch_size", "8", "--output_path", str(root / "out"), "--log_samples",
        cwd=root,
    )  # fmt: skip
    assert "== tokens=4:" in done.stdout and "== tokens=auto:" in done.stdout

    # tokens=4: the same answer to every question as flexproj eval at N=4, the same score
    fixed = _samples(root / "out" / "tokens_4", questions)
    expected = {e["id"]: e["generated"] for e in reference[4]["examples"]}
    assert {k: v[0] for k, v in fixed.items()} == expected
    assert _score(root / "out" / "tokens_4") == pytest.approx(reference[4]["accuracy"])
    hits = {s["id"]: int(s["hit"]) for s in reference[4]["per_sample"]}
    assert {k: v[1] for k, v in fixed.items()} == hits

    # tokens=auto at threshold 1.0: no answer is that sure, so every question climbs the
    # whole ladder: answered at 9 (flexproj eval's N=9 answers), 4 + 9 tokens spent
    auto = _samples(root / "out" / "tokens_auto", questions)
    assert {k: v[0] for k, v in auto.items()} == {
        e["id"]: e["generated"] for e in reference[9]["examples"]
    }
    spent = json.loads(tokens_log.read_text())
    assert spent["requests"] == 5 and spent["answered_at"] == {"9": 5}
    assert spent["tokens_spent_per_image"] == 13 and spent["tokens_answered_per_image"] == 9
    assert "flexproj tokens=auto: 5 requests, 13.0 vision tokens per image spent" in done.stderr


def test_task_refuses_multi_turn_records(converted, tmp_path):
    _root, _run, questions = converted
    records = json.loads(Path(questions).read_text())
    records[0]["conversations"] += [
        {"from": "human", "value": "and now ?"}, {"from": "gpt", "value": "red"}
    ]  # fmt: skip
    data = Path(questions).parent / "multi.json"
    data.write_text(json.dumps(records))
    command = [sys.executable, "-m", "flexproj.integrations.lmms_eval", "task",
               "--data", str(data), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: record") and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tokens": "1000"}, "tokens 1000"),  # more than the tiny 8x8 grid holds
        ({"tokens": "auto", "ladder": "4/1000"}, "tokens 1000"),
        ({"tokens": "few"}, "tokens='few'"),
        ({"tokens": "4", "temperature": "0.7"}, "unknown --model_args ['temperature']"),
    ],
)
def test_bad_model_args_are_refused_when_the_model_loads(converted, extra, message):
    from flexproj.integrations.lmms_eval import FlexprojLMM, LmmsEvalError

    _root, run, _questions = converted
    with pytest.raises(LmmsEvalError, match=re.escape(message)):
        FlexprojLMM(pretrained="tiny:llava", projector=str(run), device="cpu", **extra)


def test_loglikelihood_scores_the_greedy_answer_as_generate_does(converted, tmp_path):
    """``loglikelihood`` (teacher-forced, one forward) against the scores ``generate``
    gave its own greedy tokens (step by step, with a KV cache): the same log-probability,
    flagged greedy; another continuation is not greedy."""
    from lmms_eval.api.instance import Instance

    from flexproj.integrations.lmms_eval import FlexprojLMM, doc_to_visual, write_task

    _root, run, questions = converted
    docs = [json.loads(x) for x in write_task(questions, tmp_path).with_suffix(".jsonl").read_text().splitlines()]  # fmt: skip
    lm = FlexprojLMM(pretrained="tiny:llava", projector=str(run), tokens="4", device="cpu")
    lm.task_dict = {"t": {"test": docs}}

    def request(kind, second, i):
        meta = {"task": "t", "doc_id": i, "repeats": 1}
        return Instance(kind, (docs[i]["question"], second, doc_to_visual, i, "t", "test"), 0, meta)

    for i in range(2):
        example = lm._example(docs[i]["question"], doc_to_visual(docs[i]))
        with flexproj.tokens(4), torch.no_grad():
            prompts, _ = lm.batcher.generation_batch([example])
            out = lm.run.model.generate(**prompts, max_new_tokens=3, do_sample=False,
                                        output_scores=True, return_dict_in_generate=True)  # fmt: skip
        new = out.sequences[0, prompts["input_ids"].shape[1] :]
        assert not set(new.tolist()) & set(lm.stop)  # three answer tokens, no end of turn
        reference = sum(
            float(torch.log_softmax(s[0].float(), -1)[t])
            for s, t in zip(out.scores, new, strict=True)
        )
        answer = lm.generate_until([request("generate_until", {"max_new_tokens": 3}, i)])[0]
        assert (
            lm.run.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
            == new.tolist()
        )
        (logp, greedy), (other_logp, other_greedy) = lm.loglikelihood(
            [request("loglikelihood", answer, i),
             request("loglikelihood", "purple " + answer, i)]
        )  # fmt: skip
        assert greedy and logp == pytest.approx(reference, abs=1e-4)
        assert not other_greedy and other_logp < 0
