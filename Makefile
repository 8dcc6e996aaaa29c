# The two commands a newcomer needs: `make run` and `make test`. `make help` lists every target.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What a deployment installs (requirements.txt), and everything: tests, demo, lock and build tools (requirements.lock).
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: help run demo-deps test test-container lint install lock wheel clean bench soak

## help: this list
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Both lock files pin every package of the tree with its hashes; the project itself is installed after, alone.
$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(STAMP): requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@ $(RUNTIME_STAMP)

tests/provider/node_modules/.package-lock.json: tests/provider/package-lock.json
	npm ci --prefix tests/provider --no-audit --no-fund --loglevel=error

# Independent MCP clients for the interop tests: the TypeScript SDK, the conformance suite, and Node 22 to run it.
tests/interop/node_modules/.package-lock.json: tests/interop/package-lock.json
	npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error

## install: everything `make test` needs: .venv from requirements.lock, the npm packages, Debian's chromium
install: $(STAMP) tests/provider/node_modules/.package-lock.json tests/interop/node_modules/.package-lock.json
	scripts/install-test-deps

## run: the proxy on http://127.0.0.1:8080 with the settings from the environment or .env (installs only what a
##   deployment needs: requirements.txt); without a provider in them, a whole demo on loopback: a test OpenID
##   provider, a demo MCP server and the proxy (scripts/run; the demo also installs the test extras and needs Node)
run: $(RUNTIME_STAMP)
	@if [ "$$($(BIN)/python scripts/run --mode)" = demo ]; then $(MAKE) --no-print-directory demo-deps; fi
	$(BIN)/python scripts/run

demo-deps: $(STAMP) tests/provider/node_modules/.package-lock.json

## test: lint, then the whole suite (SQLite and PostgreSQL, the real OpenID provider) on PYTEST_WORKERS processes
##   (default 4, a test file per process; 0 runs it in one); PYTEST_ARGS adds pytest arguments, e.g.
##   make test PYTEST_ARGS='-x tests/test_config.py'
# Four processes on two cores: the suite mostly waits (providers, gunicorn, deadlines), so it overlaps well.
PYTEST_WORKERS ?= 4
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	scripts/ensure-services
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## test-container: the image built from the Dockerfile and run with podman, and compose.yaml's stack (minutes;
##   installs podman, runc and debootstrap from Debian when missing; the base image is cached, see README)
test-container: install
	scripts/install-container-deps
	scripts/ensure-services
	$(BIN)/python -m pytest -q -m container $(PYTEST_ARGS) tests/test_container.py tests/test_compose.py

## lint: ruff's checks, its formatter's check (`ruff format .` fixes what it finds) and mypy over oauthproxy/
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## lock: re-resolve requirements.lock (everything) and requirements.txt (a deployment: core, postgres, redis)
##   from pyproject.toml's pins, with hashes, for every platform; run it after changing a pin
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 --generate-hashes \
	  --no-header -q -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra postgres --extra redis --universal --python-version 3.11 \
	  --generate-hashes --no-header -c requirements.lock -q -o requirements.txt

## wheel: build dist/oauthproxy-VERSION-py3-none-any.whl (templates and static files inside)
wheel: $(STAMP)
	$(BIN)/uv build --wheel --out-dir dist

## bench: the benchmarks (bench/run: wrk and nginx from Debian when missing, py-spy); rewrites docs/benchmarks.md
bench: $(STAMP) tests/provider/node_modules/.package-lock.json
	bench/run $(BENCH_ARGS)

## soak: mixed traffic through the proxy for SOAK_SECONDS (default 120), reporting RSS, descriptors, rows, 5xx and
## p99 per SOAK_INTERVAL (scripts/soak); not part of `make test`
soak: $(STAMP) tests/provider/node_modules/.package-lock.json
	$(BIN)/python scripts/soak

## clean: remove what the targets above installed or built; never instance/ (the default SQLite database, keys)
clean:
	rm -rf $(VENV) tests/provider/node_modules tests/interop/node_modules dist build oauthproxy.egg-info \
	  .pytest_cache .ruff_cache
