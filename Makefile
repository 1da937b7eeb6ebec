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
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FEDOBJ_OUTPUTS_DIR ?= $(CURDIR)/outputs

.PHONY: help setup data demo test lint unit e2e stop clean

help:
	@echo "make demo   set up .venv, get Fashion-MNIST, train 10 simulated devices"
	@echo "make test   set up .venv, run ruff, mypy and the whole test suite"
	@echo "make stop   stop the background SuperLink and everything it started"

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

demo: setup data
	@$(BIN)/fedobj superlink start $(LINK)
	@status=0; \
	$(BIN)/flwr run . --stream --federation-config "$(FEDERATION)" \
	  $(if $(RUN_CONFIG),--run-config "$$RUN_CONFIG") || status=$$?; \
	$(BIN)/fedobj superlink stop $(LINK) >/dev/null; \
	if [ $$status -ne 0 ]; then echo "flwr run failed (exit $$status)"; exit $$status; fi; \
	$(BIN)/fedobj runs show latest --outputs "$(FEDOBJ_OUTPUTS_DIR)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -m "not e2e and not deployment" $(PYTEST_ARGS)

e2e: setup
	$(BIN)/pytest -m "e2e or deployment" $(PYTEST_ARGS)

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

stop:
	@if [ -x $(BIN)/fedobj ]; then $(BIN)/fedobj superlink stop $(LINK); fi

clean: stop
	rm -rf outputs .flwr
