# `make run` and `make test` set everything up on a fresh machine: a venv with every extra, pinned torch,
# and the Debian data packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := dev,diffusion,dense,deploy
STAMP := $(VENV)/.installed-$(EXTRAS)
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
WHEEL_DIR := build/wheel-check

.PHONY: setup system-packages run test lint unit wheel-check bench clean

setup: $(STAMP) system-packages

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" "setuptools>=77" wheel
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

system-packages:
	@missing=""; \
	[ -d $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	command -v bible >/dev/null 2>&1 || [ -x /usr/games/bible ] || missing="$$missing bible-kjv"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# The main job: train agent, softmax and linear twins on Fashion-MNIST, print the table, write the report
# (runs/<timestamp>/report.html). Extra options: make run COMPARE_ARGS="--epochs 10".
COMPARE_ARGS ?=
run: setup
	$(VENV)/bin/agentattn compare $(COMPARE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

unit: setup
	$(PY) -m pytest -q

# Build the wheel and import it from a clean venv, so that a file missing from the package shows up.
# The clean venv borrows the dependencies (torch, timm, ...) of $(VENV) through a .pth line, which does not
# run $(VENV)'s editable-install hook, so only the wheel can provide `agentattn`.
wheel-check: $(STAMP)
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(WHEEL_DIR)/dist .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install --quiet --no-deps --no-index $(WHEEL_DIR)/dist/agentattn-*.whl
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
		"$$($(WHEEL_DIR)/venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/_deps.pth"
	cd $(WHEEL_DIR) && venv/bin/python $(CURDIR)/tests/wheel_smoke.py
	$(WHEEL_DIR)/venv/bin/agentattn --help > /dev/null

test: setup lint unit wheel-check

bench: setup
	AGENTATTN=$(VENV)/bin/agentattn benchmarks/run_all.sh

clean:
	rm -rf build dist $(WHEEL_DIR) .pytest_cache
