# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean bench soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

tests/provider/node_modules/.package-lock.json: tests/provider/package-lock.json
	npm ci --prefix tests/provider --no-audit --no-fund --loglevel=error

# Independent MCP clients for the interop tests: the TypeScript SDK, the conformance suite, and Node 22 to run it.
tests/interop/node_modules/.package-lock.json: tests/interop/package-lock.json
	npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error

install: $(STAMP) tests/provider/node_modules/.package-lock.json tests/interop/node_modules/.package-lock.json
	scripts/install-test-deps

## run: the proxy on http://127.0.0.1:8080 (settings from the environment or .env); without a provider in
## them, a whole demo on loopback: a test OpenID provider, a demo MCP server and the proxy (scripts/run)
run: $(STAMP) tests/provider/node_modules/.package-lock.json
	$(BIN)/python scripts/run

## test: lint, then the whole suite (SQLite and PostgreSQL, the real OpenID provider)
test: install
	$(BIN)/ruff check .
	scripts/ensure-services
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## bench: the benchmarks (bench/run: wrk and nginx from Debian when missing, py-spy); rewrites docs/benchmarks.md
bench: $(STAMP) tests/provider/node_modules/.package-lock.json
	bench/run $(BENCH_ARGS)

## soak: mixed traffic through the proxy for SOAK_SECONDS (default 120), reporting RSS, descriptors, rows, 5xx and
## p99 per SOAK_INTERVAL (scripts/soak); not part of `make test`
soak: $(STAMP) tests/provider/node_modules/.package-lock.json
	$(BIN)/python scripts/soak

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) tests/provider/node_modules tests/interop/node_modules instance
