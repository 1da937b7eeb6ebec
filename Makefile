# fedobj — two commands: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedobj-installed
FLWR_HOME ?= $(CURDIR)/.flwr
SUPERLINK_PORT ?= 39191
CONTROL_PORT ?= 39193
# 10 simulated devices; 1 CPU each so both cores train at once.
FEDERATION ?= num-supernodes=10 client-resources-num-cpus=1
RUN_CONFIG ?=
PYTEST_ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
LINK := --home $(FLWR_HOME) --port $(SUPERLINK_PORT) --control-port $(CONTROL_PORT)

# exported so the recipe can quote it as it is: string values keep their quotes
export RUN_CONFIG
export PATH := $(CURDIR)/$(BIN):$(PATH)
export FLWR_HOME
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT := $(SUPERLINK_PORT)
export FLWR_LOCAL_CONTROL_API_PORT := $(CONTROL_PORT)
# no per-run `uv sync` of the app's dependencies (6 GB), unless the caller set it
NO_RUNTIME_INSTALL := $(or $(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION),1)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := $(NO_RUNTIME_INSTALL)
export FEDOBJ_OUTPUTS_DIR ?= $(CURDIR)/outputs

CONSOLE_PORT ?= 8000
CHROMIUM ?= /usr/bin/chromium

.PHONY: help setup data chromium demo console vendor test lint unit e2e browser stop clean

help:
	@echo "make demo   set up .venv, get Fashion-MNIST, train 10 simulated devices"
	@echo "make test   set up .venv, run ruff, mypy and the whole test suite"
	@echo "make console serve the web console over the demo's outputs (prints URL and key)"
	@echo "make stop   stop the background SuperLink and everything it started"
	@echo "make vendor refresh the console's vendored front-end files from npm"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

data:
	@if [ -n "$${FEDOBJ_FASHION_MNIST_DIR:-}" ] || [ -f $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."; \
	  SUDO=; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found: install dataset-fashion-mnist or set FEDOBJ_FASHION_MNIST_DIR"; \
	  exit 1; \
	fi

chromium:
	@if [ -x "$(CHROMIUM)" ] || [ -n "$${FEDOBJ_CHROMIUM:-}" ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  echo "Installing Chromium for the browser tests (Debian package chromium)..."; \
	  SUDO=; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; \
	else \
	  echo "Chromium not found: install it or set FEDOBJ_CHROMIUM"; exit 1; \
	fi

demo: setup data
	@$(BIN)/fedobj superlink start $(LINK)
	@status=0; \
	$(BIN)/fedobj run --federation-config "$(FEDERATION)" \
	  --run-config "$$RUN_CONFIG" --outputs "$(FEDOBJ_OUTPUTS_DIR)" || status=$$?; \
	$(BIN)/fedobj superlink stop $(LINK) >/dev/null; \
	exit $$status

# A key made for this console session and revoked when it stops (Ctrl-C).
console: setup
	@mkdir -p "$(FEDOBJ_OUTPUTS_DIR)"
	@key=$$($(BIN)/fedobj admin keys create --role admin --name "make console $$(date +%F.%T)" 2>/dev/null); \
	key_id=$${key:3:10}; \
	trap '$(BIN)/fedobj admin keys revoke '"$$key_id"' >/dev/null 2>&1 || true' EXIT; \
	echo; echo "  fedobj console: http://127.0.0.1:$(CONSOLE_PORT)/"; \
	echo "  admin key (valid until this console stops): $$key"; echo; \
	$(BIN)/fedobj admin serve --host 127.0.0.1 --port $(CONSOLE_PORT) --log-level warning

vendor:
	$(PYTHON) admin_api/console/vendor_assets.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -m "not e2e and not deployment and not browser" $(PYTEST_ARGS)

e2e: setup
	$(BIN)/pytest -m "e2e or deployment" $(PYTEST_ARGS)

browser: setup chromium
	$(BIN)/pytest -m browser $(PYTEST_ARGS)

test: lint chromium
	$(BIN)/pytest $(PYTEST_ARGS)

stop:
	@if [ -x $(BIN)/fedobj ]; then $(BIN)/fedobj superlink stop $(LINK); fi

clean: stop
	rm -rf outputs .flwr
