# Every install step lives here: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NODE   := $(shell command -v node 2>/dev/null)

.PHONY: help demo test test-python test-node bench clean

help:
	@echo "make demo   set up .venv if needed, then roll a handler out to local agents"
	@echo "make test   set up .venv if needed, then run every test (Python, and Node.js if present)"
	@echo "make bench  run the benchmarks in bench/ (prints figures, takes a few minutes)"
	@echo "make clean  remove .venv and caches"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fleet demo

test: test-python test-node

test-python: $(STAMP)
	$(BIN)/python -m pytest -q

test-node: $(STAMP)
ifeq ($(NODE),)
	@echo "node not found: skipping the Node.js client tests (install Node.js 18+ to run them)"
else
	@if [ -d clients/node/test ]; then PIFLEET_PYTHON=$(abspath $(BIN)/python) $(NODE) --test clients/node/test/; \
	else echo "no Node.js tests yet"; fi
endif

bench: $(STAMP)
	$(BIN)/python bench/agent_throughput.py
	$(BIN)/python bench/deploy_latency.py
	$(BIN)/python bench/hostile_lan.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
