# The two commands a new user needs: `make run` and `make test`. Both do their own set-up.
SHELL := /bin/bash
# Debian's interpreter, so that the virtualenv sees python3-libnbd (the `nbd` module).
PYTHON := /usr/bin/python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test test-appliance lint typecheck unit setup bench clean image

$(STAMP): pyproject.toml scripts/install-host-deps
	./scripts/install-host-deps
	test -x $(VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

RUN_DIR := run-data
run: $(STAMP)
	@mkdir -p $(RUN_DIR)
	@echo "Gateway starting: volume vol0 (1 GiB) in $(RUN_DIR)/. Connect with, for example:"
	@echo "  nbdinfo 'nbd+unix:///vol0?socket=$(CURDIR)/$(RUN_DIR)/nbd.sock'"
	@echo "  qemu-io -f raw -c 'write -P 0x5a 0 1M' nbd://127.0.0.1:10809/vol0"
	@echo "  nbdcopy disk.img nbd://127.0.0.1:10809/vol0"
	@echo "Ctrl-C stops it (writes are flushed first)."
	exec $(VENV)/bin/sgw gateway serve --data-dir $(RUN_DIR) --volume vol0:1G \
		--nbd unix:$(CURDIR)/$(RUN_DIR)/nbd.sock --nbd tcp:127.0.0.1:10809

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench bench/datapath bench/remote bench/restore bench/control
	$(VENV)/bin/ruff format --check src tests bench bench/datapath bench/remote bench/restore bench/control

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The appliance image (dist/): Debian packages, Packer and Ansible; see docs/appliance.md.
image: $(STAMP)
	./image/build

test: lint typecheck
	$(VENV)/bin/pytest -q --ignore=tests/appliance

# The appliance tests (tests/appliance) boot the image just built (work in progress: not
# yet part of `make test`).
test-appliance: lint typecheck image
	SGW_APPLIANCE_REQUIRED=1 $(VENV)/bin/pytest -q tests/appliance

bench: $(STAMP)
	$(VENV)/bin/python bench/datapath

clean:
	rm -rf $(VENV) run-data bench-data build dist
