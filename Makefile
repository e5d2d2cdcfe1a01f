# Every target builds what it needs: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?=

.PHONY: run test lint system dashboard image image-sizes unit e2e bench bench-compare refresh-data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python scripts/fix_otel_proto.py  # xds-protos overwrites opentelemetry-proto's files
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/llmux run $(if $(CONFIG),--config $(CONFIG))

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Debian packages the tests need (prometheus, podman, buildah, runc, debootstrap): installed by the
# project, quick when present.
system:
	sh scripts/setup-system.sh

test: lint system
	$(BIN)/pytest -q

# ghcr.io/llmux/llmux and ghcr.io/llmux/llmux-extproc, tagged with the package version
# (deploy/Containerfile; the first build on a machine debootstraps its base, ~3 min).
image: $(STAMP) system
	$(BIN)/python -m scripts.image build

image-sizes: $(STAMP)
	$(BIN)/python -m scripts.image sizes

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
