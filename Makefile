# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-all lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raylearn demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# default + `slow` (job submit, nnU-Net rounds, Tune kill-and-resume, actor kills); `gpu` tests need a GPU.
# A test that hangs fails after 15 min with its traceback instead of stalling CI.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not gpu' --timeout=900 --durations=15

lint: $(STAMP)
	$(BIN)/ruff check raylearn tests benchmarks

clean:
	rm -rf $(VENV) runs
