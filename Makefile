# The two commands: `make run` and `make test`. Each creates .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-deps native lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

native:
	$(MAKE) -C isolation/native

run: $(STAMP) native
	$(BIN)/hami up

# Debian packages some tests drive: prometheus (promtool checks the alert rules, the
# server answers the Grafana dashboard's queries) and chromium (the page at /, headless).
# Installed when missing wherever apt-get is; without it those tests skip and say why.
test-deps:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "test-deps: no apt-get, not installing$$missing"; exit 0; fi; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	$$sudo apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing

test: $(STAMP) native test-deps
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy shared
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP) native
	$(BIN)/python bench/placement.py

clean:
	rm -rf $(VENV)
	$(MAKE) -C isolation/native clean
