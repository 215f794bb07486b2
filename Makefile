# Keyward developer entry points. Everything installs itself: see hack/bootstrap.sh.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
STATE ?= $(CURDIR)/.local/cluster

.PHONY: help bootstrap up down env demo test lint typecheck unit e2e bench bench-reencrypt protos chart manifests

help:
	@echo "make demo   - from nothing to a Secret encrypted in etcd by the HSM-backed KMS plugin"
	@echo "make test   - lint, type checks and the whole test suite (real apiserver, etcd, SoftHSM2)"
	@echo "make up     - start the local control plane (idempotent); make down stops and cleans it"
	@echo "eval \"\$$(make -s env)\"  - point kubectl and the keyward CLI at the local control plane"
	@echo "make chart  - helm lint and template the chart (default and ci/ values); check deploy/ is current"
	@echo "make manifests - write deploy/keyward.yaml, deploy/node/ and the chart's CRD copy from the chart"

bootstrap:
	@bash hack/bootstrap.sh

up: bootstrap
	@$(PY) hack/localcluster.py up --state $(STATE)

down:
	@if [ -x $(PY) ]; then $(PY) hack/localcluster.py down --state $(STATE); else rm -rf $(STATE); fi

env:
	@$(PY) hack/localcluster.py env --state $(STATE)

demo: up
	@$(PY) hack/demo.py --state $(STATE)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: bootstrap
	$(VENV)/bin/mypy keyward kmsplugin operator/keyward_operator hack bench
	@# Test functions take fixtures and return nothing: their bodies are checked, their signatures not required.
	$(VENV)/bin/mypy --allow-untyped-defs --allow-incomplete-defs --allow-untyped-calls --no-warn-return-any \
		--check-untyped-defs tests

chart: bootstrap
	$(PY) hack/chart.py lint
	$(PY) hack/chart.py check

manifests: bootstrap
	$(PY) hack/chart.py write

protos: bootstrap
	$(PY) -m keyward.wire.generate

unit: bootstrap
	$(VENV)/bin/pytest tests/unit

test: lint typecheck
	$(VENV)/bin/pytest

bench: bootstrap
	$(PY) bench/decrypt_latency.py

bench-reencrypt: bootstrap
	$(PY) bench/reencrypt_throughput.py
