# Whisper appliance — every entry point. `make` (or `make help`) lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help
help: ## List every target with a one-line description
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort -u | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

.PHONY: setup
setup: ## Install what is missing: system packages, venv from the lock file, models, speech clips
	WITH_LXC=$(WITH_LXC) WITH_CONTAINER=$(WITH_CONTAINER) bash scripts/bootstrap.sh

.PHONY: run
run: setup ## Install what is missing, then serve on https://0.0.0.0:5001 (HTTPS_ENABLED=false for plain HTTP)
	DATA_DIR=$${DATA_DIR:-$(CURDIR)/var} $(VENV)/bin/whisper-appliance serve

.PHONY: lint
lint: setup ## ruff, mypy --strict, import-linter layering, ansible-lint (production) and yamllint
	$(VENV)/bin/ruff check appliance tests bench scripts
	$(VENV)/bin/ruff format --check appliance tests bench scripts
	$(VENV)/bin/mypy appliance
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports
	$(MAKE) --no-print-directory lint-extra

.PHONY: pytest
pytest: setup ## Run the pytest suite only (real engine, real server, real browser)
	$(VENV)/bin/pytest

# The same suite with the state on PostgreSQL (DATABASE_URL): a throw-away server from Debian's
# postgresql-15 (tests/pgserver.py), an empty database per test; tests marked sqlite_only skip.
.PHONY: pytest-pg
pytest-pg: setup ## Run the pytest suite on PostgreSQL instead of SQLite (throw-away local server)
	APPLIANCE_TEST_DB=postgresql $(VENV)/bin/pytest

# Both backends side by side: much of the suite waits on servers, browsers and subprocesses, so
# the two runs share 2 cores well (measured: 23 min together, 31 min one after the other). The
# SQLite run prints as it goes, the PostgreSQL run's output follows it; each has its own basetemp.
.PHONY: pytest-both
# The docs site is built once before: two sessions building one venv at once break each other.
pytest-both: setup docs ## Run the pytest suite on SQLite and on PostgreSQL at the same time
	@base=$$(mktemp -d /tmp/whisper-pytest.XXXXXX); start=$$(date +%s); \
	  APPLIANCE_TEST_DB=postgresql $(VENV)/bin/pytest -p no:cacheprovider --basetemp=$$base/pg \
	    > $$base/pg.log 2>&1 & pg=$$!; \
	  $(VENV)/bin/pytest --basetemp=$$base/sqlite; sqlite=$$?; \
	  wait $$pg; postgres=$$?; \
	  echo "===== pytest on PostgreSQL (APPLIANCE_TEST_DB=postgresql) ====="; cat $$base/pg.log; \
	  echo "make pytest-both: SQLite exit $$sqlite, PostgreSQL exit $$postgres, wall time $$(( $$(date +%s) - start )) s"; \
	  rm -rf $$base; [ $$sqlite -eq 0 ] && [ $$postgres -eq 0 ]

.PHONY: test
test: ## Install what is missing, then lint + every test suite (pytest on SQLite and PostgreSQL side by side)
	$(MAKE) --no-print-directory setup WITH_LXC=$(TEST_WITH_LXC) WITH_CONTAINER=$(TEST_WITH_CONTAINER)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory pytest-both
	$(MAKE) --no-print-directory test-extra

.PHONY: bench
bench: setup ## Side-by-side benchmark: engines, service overhead, live latency, soak -> bench/results.md
	$(PY) -m bench.run
	$(PY) -m bench.soak

.PHONY: soak
soak: setup ## Soak only: mixed uploads, live, history, admin for SOAK_MINUTES (5) -> bench/results.md
	$(PY) -m bench.soak --check

.PHONY: lock
lock: ## Re-pin the lock files (with sha256 hashes) from a fresh resolve of pyproject.toml (maintainers only)
	bash scripts/lock.sh

.PHONY: clean
clean: ## Remove the venv, caches and build outputs (keeps the data dir)
	rm -rf $(VENV) .cache/stamps .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info

# Each concern adds its targets in its own fragment (ansible, dist, image, ...).
# lint-extra and test-extra collect their lint and test steps.
LINT_EXTRA :=
TEST_EXTRA :=
TEST_WITH_LXC ?= 0
WITH_LXC ?= 0
TEST_WITH_CONTAINER ?= 0
WITH_CONTAINER ?= 0
-include mk/*.mk

.PHONY: lint-extra test-extra
lint-extra: $(LINT_EXTRA)
test-extra: $(TEST_EXTRA)
