# Two commands: `make demo` runs the whole thing on built-in synthetic data, `make test` runs the tests.
# Both set up .venv first (idempotent). See README.md.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean help

help:
	@echo "make demo   - set up, then run the platform end to end on synthetic data"
	@echo "make test   - set up, then run the test suite"
	@echo "make bench  - run the benchmarks in bench/ (slow)"
	@echo "make clean  - remove generated runs (keeps .venv)"

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/data_bench.py

clean:
	rm -rf runs/ .pytest_cache
