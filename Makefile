# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-slow test-all lint install lock clean chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# requirements.lock pins every package (pip-compile of pyproject.toml with all extras: dev, tracking); torch and torchvision
# come from wherever pip is configured to find them (here: the machine's own wheels).
$(STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# Re-pin after changing pyproject.toml's dependencies: pip-tools in a throwaway venv (about 3 minutes).
lock:
	rm -rf /tmp/raylearn-lock && $(PY) -m venv /tmp/raylearn-lock && /tmp/raylearn-lock/bin/pip install -q pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" /tmp/raylearn-lock/bin/pip-compile --quiet --all-extras --strip-extras \
		--no-emit-index-url --no-emit-find-links --allow-unsafe -o requirements.lock pyproject.toml
	rm -rf /tmp/raylearn-lock

demo: $(STAMP)
	$(BIN)/raylearn demo --out runs/demo

# headless Chromium for the status page's browser test (tests/annotation/test_status_page.py): Debian's package,
# installed quietly only when missing (needs root, as in CI)
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# A test that hangs stops the run after 15 min with every thread's traceback instead of stalling CI: the timer runs
# in a thread, because a test blocked in ray.get (C++) never sees SIGALRM or Ctrl-C (seen with the nnU-Net rounds).
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q --timeout=900 --timeout-method=thread

# `slow`: job submit, nnU-Net rounds, Tune kill-and-resume, actor/worker/driver kills, multi-node node loss, async
# annotation; `gpu` tests need a GPU.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m 'slow and not gpu' --timeout=900 --timeout-method=thread --durations=15

# what CI runs (.ci/run): the default selection (`make test`, the README's test command), then the slow one
test-all: test test-slow

lint: $(STAMP)
	$(BIN)/ruff check raylearn tests benchmarks

clean:
	rm -rf $(VENV) runs
