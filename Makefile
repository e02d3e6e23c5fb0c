# The two commands a newcomer needs: `make run` (the whole stack, Ctrl-C stops it) and
# `make test` (the whole suite, starting everything it needs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run up down status test test-unit broker-test compose-test compose-base-image fault-report lint format bench bench-history install clean compose-env

run: install  ## Start the stack in the foreground; Ctrl-C stops everything
	$(BIN)/gateway stack run

up: install  ## Start the stack in the background; returns once /readyz answers 200
	$(BIN)/gateway stack up

down:  ## Stop what `make up` started
	@if [ -x $(BIN)/gateway ]; then $(BIN)/gateway stack down; fi

status: install
	$(BIN)/gateway stack status

#: The broker-facing tests (logins through the api, topic rights, Last Will, dead letters, the
#: size limit), run again on RabbitMQ 4 after the whole suite ran on the host's RabbitMQ 3.10.
BROKER_TESTS := tests/e2e/test_access.py tests/e2e/test_bad_input.py tests/e2e/test_dead_letters.py \
	tests/e2e/test_liveness.py tests/e2e/test_e2e.py \
	tests/e2e/test_security.py::test_the_broker_refuses_a_message_too_big_and_the_rest_flow

test: install  ## The whole suite (starts its own stack and dockerd), then the broker-facing part on RabbitMQ 4
	$(BIN)/gateway stack install --with-test-tools
	$(BIN)/pytest
	GATEWAY_TEST_BROKER=rabbitmq4 $(BIN)/pytest $(BROKER_TESTS)

broker-test: install  ## The broker-facing tests alone, on RabbitMQ 4 (in a container of the private dockerd)
	$(BIN)/gateway stack install --with-test-tools
	GATEWAY_TEST_BROKER=rabbitmq4 $(BIN)/pytest $(BROKER_TESTS) $(PYTEST_ARGS)

compose-test: install  ## docker-compose.yaml built and started for real on a private dockerd, and tested
	$(BIN)/gateway stack install --with-test-tools
	$(BIN)/pytest -m compose tests/e2e/test_compose_up.py $(PYTEST_ARGS)

compose-base-image:  ## A Debian trixie base image from Debian's mirror (no registry): BASE_IMAGE=gw-base:trixie
	docker/base-image.sh gw-base:trixie trixie

test-unit: install  ## Only the unit tests: no service needed
	$(BIN)/pytest tests/unit

fault-report: install  ## The last run's fault report into docs/results/faults.json and the table of docs/guarantees.md
	$(BIN)/python tests/fault_report.py

bench: install  ## Benchmarks on a stack of their own (loopback only); results in bench/results/
	$(BIN)/gateway stack install
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/auth_connect.py
	$(BIN)/python bench/commands.py

bench-history: install  ## Operator reads at 1 million and 50 million heartbeats (about 12 minutes, 15 GB)
	$(BIN)/gateway stack install
	$(BIN)/python bench/history.py

compose-env:  ## Write .env with random secrets for docker compose (never overwrites one)
	@test ! -e .env || { echo ".env exists: keep it, or remove it to make new secrets"; exit 1; }
	@umask 077 && $(PYTHON) -c 'import secrets; print("\n".join(f"GATEWAY_{name}={secrets.token_urlsafe(32)}" for name in ("OPERATOR_TOKEN", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "BROKER_ADMIN_PASSWORD", "BROKER_BRIDGE_PASSWORD", "BROKER_WORKER_PASSWORD", "BROKER_API_PASSWORD")))' > .env
	@echo "wrote .env (readable by you only); docker compose reads it"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q python3-venv; \
	  else echo "python3-venv is missing: sudo apt-get install -y python3-venv"; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

clean: down
	rm -rf $(VENV) .run .pytest_cache .ruff_cache .hypothesis
