# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.samora-installed

.PHONY: demo test env clean

# sam2 (the SAM2 Hiera backbones) is published only as a source archive whose build imports torch:
# torch, torchvision, numpy and the build tools go first, then the rest with SAM2_BUILD_CUDA=0 (no
# CUDA extension, so no CUDA toolkit is needed) and --no-build-isolation (built against the torch
# just installed: no second torch is downloaded).
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q $$(grep -E '^(torch|torchvision|numpy|setuptools|wheel)==' requirements.txt)
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --disable-pip-version-check -q --no-build-isolation -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m samora_components demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf demo_out data/phantom_ct data/phantom_mr bundles/*/runs bundles/*/eval

# ---- MONAI Label (optional; docs/monailabel.md) ------------------------------------------------
# The label server needs numpy < 2 (monailabel 0.8.5 -> pydicom-seg), so it gets its own venv,
# .venv-label, built from requirements-label.txt. torch, torchvision, numpy and the build tools go first:
# sam2 (a monailabel dependency) is a source archive built against the installed torch.
LABEL_VENV := .venv-label
LABEL_BIN := $(LABEL_VENV)/bin
LABEL_STAMP := $(LABEL_VENV)/.samora-installed
PORT ?= 8000
BIND ?= 127.0.0.1

.PHONY: label-env label-server test-label

$(LABEL_STAMP): requirements-label.txt pyproject.toml
	@test -x $(LABEL_BIN)/python || $(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_BIN)/python -m pip install --disable-pip-version-check -q $$(grep -E '^(torch|torchvision|numpy|setuptools|wheel)==' requirements-label.txt)
	SAM2_BUILD_CUDA=0 $(LABEL_BIN)/python -m pip install --disable-pip-version-check -q --no-build-isolation -r requirements-label.txt
	$(LABEL_BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $(LABEL_STAMP)

label-env: $(LABEL_STAMP)

# make label-server STUDIES=/path/to/niftis [PORT=8000] [BIND=127.0.0.1]
label-server:
	@test -n "$(STUDIES)" || { echo "usage: make label-server STUDIES=/path/to/niftis [PORT=8000] [BIND=127.0.0.1]" >&2; exit 2; }
	@$(MAKE) --no-print-directory label-env
	$(LABEL_BIN)/python -m samora_components.apps.label_server --studies "$(STUDIES)" --port "$(PORT)" --host "$(BIND)"

# Starts the real server on a free loopback port and calls it over HTTP (about a minute once
# .venv-label exists); a plain `make test` skips that test.
test-label: $(STAMP) $(LABEL_STAMP)
	SAMORA_LABEL_TEST=1 $(BIN)/python -m pytest -q tests/integration
