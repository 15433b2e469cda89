# lorapipe — every target creates/refreshes .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# CPU wheel for this machine; GPU images install CUDA torch instead (images/).
TORCH_SPEC ?= torch==2.13.0
PYTEST_FLAGS ?=

.PHONY: setup run test test-slow test-faults lint bench tiny-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[tagger,test]"
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/python -m lorapipe.demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_FLAGS)

test-faults: $(STAMP)
	$(BIN)/python -m pytest -m faults $(PYTEST_FLAGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

tiny-model: $(STAMP)
	$(BIN)/lorapipe tiny-model models/tiny-sd

clean:
	rm -rf $(VENV) runs models .pytest_cache
