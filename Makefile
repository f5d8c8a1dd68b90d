# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.samora-installed

.PHONY: demo test env clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m samora_components demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf demo_out data/phantom_ct data/phantom_mr bundles/*/runs bundles/*/eval
