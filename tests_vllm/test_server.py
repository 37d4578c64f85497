"""The served journey, as a user runs it (docs/SERVING.md): a tiny LLaVA with heads of 32
saved with its processor and a FlexProjector (``flexproj.save_pretrained``) ->
``flexproj export`` (the CLI) -> the ``vllm serve`` command export printed, run as printed
(plus host, port and a small KV cache) -> OpenAI chat requests at two budgets.

Each answer equals the patched transformers model's greedy ids; a bad budget gets an
HTTP 400 naming the problem while the server keeps answering. The test starts the server
and shuts it down.
"""

from __future__ import annotations

import base64
import io
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import NEW_TOKENS, hf_greedy
from models import FAMILIES

import flexproj
from flexproj.testing import tiny_images, tiny_vlm

QUESTION = "what color is the circle ?"
IMAGE = tiny_images([(96, 64)], seed=3)[0]
STARTUP_S = 600  # engine start is 25-45 s alone; slower while other jobs share the 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list[str]]:
    """``(patched model, processor, the serve command flexproj export printed)``."""
    root = tmp_path_factory.mktemp("journey")
    name, overrides, _ = FAMILIES["llava"]
    torch.manual_seed(0)
    model, processor = tiny_vlm(name, **overrides)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    flexproj.patch(model, processor, tokens=16)
    flexproj.save_pretrained(model, root / "projector")
    flexproj_cli = str(Path(sys.executable).parent / "flexproj")
    printed = subprocess.run(
        [flexproj_cli, "export", str(root / "base"), str(root / "projector"), str(root / "out")],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    (command,) = [line.strip() for line in printed if line.strip().startswith("vllm serve ")]
    return model, processor, shlex.split(command)


@pytest.fixture(scope="module")
def server(
    journey: tuple[Any, Any, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    printed = journey[2]
    assert printed[3:] == [
        "--trust-request-mm-kwargs", "--dtype", "float32", "--gpu-memory-utilization", "0.2"
    ]  # fmt: skip
    command = [
        str(Path(sys.executable).parent / "vllm"), *printed[1:],
        "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "512",
        "--kv-cache-memory-bytes", str(128 * 2**20),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"vllm serve did not come up; its log:\n{log.read_text()[-4000:]}"
                )
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _data_url() -> str:
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="PNG")  # lossless: the server decodes the same pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(url: str, extra: dict[str, Any]) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    content = [
        {"type": "image_url", "image_url": {"url": _data_url()}},
        {"type": "text", "text": QUESTION},
    ]
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        temperature=0,
        max_tokens=NEW_TOKENS,
        extra_body={"min_tokens": NEW_TOKENS, "return_token_ids": True, **extra},
    )


def _reference(journey: tuple, tokens: int) -> list[int]:
    model, processor, _ = journey
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return hf_greedy(model, processor, prompt, [IMAGE], tokens)


@pytest.mark.parametrize("tokens", [4, 36])
def test_chat_with_budget_equals_transformers(server: str, journey: tuple, tokens: int) -> None:
    response = _chat(server, {"mm_processor_kwargs": {"tokens": tokens}})
    choice = response.choices[0]
    image_token = journey[0].config.image_token_index
    assert response.prompt_token_ids.count(image_token) == tokens  # placeholders in the prompt
    assert choice.token_ids == _reference(journey, tokens)


def test_bad_budget_is_a_400_and_the_server_serves_on(server: str, journey: tuple) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="exceeds this model's native 64"):
        _chat(server, {"mm_processor_kwargs": {"tokens": 65}})
    response = _chat(server, {"mm_processor_kwargs": {"tokens": 9}})
    assert response.choices[0].token_ids == _reference(journey, 9)
