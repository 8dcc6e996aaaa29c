# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

tests/provider/node_modules/.package-lock.json: tests/provider/package-lock.json
	npm ci --prefix tests/provider --no-audit --no-fund --loglevel=error

install: $(STAMP) tests/provider/node_modules/.package-lock.json

## run: start the proxy on http://127.0.0.1:8080 with SQLite (settings from the environment or .env)
run: $(STAMP)
	$(BIN)/oauthproxy db upgrade
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

## test: lint, then the whole suite (SQLite and PostgreSQL, the real OpenID provider)
test: install
	$(BIN)/ruff check .
	scripts/ensure-services
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) tests/provider/node_modules instance
