# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint services fault-results check-deploy ha-drill

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev,plot,bench]'
	touch $@

install: $(BIN)/.installed

services:
	bash deploy/local/ensure-services.sh

demo: install services
	$(BIN)/execution-worker demo

test: install services
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy worker schemas
	$(BIN)/lint-imports

# Publish the fault suite's latest results table (written by `make test` to test-results/).
fault-results:
	@test -f test-results/faults.md || { echo "no test-results/faults.md: run make test first"; exit 1; }
	cp test-results/faults.md tests/faults/RESULTS.md

# The deployment files built and run on local images (deploy/check-deploy.sh), and the HA
# drill on the compose HA profile: a RabbitMQ node, then the PostgreSQL primary, stopped
# under traffic (deploy/check-ha.sh). Both need root or the docker group.
check-deploy: install
	bash deploy/check-deploy.sh

ha-drill: install
	bash deploy/check-ha.sh
