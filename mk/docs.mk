# The documentation site (mkdocs.yml, docs/): MkDocs + Material pinned with hashes in
# requirements-docs.lock, in a venv of its own so the app's pins stay untouched. The build needs
# no network once the venv exists; the appliance serves build/docs at /help.

TEST_EXTRA += docs
DOCS_PYTHON ?= python3
DOCS_VENV := .cache/docs-venv
DOCS_SITE := build/docs

# Rebuilt from scratch whenever the lock changes: a venv never mixes two locks.
$(DOCS_VENV)/.installed: requirements-docs.lock
	rm -rf $(DOCS_VENV)
	$(DOCS_PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install -q --require-hashes -r requirements-docs.lock
	touch $@

.PHONY: docs
docs: setup $(DOCS_VENV)/.installed ## Build the documentation site offline (mkdocs --strict) -> build/docs
	@if [ -f scripts/gen_docs.py ]; then echo "$(PY) scripts/gen_docs.py"; $(PY) scripts/gen_docs.py; \
	else echo "scripts/gen_docs.py not there yet: the generated reference pages are left as they are"; fi
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict --site-dir $(DOCS_SITE)
