# Two commands a new user needs: `make demo` and `make test`. Both install into .venv once;
# the stamp file makes a second run skip the install unless pyproject.toml changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.truthgpt-installed

.PHONY: demo test bench lint install check-install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# pyproject.toml declares the ranges users need; constraints.txt pins the exact releases
# installed here and in CI (torch 2.13.0: pip takes the CPU wheel from local disk). torch is
# installed first so that the native attention kernel (setup.py) builds against it without
# a second copy in an isolated build environment. With a C++ compiler present the kernel must
# build (TRUTHGPT_REQUIRE_NATIVE=1, checked again by the tests); without one the install goes
# on and attention falls back to the compiled or eager kernels.
# --no-compile, then compileall on every core: pip byte-compiles file by file, a third of the
# install. (Compiled they must be: with PYTHONDONTWRITEBYTECODE set, as in some CI images,
# every process would otherwise compile torch again, 1.3 s per import. compileall's status
# is ignored: some packages ship files that are not meant to compile, which pip skips too.)
PIP_PINNED = $(BIN)/pip install --quiet --no-compile -c constraints.txt
NATIVE_SRC := $(wildcard src/truthgpt/nn/attention/csrc/*.cpp src/truthgpt/nn/attention/csrc/*.h) src/truthgpt/core/kernel_codes.py
export TRUTHGPT_REQUIRE_NATIVE := $(shell command -v c++ >/dev/null 2>&1 && echo 1 || echo 0)

# The kernel compiles (two jobs) while a second pip installs the other dependencies (mostly
# unpacking, on one core): the build needs nothing but torch.
DEPENDENCIES = $(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))\
	['project']; print(*p['dependencies'], *p['optional-dependencies']['dev'], \
	*p['optional-dependencies']['hf'], sep=chr(10))"

$(STAMP): pyproject.toml constraints.txt setup.py $(NATIVE_SRC) | $(BIN)/python
	$(PIP_PINNED) torch==2.13.0 "setuptools>=68" wheel
	$(DEPENDENCIES) > $(VENV)/dependencies.txt
	$(PIP_PINNED) -r $(VENV)/dependencies.txt & deps=$$!; \
	$(PIP_PINNED) --no-build-isolation --no-deps -e . || { kill $$deps; exit 1; }; wait $$deps
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# A wheel installed with plain `pip install` into a fresh venv runs every command
# (scripts/check_install.sh; a few minutes).
check-install: $(STAMP)
	PYTHON=$(PYTHON) BUILD_PYTHON=$(BIN)/python scripts/check_install.sh

demo: $(STAMP)
	$(BIN)/truthgpt demo

# pytest-xdist: one worker per core (tests/conftest.py keeps those sharing an expensive
# fixture in one worker); the tests timed against a budget (marked serial) run alone after.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n auto -m "not serial"
	$(BIN)/python -m pytest -q -m serial

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/truthgpt/nn/attention/_native*.so
