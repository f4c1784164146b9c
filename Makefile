# memlayers: `make test` and `make demo` work on a machine with only Python 3.
# The virtual environment is created (or reused) in $(VENV); on a machine
# without an NVIDIA GPU torch is installed as its CPU build (no CUDA wheels).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# known-good versions of every dependency (empty: the newest releases pyproject.toml allows)
CONSTRAINTS ?= constraints.txt

BIN := $(VENV)/bin
STAMP := $(VENV)/.memlayers-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install test test-fast test-latest constraints demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
	  if [ "$(HAS_GPU)" = "1" ]; then \
	    $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	  else \
	    $(BIN)/pip install "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX) --retries 1; \
	  fi; \
	fi
	$(BIN)/pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow and not multiprocess" $(PYTEST_ARGS)

# the newest releases of every dependency, in their own environment: what a user installing today gets
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# re-pin constraints.txt from the newest releases, after `make test-latest` passed
constraints:
	@head -3 constraints.txt > constraints.new
	.venv-latest/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|memlayers|ruff)==' >> constraints.new
	mv constraints.new constraints.txt

demo: $(STAMP)
	$(BIN)/memlayers demo

lint: $(STAMP)
	$(BIN)/pip install ruff >/dev/null && $(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) .venv-latest build dist src/*.egg-info .pytest_cache
