# buildq — everything a developer or CI needs, from a machine with Python 3.11 and make.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
INFRA_TOOLS := $(TOOLS)/infra
INFRA_LOCK := infra/requirements-check.txt
VENV := .venv
BIN := $(VENV)/bin
WORKERS ?= 2
ENV_FILE ?= dev.env
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)
# Bytecode compiled at install, as in the images: where PYTHONDONTWRITEBYTECODE is set
# nothing is ever cached, and every process (API, worker, emulator, each test's) would
# compile every module it imports at each start, slower and with a higher memory peak.
export UV_COMPILE_BYTECODE := 1

.PHONY: help install run test lint fmt clean infra-check infra-fmt infra-lock

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

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

test: lint infra-check ## Lint, check infra/, then the whole test suite (starts its own emulator, API and workers)
	$(BIN)/pytest

# checkov and terraform live in their own venv, from a hashed lock, never in uv.lock.
$(INFRA_TOOLS)/.installed: $(UV) $(INFRA_LOCK)
	rm -rf $(INFRA_TOOLS)
	$(UV) venv --quiet --python $(PYTHON) $(INFRA_TOOLS)
	$(UV) pip sync --quiet --require-hashes --python $(INFRA_TOOLS)/bin/python $(INFRA_LOCK)
	@touch $@

infra-check: $(INFRA_TOOLS)/.installed ## terraform fmt -check, checkov on infra/terraform and the Dockerfiles (offline)
	$(INFRA_TOOLS)/bin/python infra/check.py

infra-fmt: $(INFRA_TOOLS)/.installed ## Format infra/terraform
	$(INFRA_TOOLS)/bin/terraform fmt -recursive infra/terraform

infra-lock: $(UV) ## Re-pin the infra tools (infra/requirements-check.in -> .txt, with hashes)
	$(UV) pip compile --quiet --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make infra-lock" infra/requirements-check.in -o $(INFRA_LOCK)

clean: ## Remove the virtualenvs and caches
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Benchmarks (issue 7), never part of `make test`. The driver, the plots and the Celery peer
# run from .tools/bench (hashed bench/requirements.txt, never uv.lock); the benchmarked
# emulator, API and workers run from .venv. Logs and --quick reports: .tools/bench-runs/.
BENCH_TOOLS := $(TOOLS)/bench
BENCH_LOCK := bench/requirements.txt

$(BENCH_TOOLS)/.installed: $(UV) $(BENCH_LOCK)
	rm -rf $(BENCH_TOOLS)
	$(UV) venv --quiet --python $(PYTHON) $(BENCH_TOOLS)
	$(UV) pip sync --quiet --require-hashes --python $(BENCH_TOOLS)/bin/python $(BENCH_LOCK)
	@touch $@

.PHONY: bench
bench: install $(BENCH_TOOLS)/.installed ## Speed vs floors and Celery -> docs/benchmarks.md (ARGS=--quick: smoke test)
	$(BENCH_TOOLS)/bin/python -m bench.run $(ARGS)
