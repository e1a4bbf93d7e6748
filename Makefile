# The two commands a new user needs: `make run` and `make test`. Both do their own set-up.
SHELL := /bin/bash
# Debian's interpreter, so that the virtualenv sees python3-libnbd (the `nbd` module).
PYTHON := /usr/bin/python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run run-gateway test test-appliance lint typecheck unit check setup bench clean image mutation lock audit release

# Every Python dependency comes from the lock files (exact versions and their hashes; pip
# refuses anything else), then the project itself without dependencies.
$(STAMP): pyproject.toml requirements/dev.lock scripts/install-host-deps
	./scripts/install-host-deps
	test -x $(VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/dev.lock
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The lock files from pyproject.toml's dependencies (after changing them): runtime.lock
# for the appliance's release slots and the provider, dev.lock adds the development tools.
# Both resolved with Debian 12's Python, the appliance's.
LOCK := $(VENV)/bin/pip-compile -q --generate-hashes --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links
lock: $(STAMP)
	$(LOCK) -o requirements/runtime.lock pyproject.toml
	$(LOCK) --extra dev -o requirements/dev.lock pyproject.toml

# Known vulnerabilities in the locked runtime dependencies (pip-audit against PyPI's
# advisory data). Run before every release build (`make release`); not a CI gate, so that
# an advisory published today does not block unrelated work. --strict: a dependency that
# could not be checked is a failure, not a pass.
audit: $(STAMP)
	$(VENV)/bin/pip-audit --strict --disable-pip -r requirements/runtime.lock

# A release bundle for the provider to sign and publish (docs/updates.md): the audit first,
# then `sgw releases build` (as root) into dist/releases/. VERSION defaults to
# pyproject.toml's; publish with `sgw releases publish dist/releases/sgw-VERSION.tar.zst`.
release: audit
	$(VENV)/bin/sgw releases build $(if $(VERSION),--version $(VERSION)) dist/releases

# The appliance on this machine (scripts/run-appliance): the image (built if dist/ has
# none), a provider on 127.0.0.1 (sgw provider init/serve in run-data/appliance/), the
# appliance under QEMU activated with its key and given a volume through the control
# channel; prints the iSCSI address. Ctrl-C powers the appliance off, then the provider.
run: $(STAMP)
	$(VENV)/bin/python scripts/run-appliance

# Only the gateway daemon, on this machine: a 1 GiB volume served over NBD.
RUN_DIR := run-data
run-gateway: $(STAMP)
	@mkdir -p $(RUN_DIR)
	@echo "Gateway starting: volume vol0 (1 GiB) in $(RUN_DIR)/. Connect with, for example:"
	@echo "  nbdinfo 'nbd+unix:///vol0?socket=$(CURDIR)/$(RUN_DIR)/nbd.sock'"
	@echo "  qemu-io -f raw -c 'write -P 0x5a 0 1M' nbd://127.0.0.1:10809/vol0"
	@echo "  nbdcopy disk.img nbd://127.0.0.1:10809/vol0"
	@echo "Ctrl-C stops it (writes are flushed first)."
	exec $(VENV)/bin/sgw gateway serve --data-dir $(RUN_DIR) --volume vol0:1G \
		--nbd unix:$(CURDIR)/$(RUN_DIR)/nbd.sock --nbd tcp:127.0.0.1:10809

PY_SCRIPTS := bench/datapath bench/remote bench/restore bench/control bench/swap \
	scripts/run-appliance image scripts/mutation

# ruff (lint and format), and the import contracts of pyproject.toml (docs/layout.md).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench $(PY_SCRIPTS)
	$(VENV)/bin/ruff format --check src tests bench $(PY_SCRIPTS)
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The developer's fast loop: unit tests only (under a minute), then all three checks.
unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

check: lint typecheck unit

# The appliance image (dist/): Debian packages, Packer and Ansible; see docs/appliance.md.
image: $(STAMP)
	./image/build

# The host suite, and the appliance: the image is built in the background while the host
# suite runs, then booted under QEMU and tested end to end (scripts/test-all).
test: lint typecheck
	./scripts/test-all

# All of tests/appliance (make test runs those not marked appliance_full) against the
# image just built.
test-appliance: lint typecheck image
	SGW_APPLIANCE_REQUIRED=1 $(VENV)/bin/pytest -q tests/appliance

# Mutation checks, not part of `make test` (docs/testing.md, "Mutation checks"): mutmut
# over the write log, the flush path, request signing, activation keys, the nonce ledger
# and CHAP/LIO planning (scripts/mutation; [tool.mutmut] in pyproject.toml). Stops by
# itself at SGW_MUTATION_BUDGET_S (default 7200 s; a full run takes about 1 h 50 min on 2
# cores) and prints a summary with the survivors.
mutation: $(STAMP)
	$(VENV)/bin/python scripts/mutation

bench: $(STAMP)
	$(VENV)/bin/python bench/datapath

clean:
	rm -rf $(VENV) run-data bench-data build dist mutants
