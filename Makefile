# The two commands: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PyTorch build installed when the venv has none. On a machine without CUDA the CPU wheel is
# used; GPU users install their CUDA build into .venv first (README, "GPU install") and make
# keeps it.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test lint bench clean install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch already in $(VENV): keeping it"; \
	else \
	  echo "installing $(TORCH_SPEC) (CPU build unless you installed a CUDA build first)"; \
	  $(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/tomocast demo --out demo-out

test: lint
	$(VENV)/bin/python -m pytest -q

# ruff (style and format), the import layering (pyproject's [tool.importlinter]), mypy --strict
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check service workers models tests tools
	$(VENV)/bin/ruff format --check service workers models tests tools
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(VENV)/bin/tomocast bench recon

clean:
	rm -rf $(VENV) demo-out build *.egg-info
