# Two entry points, both from a fresh machine: `make demo` (train on the built-in digits, sample, evaluate)
# and `make test` (the test suite; .ci/run calls it). The CPU build of torch is installed first, so that no
# dependency pulls the multi-GB CUDA build.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests

# The demo on the built-in digits: trains, samples with three kinds of guidance and evaluates (docs/training.md).
DEMO_DIR ?= demo_output
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/demo.py --output_dir $(DEMO_DIR)

.PHONY: install lint test demo
