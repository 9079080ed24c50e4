# Quick start: `make demo` (train the embedded default and write samples), `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || (echo "error: Python 3.11+ not found; set PYTHON=/path/to/python3.11" && exit 1)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/vdit train experiments/default.yaml

lint: setup
	$(BIN)/ruff check vdit tests tools

test: lint
	env $$($(BIN)/python -m vdit.host_allocator) $(BIN)/pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache *.egg-info
