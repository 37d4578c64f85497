# make demo : set up .venv and run the main job (flexproj demo: the TokenFLEX table in miniature)
# make test : set up .venv, lint, type-check and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck install clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,xformers,triton]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flexproj info
	$(VENV)/bin/flexproj demo --out demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check flexproj adapters recipes tests examples
	$(VENV)/bin/ruff format --check flexproj adapters recipes tests examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy flexproj adapters recipes

test: lint typecheck
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
