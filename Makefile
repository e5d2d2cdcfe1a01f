# Every target builds what it needs: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?=

.PHONY: run test lint system dashboard unit e2e bench bench-compare refresh-data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/llmux run $(if $(CONFIG),--config $(CONFIG))

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint system
	$(BIN)/pytest -q

# System packages pip cannot install (Debian's prometheus, for the dashboard's e2e test).
system:
	bash scripts/setup-system.sh

# deploy/grafana/llmux.json and deploy/prometheus/llmux-rules.yml from deploy/dashboard.py.
dashboard: $(STAMP)
	$(BIN)/python -m deploy.dashboard

bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-compare: $(STAMP)
	$(BIN)/python -m bench.run --compare-litellm

refresh-data: $(STAMP)
	$(BIN)/python scripts/refresh_data.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
