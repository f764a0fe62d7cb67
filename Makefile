# The two commands: `make run` and `make test`. Each creates .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test native lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

native:
	$(MAKE) -C isolation/native

run: $(STAMP) native
	$(BIN)/hami up

test: $(STAMP) native
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy shared
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP) native
	$(BIN)/python bench/placement.py

clean:
	rm -rf $(VENV)
	$(MAKE) -C isolation/native clean
