# Two commands: `make run` (the daemon on daemon/config.yaml) and `make test` (the whole suite).
# Both create .venv if it is missing; a second call reuses it (the stamp follows pyproject.toml).

VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= daemon/config.yaml
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint docs bench clean

$(PY):
	python3 -m venv $(VENV)

# torch==2.13.0 is pinned in pyproject.toml: the local CPU build, never CUDA wheels.
$(STAMP): pyproject.toml setup.py lora_service_torchvision.pth | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia'; then \
		echo "error: a CUDA torch was pulled in (nvidia-* packages in $(VENV))"; exit 1; fi
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lora-service run --config $(CONFIG)

test: $(STAMP)
	$(VENV)/bin/ruff check lora_service tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

docs: $(STAMP)
	$(PY) -m lora_service.docgen --write

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV)
