# The README's two commands, each setting itself up from a fresh clone:
#   make demo    start throw-away servers and walk through hcrepo
#   make test    lint, type-check, check the import layers and run the whole suite against
#                real servers
# `make bench` runs the benchmarks the same way.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install: pip runs again only when the packaging files change.
INSTALLED := $(VENV)/.installed

.DEFAULT_GOAL := test
.PHONY: demo test bench setup system-deps

demo: setup
	$(BIN)/hcrepo demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy --strict hcrepo
	$(BIN)/lint-imports
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m benchmarks

setup: $(INSTALLED) system-deps

system-deps:
	@scripts/ensure-system-deps.sh

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "hcrepo needs Python 3.11 or newer: set PYTHON=/path/to/python3.11 (found: $$($(PYTHON) --version 2>&1 | head -n1))" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml $(wildcard setup.py) | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	@touch $@
