# buildq — everything a developer or CI needs, from a machine with Python 3.11 and make.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
WORKERS ?= 2
ENV_FILE ?= dev.env
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)

.PHONY: help install run test lint fmt clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) uv.lock pyproject.toml shared/pyproject.toml services/api/pyproject.toml services/worker/pyproject.toml ops/pyproject.toml client/pyproject.toml
	$(UV) sync --locked --all-packages --all-extras
	@touch $@

install: $(VENV)/.installed ## Create .venv from the lock file

run: install ## Start the emulator, the API and $(WORKERS) workers (settings in $(ENV_FILE); Ctrl-C stops all)
	@set -a && source $(ENV_FILE) && echo "buildq: API http://$$BUILDQ_API_HOST:$$BUILDQ_API_PORT (docs: /docs)," \
		"AWS emulator $$AWS_ENDPOINT_URL, $(WORKERS) workers." \
		"API keys: dev (tenant demo), dev2 (tenant other). Ctrl-C stops everything."
	@PATH="$(CURDIR)/$(BIN):$$PATH" exec $(BIN)/honcho --env $(ENV_FILE) --procfile Procfile start --concurrency worker=$(WORKERS)

lint: install ## ruff + mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared/src services/api/src services/worker/src ops/src client/src tests

fmt: install ## Format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint ## Lint, then the whole test suite (starts its own emulator, API and workers)
	$(BIN)/pytest

clean: ## Remove the virtualenvs and caches
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
