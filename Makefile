# Two commands: `make run` (the main job on the embedded default; then `.venv/bin/fedrouter serve runs/<run>`
# serves its result) and `make test` (the whole suite);
# `make lint` checks the code (ruff) and the import layers (import-linter), as CI does before the tests.
# Both create .venv on first use. torch is installed first and pinned by a constraints file, so nothing
# later swaps it for a build with CUDA packages (on this project's machines: torch 2.13.0, CPU build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint install dev clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[serve]"
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,flower,serve]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

run: install
	$(VENV)/bin/fedrouter run $(ARGS)

test: dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The house rules: ruff's small rule set and the one-way import layers (pyproject.toml).
lint: dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
