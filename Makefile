# Two entry points, both from a fresh machine: `make demo` (train on the built-in digits, sample, evaluate)
# and `make test` (the test suite; .ci/run calls it, then `make test-oldest-diffusers`). The CPU build of torch is
# installed first, so that no dependency pulls the multi-GB CUDA build.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where pip finds that torch build: empty uses pip's configured index; set it to a CPU wheel index, for example
# `make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX_URL ?=
EXTRAS ?= test,training,text,plots

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PYTHON) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests

# The loading tests again against the oldest diffusers that setup.cfg allows. The venv borrows every other package
# from $(VENV) (a .pth line adds its site-packages), so only diffusers and what it adds are installed, with the newest
# transformers that works with the huggingface_hub that diffusers accepts (pip leaves $(VENV)'s own untouched).
OLDEST_VENV ?= .venv-oldest-diffusers
OLDEST_DIFFUSERS := $(shell sed -n 's/^ *diffusers>=\([0-9.]*\).*/\1/p' setup.cfg)
LOADING_TESTS ?= tests/test_pipeline_loading.py tests/test_hub.py tests/test_scheduler.py

$(OLDEST_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(PYTHON) -c "import site; print('import site; site.addsitedir(%r)' % site.getsitepackages()[0])" \
		> $$($(OLDEST_VENV)/bin/python -c "import site; print(site.getsitepackages()[0])")/borrow_from_venv.pth
	$(OLDEST_VENV)/bin/python -m pip install --quiet "diffusers==$(OLDEST_DIFFUSERS).*" transformers
	touch $@

test-oldest-diffusers: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q $(LOADING_TESTS)

# The demo on the built-in digits: trains, samples with three kinds of guidance and evaluates (docs/training.md).
DEMO_DIR ?= runs/demo
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) scripts/demo.py --output_dir $(DEMO_DIR)

.PHONY: install lint test test-oldest-diffusers demo
