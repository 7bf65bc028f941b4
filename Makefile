# pinnace: `make demo` and `make test` work on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# What pinnace needs from Debian: QEMU, qcow2 tools, the image builder's tools, the
# kernel source and what compiles it (pinnace's guest kernel, built once per host), tmux
# for the PTY tests, squashfs-tools and dosfstools for kernel tests, tcpdump to read network
# captures back, and venv support for the Python that runs pinnace.
APT_PACKAGES := qemu-system-x86 qemu-utils busybox-static mmdebstrap e2fsprogs kmod \
	dpkg tar python3 python3-venv tmux \
	linux-source-6.1 build-essential bison flex bc libelf-dev xz-utils squashfs-tools dosfstools \
	tcpdump
# Tests keep their own store (images cached between runs) inside the checkout.
TEST_HOME ?= $(CURDIR)/.cache/test-home

.PHONY: all deps venv demo test lint unit guest image bench clean
all: test

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "make: installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: deps venv
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit -q

# The test image is built first, in the open: the first build on a host compiles the
# guest kernel (minutes), and its progress shows here rather than inside a test.
image: deps venv
	PINNACE_HOME=$(TEST_HOME) $(BIN)/pinnace image build

guest: image
	PINNACE_HOME=$(TEST_HOME) $(BIN)/pytest tests/guest

test: lint image
	PINNACE_HOME=$(TEST_HOME) $(BIN)/pytest tests

bench: deps venv
	@# as an installed package would be: byte-compiled (even with PYTHONDONTWRITEBYTECODE)
	$(BIN)/python -m compileall -q src
	PINNACE_HOME=$(TEST_HOME) $(BIN)/python bench/boot.py
	PINNACE_HOME=$(TEST_HOME) $(BIN)/python bench/agent.py
	PINNACE_HOME=$(TEST_HOME) $(BIN)/python bench/snapshot.py
	PINNACE_HOME=$(TEST_HOME) $(BIN)/python bench/net.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
