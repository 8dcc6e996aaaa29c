"""Shared fixtures: databases (SQLite and real PostgreSQL), the proxy on a real loopback HTTP server, test clients."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from oauthproxy import create_app
from oauthproxy.database import upgrade_database
from oauthproxy.models import db
from tests.flows import Browser, McpOAuthClient
from tests.support.settings import base_env

# The fixture modules, for every test module: tests name the fixtures they use as arguments, never import them.
pytest_plugins = [
    "tests.provider_fixture",
    "tests.proxy_fixtures",
    "tests.interop_fixtures",
    "tests.bad_input_fixtures",
    "tests.connect_fixtures",
    "tests.downstream_auth_fixtures",
    "tests.account_fixtures",
]

if TYPE_CHECKING:
    from tests.provider_fixture import OidcProvider

POSTGRES_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def ensure_database(dsn: str) -> None:
    """Create the database `dsn` names when the server lacks it (a fresh PostgreSQL has only `postgres`)."""
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
        return
    except psycopg.OperationalError as error:
        if "does not exist" not in str(error):
            raise
    base, name = dsn.split("?", 1)[0].rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')


def pytest_sessionstart(session: pytest.Session) -> None:
    try:  # several tests connect to POSTGRES_DSN itself; a missing server is reported by the tests that need it
        ensure_database(POSTGRES_DSN)
    except psycopg.OperationalError:
        pass


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this session. Missing PostgreSQL fails the run; it is never skipped."""
    name = f"oauthproxy_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL is required at {POSTGRES_DSN} (set TEST_POSTGRES_DSN): {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_dsn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'oauthproxy.sqlite3'}"
    return request.getfixturevalue("postgres_database")


@dataclass
class RunningProxy:
    app: Flask
    url: str
    server: BaseWSGIServer
    provider: OidcProvider

    def stop(self) -> None:
        self.server.shutdown()

    def register_client(self, **kwargs) -> McpOAuthClient:
        return McpOAuthClient.register(self.url, **kwargs)

    def browser(self, login_hint: str = "alice") -> Browser:
        return Browser(self.url, login_hint=login_hint)


@pytest.fixture(scope="session")
def migrated_databases() -> set[str]:
    """DSNs already migrated in this session: the schema is built once per database."""
    return set()


@pytest.fixture
def start_proxy(
    oidc_provider: OidcProvider, database_dsn: str, migrated_databases: set[str]
) -> Iterator[Callable[..., RunningProxy]]:
    """Factory: start the proxy app on a real loopback HTTP server, with extra environment settings.

    Every proxy a test starts is stopped, and its connection pool closed, when the test ends; kept open, a
    few hundred idle pools would exhaust PostgreSQL's max_connections.
    """
    running: list[RunningProxy] = []

    def start(provider: OidcProvider | None = None, **overrides: str) -> RunningProxy:
        provider = provider or oidc_provider
        # Listening before the app is built (PUBLIC_URL needs the port): with pytest-xdist, another process could
        # take a port that was only found free, between free_port() and the bind.
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        client_id = f"proxy-{port}"
        # In-process, the audit trail's default destination (stdout) is pytest's own: a flush landing while a test
        # reads a CLI command's captured output would mix into it. Tests of the trail name a file.
        env = {**base_env(port, provider, database_dsn, client_id), "AUDIT_LOG": "off", **overrides}
        provider.register_client(client_id, env["OAUTH_CLIENT_SECRET"], [f"{env['PUBLIC_URL']}/callback"])
        app = create_app(env)
        if env["DATABASE_DSN"] not in migrated_databases:
            upgrade_database(app)
            migrated_databases.add(env["DATABASE_DSN"])
        server = make_server("127.0.0.1", port, app, threaded=True, fd=listener.fileno())
        listener.close()  # the server holds its own duplicate of the socket
        server.server_name, server.server_port = "127.0.0.1", port  # set by HTTPServer.server_bind, skipped with fd
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proxy = RunningProxy(app, env["PUBLIC_URL"], server, provider)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        threading.Thread(target=proxy.stop, daemon=True).start()  # shutdown() waits out a 0.5 s poll
        with proxy.app.app_context():
            db.engine.dispose()


@pytest.fixture
def proxy(start_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    return start_proxy()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(autouse=True, scope="module")
def release_finished_apps() -> Iterator[None]:
    """After each test file, collect the apps its tests built and dropped: a Flask app is a reference cycle, freed
    (and its database pool's connections closed) only by the cycle collector, which may not run for a long while.
    Four test processes each keeping dead apps' PostgreSQL connections ran the server out of them (max_connections
    100) while the gunicorn fleets of other files needed theirs."""
    yield
    import gc

    gc.collect()
