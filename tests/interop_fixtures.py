"""Fixtures and helpers for the interoperability tests: independent MCP clients against the proxy, end to end.

A pytest plugin, loaded for every test module by `pytest_plugins` in tests/conftest.py (fixtures registered under
the name without `_fixture`, as in `tests.proxy_fixtures`); test modules import the helpers they use.

Database: the interop tests exercise clients, not storage backends (the core and proxy suites run on both), so each
interop module runs on one database, `INTEROP_DATABASE`: PostgreSQL, the setting of a multi-worker deployment
(`pytestmark = ON_INTEROP_DATABASE`). That keeps them from running twice; set `TEST_INTEROP_DATABASE=sqlite` to run
them on SQLite instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from html import unescape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
import requests
import sqlalchemy
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata
from playwright.sync_api import Browser as ChromiumBrowser
from playwright.sync_api import Page, sync_playwright

from oauthproxy.config import normalise_database_dsn
from oauthproxy.crypto import hash_token
from oauthproxy.models import utcnow
from tests.flows import Browser, MemoryStorage, query_of
from tests.proxy_fixtures import GunicornProxy
from tests.support.processes import ModuleServer, launch_module_server
from tests.support.servers import serving

ROOT = Path(__file__).resolve().parent.parent
INTEROP_DIR = ROOT / "tests" / "interop"
NODE_MODULES = INTEROP_DIR / "node_modules"
#: Node 22 from the npm package `node@22`: the conformance suite needs `fs.globSync`, which Node 20 lacks.
NODE22 = NODE_MODULES / "node" / "bin" / "node"
CONFORMANCE_CLI = NODE_MODULES / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
TS_CLIENT = INTEROP_DIR / "ts_client.mjs"
SDK_REDIRECT_URI = "http://127.0.0.1:9/sdk-callback"  # never contacted: the walker stops at this prefix

#: The `start_gunicorn` fixture of tests.proxy_fixtures: `start(workers=1, provider=None, **env) -> GunicornProxy`.
StartGunicorn = Callable[..., GunicornProxy]


# -- database -------------------------------------------------------------------------------------


INTEROP_DATABASE = os.environ.get("TEST_INTEROP_DATABASE", "postgresql")
ON_INTEROP_DATABASE = pytest.mark.parametrize("database_dsn", [INTEROP_DATABASE], indirect=True)


class ProxyDatabase:
    """Direct access to the proxy's tables, to move its clock: expire a token without waiting for it."""

    def __init__(self, dsn: str):
        self.engine = sqlalchemy.create_engine(normalise_database_dsn(dsn))

    def expire_access_token(self, access_token: str) -> None:
        with self.engine.begin() as connection:
            updated = connection.execute(
                sqlalchemy.text("UPDATE tokens SET access_expires_at = :past WHERE access_token_hash = :hash"),
                {"past": utcnow() - timedelta(minutes=1), "hash": hash_token(access_token)},
            ).rowcount
        assert updated == 1, "the access token is not in the proxy's database"

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture(name="proxy_database", scope="session")
def proxy_database_fixture(database_dsn: str) -> Iterator[ProxyDatabase]:
    database = ProxyDatabase(database_dsn)
    yield database
    database.close()


# -- node packages --------------------------------------------------------------------------------


@pytest.fixture(name="interop_node", scope="session")
def interop_node_fixture() -> Path:
    """Node 22 and the pinned npm packages of tests/interop. Missing ones fail the run: they are never skipped."""
    missing = [
        path for path in (NODE22, CONFORMANCE_CLI, NODE_MODULES / "@modelcontextprotocol" / "sdk") if not path.exists()
    ]
    if missing:
        pytest.fail(f"{missing[0]} is missing: run `npm ci --prefix tests/interop` (or `make install`).")
    return NODE22


def node_env() -> dict[str, str]:
    """Node 22 first on PATH (the conformance CLI's `#!/usr/bin/env node` and its children use it)."""
    env = {key: value for key, value in os.environ.items() if key != "NODE_OPTIONS"}
    env["PATH"] = f"{NODE22.parent}{os.pathsep}{env.get('PATH', '')}"
    env["NO_COLOR"] = "1"
    return env


# -- a person's browser, one hop at a time --------------------------------------------------------


def walk(browser: Browser, url: str, stop_prefix: str, decision: str = "approve") -> str:
    """`Browser.authorize`, plus the one page a person clicks through on the way back: an error page whose
    "Return to the application" link carries the OAuth error to the client (the allowlist refusal)."""
    try:
        return browser.authorize(url, stop_prefix, decision)
    except AssertionError:
        page = browser.last_page
        match = re.search(r'id="continue" href="([^"]+)"', page.text) if page is not None else None
        if match and unescape(match.group(1)).startswith(stop_prefix):
            return unescape(match.group(1))
        raise


# -- the MCP Python SDK as a client ---------------------------------------------------------------


class AuthorizationFailed(Exception):
    """The authorization response the client received carried an OAuth error (RFC 6749 §4.1.2.1)."""

    def __init__(self, params: dict[str, str]):
        super().__init__(f"{params.get('error')}: {params.get('error_description')}")
        self.params = params


@dataclass
class SdkClient:
    """One installation of an MCP client built on the Python SDK: its token storage and its user's browser.

    Each `connect()` builds a fresh `OAuthClientProvider` over the same storage, as a restarted client would. The
    browser is a separate cookie-keeping HTTP client (the provider holds a lock while it waits, so re-entering
    the authed client would deadlock) that walks authorize → consent → provider → callback one hop at a time.
    """

    proxy_url: str
    resource_url: str
    login_hint: str = "alice"
    decision: str = "approve"
    client_name: str = "Python SDK interop client"
    storage: MemoryStorage = field(default_factory=MemoryStorage)
    browser: Browser | None = None
    authorize_urls: list[str] = field(default_factory=list)
    landings: list[str] = field(default_factory=list)
    provider: OAuthClientProvider | None = None

    def __post_init__(self) -> None:
        if self.browser is None:
            self.browser = Browser(self.proxy_url, login_hint=self.login_hint)

    @property
    def consent_pages_seen(self) -> int:
        assert self.browser is not None
        return self.browser.consent_pages_seen

    def new_provider(self) -> OAuthClientProvider:
        metadata = OAuthClientMetadata(
            client_name=self.client_name,
            redirect_uris=[SDK_REDIRECT_URI],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        )
        self.provider = OAuthClientProvider(
            self.resource_url, metadata, self.storage, redirect_handler=self._redirect, callback_handler=self._callback
        )
        return self.provider

    async def _redirect(self, authorization_url: str) -> None:
        self.authorize_urls.append(authorization_url)
        assert self.browser is not None
        landing = await asyncio.to_thread(walk, self.browser, authorization_url, SDK_REDIRECT_URI, self.decision)
        self.landings.append(landing)

    async def _callback(self) -> AuthorizationCodeResult:
        params = query_of(self.landings[-1])
        if "error" in params:
            raise AuthorizationFailed(params)
        return AuthorizationCodeResult(code=params["code"], state=params.get("state"), iss=params.get("iss"))

    @asynccontextmanager
    async def connect(self, mode: str = "auto") -> AsyncIterator[Client]:
        async with (
            httpx2.AsyncClient(auth=self.new_provider(), timeout=30) as http,
            Client(streamable_http_client(self.resource_url, http_client=http), mode=mode) as client,
        ):
            yield client

    async def whoami(self, client: Client) -> dict[str, str]:
        result = await client.call_tool("whoami", {})
        assert result.is_error is False, result
        return {key.lower(): value for key, value in result.structured_content.items()}


def find_cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in an error's group members, causes and contexts (anyio wraps them)."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        stack.extend(getattr(current, "exceptions", ()))
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


# -- gunicorn -------------------------------------------------------------------------------------


def worker_pids(proxy: GunicornProxy) -> set[int]:
    """The gunicorn master's live child processes."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == proxy.process.pid:
            pids.add(int(stat.parent.name))
    return pids


def reload_gunicorn(proxy: GunicornProxy, ready: Callable[[], bool], timeout: float = 20.0) -> None:
    """SIGHUP, as an operator does after editing the routes file: new workers load the new configuration.

    Returns once the new configuration answers and every old worker has exited. An old worker accepts
    connections for up to a second after the signal (its loop checks once a second) and then serves its open
    keep-alive connections, with the old configuration, until they close or GRACEFUL_TIMEOUT passes: callers
    close their pooled connections first.
    """
    old = worker_pids(proxy)
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not old & worker_pids(proxy) and ready():
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not reload within {timeout:.0f} s:\n{proxy.logs()[-3000:]}")


# -- a listener at a client's redirect URI --------------------------------------------------------


class RedirectListener(ThreadingHTTPServer):
    """What a native client runs at its loopback redirect URI: records each callback, answers a short page.

    A real browser needs a real listener: `page.route()` does not catch a redirect to a port where nothing
    listens.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RedirectHandler)
        self.hits: list[str] = []
        self.arrived = threading.Event()

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/callback"

    def last(self) -> dict[str, str]:
        assert self.hits, "nothing arrived at the redirect URI"
        return query_of(self.hits[-1])


class _RedirectHandler(BaseHTTPRequestHandler):
    server: RedirectListener

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/callback":
            self.send_error(404)
            return
        self.server.hits.append(f"{self.server.redirect_uri.rsplit('/callback', 1)[0]}{self.path}")
        self.server.arrived.set()
        body = b"<!doctype html><title>Signed in</title><p>You can close this window.</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(name="redirect_listener")
def redirect_listener_fixture() -> Iterator[RedirectListener]:
    with serving(RedirectListener()) as server:
        yield server


# -- subprocesses ---------------------------------------------------------------------------------


@pytest.fixture(name="conformance_downstream", scope="session")
def conformance_downstream_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleServer]:
    """An MCP server with the tools the conformance suite's server scenarios call."""
    server = launch_module_server("tests.interop.conformance_server", tmp_path_factory.mktemp("conformance-server"))
    yield server
    server.stop()


def which_chromium() -> str:
    """Debian's chromium; installed by scripts/install-test-deps when missing."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("/usr/bin/chromium is missing: run scripts/install-test-deps (or `make install`).")
    return path


CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[ChromiumBrowser]:
    """Debian's chromium under Playwright, one per test file; each test opens its own context (a new profile)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=which_chromium(), headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def viewport() -> dict[str, int]:
    """The browser window `page` opens; a test file whose page needs more room overrides this fixture."""
    return {"width": 1000, "height": 800}


@pytest.fixture
def page(chromium: ChromiumBrowser, viewport: dict[str, int]) -> Iterator[Page]:
    """A fresh browser profile (its own cookies): one person, not yet known to the proxy."""
    context = chromium.new_context(viewport=viewport, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


# -- the MCP TypeScript SDK as a client -----------------------------------------------------------


@dataclass
class TsClientRun:
    """What one run of tests/interop/ts_client.mjs reported, one JSON event per stdout line."""

    events: list[dict[str, Any]]
    returncode: int
    stderr: str
    consent_pages_seen: int

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind!r} event: {self.events}\n{self.stderr[-2000:]}"
        return found[0]


def run_ts_client(
    node: Path,
    mcp_url: str,
    state_file: Path,
    browser: Browser,
    redirect_uri: str,
    decision: str = "approve",
    timeout: float = 60.0,
    **options: Any,
) -> TsClientRun:
    """Run the TypeScript SDK client; walk each authorization URL it prints in `browser`, answer the landing URL."""
    arguments = json.dumps({"url": mcp_url, "redirectUri": redirect_uri, "stateFile": str(state_file), **options})
    process = subprocess.Popen(
        [str(node), str(TS_CLIENT), arguments],
        cwd=INTEROP_DIR,
        env=node_env(),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(timeout, process.kill)  # a hung client fails the test instead of blocking the run
    watchdog.start()
    consents_before = browser.consent_pages_seen
    events: list[dict[str, Any]] = []
    try:
        assert process.stdout is not None and process.stdin is not None
        for line in process.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            events.append(event)
            if event["event"] == "authorize":
                landing = walk(browser, event["url"], redirect_uri, decision)
                process.stdin.write(landing + "\n")
                process.stdin.flush()
        process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read() if process.stderr else ""
    return TsClientRun(events, process.returncode, stderr, browser.consent_pages_seen - consents_before)
