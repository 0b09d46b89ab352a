# Two entry points, each doing all set-up itself: `make run` and `make test`.
# Re-running with everything installed does nothing (the stamp file below).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sge-repro-installed
PROFILE ?= embedded

.PHONY: setup run test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile sge_repro/detection/install.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip 24.0: newer pip refuses the detectron2 sdist's metadata (a direct-URL extra).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'pip==24.0'
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/python -m sge_repro.detection.install --cache $(VENV)/cache
	touch $@

run: $(STAMP)
	$(BIN)/sge-repro run all --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
