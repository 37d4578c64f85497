"""Fixtures of the vLLM tests (run by ``make test-vllm`` in ``.venv-vllm``, never by ``make test``).

The reference is always the patched transformers model the export was made from: greedy
ids of vLLM must equal its ``generate`` ids under the same budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from models import build

import flexproj

NEW_TOKENS = 8


class Exported(dict):
    """family -> ``(patched transformers model, processor, exported dir)``, built on first use."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> tuple[Any, Any, Path]:
        torch.manual_seed(0)
        self[family] = build(family, self.root)
        return self[family]


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(tmp_path_factory.mktemp("exported"))


def hf_greedy(model: Any, processor: Any, text: str, images: list, tokens: int) -> list[int]:
    """Greedy ids of the patched transformers model, ``NEW_TOKENS`` of them (EOS suppressed)."""
    with flexproj.tokens(tokens):
        inputs = processor(text=[text], images=images, return_tensors="pt")
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def engine_kwargs() -> dict[str, Any]:
    """Small CPU engines: eager, fp32 (the reference's dtype), a 128 MiB KV cache."""
    return {
        "enforce_eager": True,
        "dtype": "float32",
        "max_model_len": 512,
        "max_num_seqs": 8,
        "kv_cache_memory_bytes": 128 * 2**20,
        "limit_mm_per_prompt": {"image": 2},
    }


def start_engine(model_dir: Any) -> Any:
    """A vLLM engine on an exported model directory, with the tests' settings."""
    from vllm import LLM

    return LLM(model=str(model_dir), **engine_kwargs())


def stop_engine(engine: Any) -> None:
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def llm(exported: Exported, family: str) -> Any:
    """One engine per test module and family (each module parametrizes ``family``)."""
    engine = start_engine(exported[family][2])
    yield engine
    stop_engine(engine)


def greedy() -> Any:
    """Greedy sampling of exactly NEW_TOKENS tokens (what hf_greedy compares with)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


def request(prompt: str, images: list, tokens: int | None) -> dict:
    """One prompt with its images, and its budget in ``mm_processor_kwargs`` when given."""
    req: dict = {"prompt": prompt, "multi_modal_data": {"image": images}}
    if tokens is not None:
        req["mm_processor_kwargs"] = {"tokens": tokens}
    return req
