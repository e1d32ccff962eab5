# Two commands on a fresh machine with Python 3.11+ and make: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help run test lint typecheck contracts pytest bench mosquitto clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "meshchat needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable '.[dev]'
	@touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed ## start the whole stack (embedded broker) with `meshchat up`
	$(BIN)/meshchat up $(ARGS)

# Mosquitto is the external broker of the tests and the benchmark's reference.
mosquitto: ## install Mosquitto from Debian's packages when it is missing
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Mosquitto from Debian's packages"; \
		sh deploy/install-mosquitto.sh; \
	else \
		echo "Mosquitto is missing; the tests that need it will be skipped. Install it with:"; \
		echo "  sudo apt-get update && sudo apt-get install -y mosquitto mosquitto-clients"; \
	fi

lint: $(VENV)/.dev-installed ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev-installed ## mypy --strict on meshchat, cli and tests
	$(BIN)/mypy

contracts: $(VENV)/.dev-installed ## the import-linter contracts of DESIGN.md section 2
	$(BIN)/lint-imports

pytest: $(VENV)/.dev-installed mosquitto ## the test suite, one worker per core (a module stays on one)
	$(BIN)/pytest -n auto --dist loadfile

test: lint typecheck contracts pytest ## everything CI runs: lint, types, contracts, tests

bench: $(VENV)/.dev-installed mosquitto ## benchmarks: E2EE budgets, the broker beside raw amqtt, auth+ACL and Mosquitto, archiver ingest, end-to-end clients, geofence fixes/s, device telemetry bytes and fixes/s, client session saves, catch-up over 64 kbit/s
	$(BIN)/python benchmarks/e2ee_bench.py $(ARGS)
	$(BIN)/python benchmarks/broker_bench.py $(ARGS)
	$(BIN)/python benchmarks/archive_bench.py $(ARGS)
	$(BIN)/python benchmarks/client_bench.py $(ARGS)
	$(BIN)/python benchmarks/geofence_bench.py $(ARGS)
	$(BIN)/python benchmarks/device_bench.py $(ARGS)
	$(BIN)/python benchmarks/session_bench.py $(ARGS)
	$(BIN)/python benchmarks/catchup_bench.py $(ARGS)

clean: ## remove the virtualenv and caches (not your data)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
