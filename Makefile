# The two commands a new user needs: `make run` and `make test`. Both do their own set-up.
SHELL := /bin/bash
# Debian's interpreter, so that the virtualenv sees python3-libnbd (the `nbd` module).
PYTHON := /usr/bin/python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit setup bench clean

$(STAMP): pyproject.toml scripts/install-host-deps
	./scripts/install-host-deps
	test -x $(VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python scripts/run-gateway

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts/run-gateway
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/datapath

clean:
	rm -rf $(VENV) run-data bench-data
