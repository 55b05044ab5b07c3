# airgap-llm — `make bundle` builds the default bundle; `make test` runs every test.
SPEC ?= bundle.toml
OUT ?= dist
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export AIRGAP_LLM_WHEELS ?= $(CURDIR)/wheels

.PHONY: bundle test unit lint venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# TARGET=box.json (from ./install.sh --probe) bundles for that box; REUSE=1 carries only
# what its python lacks; PART_SIZE=60M splits large files for size-limited transfers;
# BASE=old/NAME makes a delta that carries only what that earlier bundle lacks (install.sh --base).
bundle: $(VENV)/.installed
	$(VENV)/bin/bundler bundle $(SPEC) --out $(OUT) $(if $(TARGET),--target $(TARGET)) \
		$(if $(REUSE),--reuse-installed) $(if $(PART_SIZE),--part-size $(PART_SIZE)) \
		$(if $(UPGRADE_MODELS),--upgrade-models) $(if $(BASE),--base $(BASE))

test: $(VENV)/.installed
	$(PY) -m pytest -v -rs $(PYTEST_ARGS)

unit: $(VENV)/.installed
	$(PY) -m pytest -q tests/unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check bundler tests tools
	sh -n bundler/engines/llama_cpp/build_llama_server.sh
	$(PY) tools/check_layers.py

clean:
	rm -rf $(OUT) build
