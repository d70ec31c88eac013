# sms-gateway developer commands. `make run` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run sandbox test lint typecheck unit integration bench chaos lock contract docs clean

# Dependencies come from the hashed lock file (make lock writes it from pyproject.toml); the project
# itself is installed on top, without resolving anything again.
$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## The gateway on the embedded default: built-in sandbox provider, SQLite state file, local RabbitMQ.
run: $(STAMP)
	$(BIN)/gateway run --sandbox

sandbox: $(STAMP)
	$(BIN)/gateway sandbox

lint: $(STAMP)
	$(BIN)/ruff check gateway testkit tests bench
	$(BIN)/ruff format --check gateway testkit tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not integration and not e2e"

integration: $(STAMP)
	$(BIN)/pytest -m "integration or e2e"

## Lint, types and every test ring (unit, integration against real RabbitMQ/Redis, end-to-end processes).
test: lint typecheck
	$(BIN)/pytest

## Throughput, CPU, memory and latency against the broker's ceiling and Celery (about 10 minutes).
bench: $(STAMP)
	$(BIN)/python -m bench.run

## Every chaos scenario at full size (20,000 messages under kill -9, a 3-node cluster, ...), with the
## suite's own RabbitMQ nodes and Redis; prints the ledger table (about 15 minutes).
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --size full

## Re-pin every dependency, with hashes: requirements.lock (the image) and requirements-dev.lock (make install).
## contract/: the JSON Schemas and the AsyncAPI document, regenerated from the code (a test fails
## while the committed files differ).
contract: $(STAMP)
	$(BIN)/python -m gateway.ops.schema contract

## The configuration reference (docs/configuration.md) from the settings' descriptions.
docs: $(STAMP)
	$(BIN)/python -m gateway.ops.settings_doc docs/configuration.md

lock: $(STAMP)
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links -o requirements.lock pyproject.toml
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links --extra dev --extra bench -o requirements-dev.lock pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache gateway-state.sqlite3*
