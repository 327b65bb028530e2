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

.PHONY: help install run test lint fmt clean infra-check infra-fmt infra-lock \
	test-localstack localstack-lock

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

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

# LocalStack, the second SQS implementation (tests/localstack/server.py): its own Python
# 3.13 venv from a hashed lock, never uv.lock. LOCALSTACK_PYTHON: the first Python 3.13
# that runs, python3.13 on PATH (a pyenv shim that is not enabled fails) or pyenv's.
LOCALSTACK_TOOLS := $(TOOLS)/localstack
LOCALSTACK_LOCK := tests/localstack/requirements.txt
LOCALSTACK_PYTHON ?= $(shell for p in python3.13 $(HOME)/.pyenv/versions/3.13.0/bin/python3.13; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1 \
	&& "$$p" -c 'import sys; print(sys.executable)' && break; done)
# What `make test-localstack` runs with SQS on LocalStack (DynamoDB stays on moto).
# The partial-fault tests that lean on SQS's semantics most (redelivery, visibility,
# the DLQ); the rest of that file and the DLQ scan run on moto only, to keep CI short.
PARTIAL := tests/faults/test_partial_faults.py
LOCALSTACK_SUITE ?= tests/localstack tests/adapters/test_queue.py tests/adapters/test_bootstrap.py \
	tests/adapters/test_sweep.py tests/e2e/test_projects_flow.py \
	$(PARTIAL)::test_a_redelivery_to_the_worker_that_runs_the_message_starts_nothing \
	$(PARTIAL)::test_a_retry_whose_visibility_change_fails_comes_back_by_a_fresh_message \
	$(PARTIAL)::test_a_dlq_send_that_fails_still_lands_the_failure_in_the_dlq_once \
	tests/faults/test_campaign.py::test_randomized_fault_campaign

$(LOCALSTACK_TOOLS)/.installed: $(UV) $(LOCALSTACK_LOCK)
	@test -n "$(LOCALSTACK_PYTHON)" || { echo "no Python 3.13 found: set LOCALSTACK_PYTHON" >&2; exit 1; }
	rm -rf $(LOCALSTACK_TOOLS)
	$(UV) venv --quiet --python $(LOCALSTACK_PYTHON) $(LOCALSTACK_TOOLS)
	$(UV) pip sync --quiet --require-hashes --python $(LOCALSTACK_TOOLS)/bin/python $(LOCALSTACK_LOCK)
	@touch $@

test-localstack: install $(LOCALSTACK_TOOLS)/.installed ## The SQS-facing tests and the fault campaign with SQS on LocalStack
	BUILDQ_TEST_SQS=localstack BUILDQ_LOCALSTACK_PYTHON=$(CURDIR)/$(LOCALSTACK_TOOLS)/bin/python \
		$(BIN)/pytest $(LOCALSTACK_SUITE) $(ARGS)

localstack-lock: $(UV) ## Re-pin LocalStack (tests/localstack/requirements.in -> .txt, with hashes)
	$(UV) pip compile --quiet --python-version 3.13 --generate-hashes \
		--custom-compile-command "make localstack-lock" tests/localstack/requirements.in -o $(LOCALSTACK_LOCK)

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
