# Every install step lives here: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NODE   := $(shell command -v node 2>/dev/null)

.PHONY: help demo test test-types test-python test-agent-py39 test-node bench agent-bundle clean

help:
	@echo "make demo   set up .venv if needed, then roll a handler out to local agents"
	@echo "make test   set up .venv if needed, then run every test (Python, and Node.js if present)"
	@echo "make bench  run the benchmarks in bench/ (prints figures, takes a few minutes)"
	@echo "make agent-bundle  build dist/pi-agent-VERSION.pyz and dist/pi-agent_VERSION_all.deb"
	@echo "make clean  remove .venv and caches"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fleet demo

# The agent's oldest target (Raspberry Pi OS Bullseye): python3.9 on PATH, or one that pyenv holds.
# The first candidate that actually runs (an inactive pyenv shim does not).
PY39   := $(shell for py in $$(ls $$(pyenv root 2>/dev/null)/versions/3.9*/bin/python3.9 2>/dev/null) $$(command -v python3.9); do \
            $$py -c pass 2>/dev/null && echo $$py && break; done)

test: test-types test-python test-agent-py39 test-node

test-types: $(STAMP)
	$(BIN)/python -m mypy agent fleet

MOSQUITTO := $(shell command -v mosquitto 2>/dev/null || ls /usr/sbin/mosquitto 2>/dev/null)

test-python: $(STAMP)
ifeq ($(MOSQUITTO),)
	@echo "mosquitto not found: skipping the tests through a real MQTT broker (apt-get install mosquitto)"
endif
	$(BIN)/python -m pytest -q

test-agent-py39:
ifeq ($(PY39),)
	@echo "python3.9 not found: skipping the check that the agent compiles and imports on Python 3.9"
else
	$(PY39) -m compileall -q agent && $(PY39) -c "import agent.app, agent.cli, agent.checks, agent.contract, agent.tls, agent.tls_transport, agent.signatures, agent.broker_link, agent.desired" && echo "agent: compiles and imports on $$($(PY39) --version)"
endif

test-node: $(STAMP)
ifeq ($(NODE),)
	@echo "node not found: skipping the Node.js client tests (install Node.js 18+ to run them)"
else
	@if [ -d clients/node/test ]; then PIFLEET_PYTHON=$(abspath $(BIN)/python) $(NODE) --test clients/node/test/; \
	else echo "no Node.js tests yet"; fi
endif

# The agent for Pis without internet: dist/pi-agent-VERSION.pyz and dist/pi-agent_VERSION_all.deb
agent-bundle: $(STAMP)
	$(BIN)/python -m fleet agent bundle --out dist

bench: $(STAMP)
	$(BIN)/python bench/agent_throughput.py
	$(BIN)/python bench/deploy_latency.py
	$(BIN)/python bench/hostile_lan.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/converge.py
	$(BIN)/python bench/broker_scale.py

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
