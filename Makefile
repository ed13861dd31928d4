# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.plinius-installed

.PHONY: demo test lint typecheck unit bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins the CPU build of torch so no CUDA build is ever pulled.
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,plots]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/plinius demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench-quick: $(STAMP)
	$(BIN)/plinius bench --quick --out bench-out

bench: $(STAMP)
	$(BIN)/plinius bench --out bench-out

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-out demo-out
