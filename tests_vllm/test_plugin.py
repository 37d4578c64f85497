"""The plug-in's start-up: registration on the pinned vLLM, one line and nothing registered
on any other version (so ``vllm serve`` stops at start, not inside a request)."""

from __future__ import annotations

import logging

import pytest
import vllm
from vllm import ModelRegistry

from flexproj.serving import vllm_plugin
from flexproj.serving.families import FAMILIES


def test_the_pinned_version_is_the_installed_one() -> None:
    assert vllm.__version__ == vllm_plugin.VLLM_VERSION  # constraints-vllm.txt


def test_every_family_is_registered_on_the_pinned_version() -> None:
    vllm_plugin.register()
    supported = set(ModelRegistry.get_supported_archs())
    assert {f.architecture for f in FAMILIES.values()} <= supported


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "0.32.1"])
def test_another_version_is_one_line_and_registers_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, version: str
) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.setattr(ModelRegistry, "register_model", lambda *a: calls.append(a))
    monkeypatch.setattr(ModelRegistry, "get_supported_archs", lambda: [])
    monkeypatch.delenv(vllm_plugin.ANY_VERSION_ENV, raising=False)
    with caplog.at_level(logging.ERROR, logger="flexproj.serving"):
        vllm_plugin.register()
    assert calls == []
    (record,) = caplog.records
    assert "\n" not in record.getMessage()
    assert "vLLM 0.32.0 exactly" in record.getMessage() and version in record.getMessage()
    monkeypatch.setenv(vllm_plugin.ANY_VERSION_ENV, "1")  # the escape hatch registers all
    vllm_plugin.register()
    assert len(calls) == len(FAMILIES)


def test_a_cpu_build_suffix_is_the_same_release() -> None:
    assert vllm_plugin.version_problem("0.32.0+cpu") is None
    assert vllm_plugin.version_problem("0.32.0") is None
