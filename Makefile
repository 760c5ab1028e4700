# The two commands a newcomer runs: `make demo` and `make test`. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SCENARIO ?= healthy
PROTOCOL ?=
PROXYLESS ?= 0
HA ?=
MODELS ?=
# MLServer for `lab run --models mlserver` and tests/test_mlserver.py: its own venv
# (MLServer 1.7.1 needs protobuf < 7, and cannot share a process with tritonclient.grpc).
MLSERVER_VENV ?= .venv-mlserver
MLSERVER_REQS := hack/mlserver-requirements.txt
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed-$(shell cat $(MLSERVER_REQS) | md5sum | cut -c1-8)

.PHONY: mlserver setup test lint fmt typecheck pytest demo bench clean prometheus kubectl openssl chromium etcd nftables

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,lab]'
	rm -f $(VENV)/.installed-*; touch $@

$(MLSERVER_STAMP): $(MLSERVER_REQS)
	$(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install -q --upgrade pip
	$(MLSERVER_VENV)/bin/pip install -q -r $(MLSERVER_REQS)
	rm -f $(MLSERVER_VENV)/.installed-*; touch $@

mlserver: $(MLSERVER_STAMP)

# Debian's Prometheus, for the rollout tests and the lab.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing Debian's prometheus package"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

# kubectl, for the manifests/ dry-run test (Debian's kubernetes-client when absent).
kubectl:
	@command -v kubectl >/dev/null 2>&1 || { \
	  echo "installing Debian's kubernetes-client package (kubectl)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends kubernetes-client; }

# openssl, for the TLS and mTLS certificates the tests and `lab run --mtls` make.
openssl:
	@command -v openssl >/dev/null 2>&1 || { \
	  echo "installing Debian's openssl package"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends openssl; }

# Debian's Chromium, headless, for the dashboard's browser tests (Playwright drives this
# binary; it never downloads a browser of its own).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium package"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

# Debian's etcd (3.4), for replicas on etcd: `serve --store etcd://...`, `lab run --ha`
# and their tests (which start their own three-member clusters on loopback).
etcd:
	@command -v etcd >/dev/null 2>&1 || { \
	  echo "installing Debian's etcd-server package"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends etcd-server; }

# Debian's nftables (`nft`), for `lab run --netns` and tests/test_netns.py: the lab's
# partitions are drop rules in its own network namespaces (issue 29).
nftables:
	@command -v nft >/dev/null 2>&1 || { \
	  echo "installing Debian's nftables package"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends nftables; }

setup: $(STAMP) mlserver prometheus kubectl openssl chromium etcd nftables

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

# CI=1: tests/test_mlserver.py fails rather than skips when MLServer's venv is missing,
# and tests/test_netns.py when namespaces or nftables are (CI runs as root).
pytest: setup
	CI=$${CI:-1} XDS_MLSERVER_VENV=$(abspath $(MLSERVER_VENV)) $(BIN)/pytest

test: lint typecheck pytest

demo: setup
	$(BIN)/xds-server lab run --scenario $(SCENARIO) $(if $(PROTOCOL),--protocol $(PROTOCOL)) --proxyless $(PROXYLESS) $(if $(HA),--ha) $(if $(MODELS),--models $(MODELS))

bench: setup
	$(BIN)/python benchmarks/push_fanout.py

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) .lab .pytest_cache .mypy_cache .ruff_cache
