# Two entry points, each doing all set-up itself: `make run` and `make test`.
# Re-running with everything installed does nothing (the stamp file below).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sge-repro-installed
PROFILE ?= embedded

.PHONY: setup run test test-system-packages bench lock clean-venv

setup: $(STAMP)

# Every package at the version and sha256 of requirements.lock (pip's hash-checking mode; pip
# 24.0 is among them: newer pip refuses the detectron2 sdist's metadata, a direct-URL extra),
# then the checkout itself (editable, no dependency resolution) and detectron2 (pinned sdist).
$(STAMP): requirements.lock pyproject.toml Makefile sge_repro/detection/install.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m sge_repro.detection.install --cache $(VENV)/cache
	touch $@

# After changing a dependency in pyproject.toml: re-resolve, pin and hash everything, then commit
# requirements.lock and environment.yml. Needs the package registries.
lock:
	$(PYTHON) tools/pin_requirements.py

run: $(STAMP)
	$(BIN)/sge-repro run all --profile $(PROFILE)

test: $(STAMP) test-system-packages
	$(BIN)/ruff check --quiet sge_repro benchmarks tools tests
	$(BIN)/python -m pytest -q

# The SLURM tests run a real single-host cluster: Debian's slurm-wlm + munge (installed with apt-get
# as root or passwordless sudo; otherwise one line says what to install, before the suite starts).
test-system-packages:
	@tools/test_system_packages.sh

clean-venv:
	rm -rf $(VENV)
