# The two commands: `make run` (build, embedded PostgreSQL, server) and
# `make test` (everything the tests need, then the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUFFIX := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
# The Cython extensions (setup.py): the grab's core and the wire codec.
CORE   := anbao/_fastpath anbao/core/codec
EXT    := $(foreach m,$(CORE),$(m)$(SUFFIX))
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install build lint memcached redis iproute bench clean

run: build
	$(BIN)/anbao serve $(ARGS)

test: build memcached redis iproute
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "Cython>=3.0" "setuptools>=68" wheel
	$(BIN)/pip install --quiet -e ./client -e '.[test,bench,lint]'
	touch $@

# ruff (lint and format check), mypy (strict for the SDK), the import
# contracts (pyproject.toml) and no function over 70 lines
# (tools/function_length.py); every check runs, and any failure fails lint.
lint: install
	status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/mypy || status=1; \
	$(BIN)/lint-imports || status=1; \
	$(BIN)/python tools/function_length.py anbao client bench || status=1; \
	exit $$status

build: install $(EXT)

$(EXT) &: $(foreach m,$(CORE),$(m).pyx $(m).pxd) setup.py $(VENV)/.installed
	$(BIN)/python setup.py --quiet build_ext --inplace

# Debian's memcached, for the admission layer and its tests.
memcached:
	@command -v memcached >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq memcached; }

# Debian's redis-server, for the bench's Redis baseline (`--baseline redis`);
# the bench starts and stops its own instance, never the system's service.
redis:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }

# Debian's iproute2 (`ip`), for the deployment guide's tests: its two-host
# walkthrough runs in a network namespace of its own (`unshare -n`), whose
# loopback carries the guide's host addresses.
iproute:
	@command -v ip >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq iproute2; }

bench: build memcached redis
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf build $(VENV) anbao/core/*.c anbao/core/*.so anbao/_fastpath.c anbao/_fastpath.*.so .pytest_cache
