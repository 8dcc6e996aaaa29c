"""Fixtures for the connect step's tests (issue 13): a second real provider as a route's own authorization server,
proxies with per-user-credential routes, and a browser walk through login, consent, the connect page and back.

A pytest plugin, loaded for every test module by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html import unescape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from oauthproxy.components import components
from oauthproxy.models import DownstreamConnection, db
from tests.conftest import RunningProxy
from tests.flows import Browser, McpOAuthClient, hidden_inputs, query_of
from tests.provider_fixture import OidcProvider
from tests.support.servers import serving

ROUTE_PATH = "/mcp/notes"
SECRET_ENV = "NOTES_CONNECTION_SECRET"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
}
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="session")
def connect_provider(start_oidc_provider: Callable[..., OidcProvider]) -> OidcProvider:
    """A second oidc-provider: the authorization server of the route's downstream, not the login provider."""
    return start_oidc_provider()


@dataclass
class ConnectProxy:
    """A proxy with one route whose downstream takes each user's own credential."""

    proxy: RunningProxy
    kind: str
    #: Unique per proxy: the tests share a database, where connections are per user and route name.
    route_name: str
    #: The proxy's client id at `connect_provider` (credential "oauth").
    connection_client_id: str = ""

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def resource(self) -> str:
        return self.proxy.url + ROUTE_PATH

    def client(self) -> McpOAuthClient:
        return McpOAuthClient.register(self.proxy.url, client_name=f"Connect Client {secrets.token_hex(4)}")

    def browser(self, login_hint: str = "alice") -> Browser:
        return Browser(self.proxy.url, login_hint=login_hint)

    def connections(self, user_id: str = "alice") -> list[DownstreamConnection]:
        with self.proxy.app.app_context():
            rows = db.session.query(DownstreamConnection).filter_by(user_id=user_id, route=self.route_name).all()
            db.session.expunge_all()
            return rows

    def connection_secret(self, connection: DownstreamConnection, column: str = "access_token") -> str:
        with self.proxy.app.app_context():
            return components(self.proxy.app).secret_box.decrypt(
                getattr(connection, column), f"connection:{connection.id}:{column}"
            )


def routes_toml(path: Path, name: str, downstream_url: str, kind: str, **options: Any) -> str:
    """A routes file with the one route `name` at ROUTE_PATH; `options` are route keys, `oauth` a table of its own."""
    oauth = options.pop("oauth", None)
    lines = [
        "[[routes]]",
        f'name = "{name}"',
        f'path = "{ROUTE_PATH}"',
        f"url = {json.dumps(downstream_url)}",
        f'credential = "{kind}"',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    if oauth is not None:
        lines.append("[routes.oauth]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in oauth.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def start_connect_proxy(
    start_proxy: Callable[..., RunningProxy], connect_provider: OidcProvider, mcp_downstream, tmp_path: Path
) -> Callable[..., ConnectProxy]:
    """Factory: `start_connect_proxy("oauth" | "user_api_key", url=..., **route_keys)`; the downstream defaults to
    the real MCP server of tests/mcp_downstream.py, the oauth route's authorization server to `connect_provider`."""

    def start(
        kind: str = "oauth", url: str | None = None, env: dict[str, str] | None = None, **keys: Any
    ) -> ConnectProxy:
        unique = secrets.token_hex(6)
        client_id, route_name = f"proxy-connection-{unique}", f"notes-{unique}"
        secret = "connection-secret-" + client_id
        if kind == "oauth":
            keys.setdefault(
                "oauth",
                {"authorize_url": connect_provider.issuer, "client_id": client_id, "client_secret_env": SECRET_ENV},
            )
        routes = routes_toml(tmp_path / f"routes-{unique}.toml", route_name, url or mcp_downstream.url, kind, **keys)
        proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=routes, **{SECRET_ENV: secret}, **(env or {}))
        if kind == "oauth":
            connect_provider.register_client(client_id, secret, [proxy.url + "/connect/callback"])
        return ConnectProxy(proxy, kind, route_name, client_id)

    return start


# --- walking the browser --------------------------------------------------------------------------------------------


def get(session: requests.Session, url: str) -> requests.Response:
    return session.get(url, allow_redirects=False, timeout=15)


def to_connect_page(connect: ConnectProxy, client: McpOAuthClient, browser: Browser) -> str:
    """Authorize (consent, login at the first provider) up to the redirect to the connect page; return its URL."""
    return browser.authorize(client.authorize_url(resource=connect.resource), connect.url + "/connect/")


def form_fields(page: requests.Response) -> dict[str, str]:
    assert page.status_code == 200, (page.status_code, page.text[:800])
    return hidden_inputs(page.text)


def post_form(browser: Browser, url: str, form: dict[str, str]) -> requests.Response:
    return browser.session.post(url, data=form, allow_redirects=False, timeout=30)


def continue_to_provider(browser: Browser, page_url: str) -> str:
    """Press Continue on the (oauth) connect page; return the downstream authorization server's URL."""
    form = form_fields(get(browser.session, page_url))
    response = post_form(browser, page_url, {**form, "decision": "continue"})
    assert response.status_code == 302, (response.status_code, response.text[:800])
    return response.headers["Location"]


def at_connect_callback(browser: Browser, provider_url: str, proxy_url: str, login_hint: str = "alice") -> str:
    """Sign in at the downstream's authorization server; return its redirect to /connect/callback, not followed."""
    walker = Browser(proxy_url, login_hint=login_hint, session=browser.session)
    return walker.authorize(provider_url, proxy_url + "/connect/callback")


def connect_with_oauth(connect: ConnectProxy, client: McpOAuthClient, browser: Browser) -> dict[str, str]:
    """The whole browser flow for an oauth route; return the query the client gets back."""
    page = to_connect_page(connect, client, browser)
    provider_url = continue_to_provider(browser, page)
    return query_of(browser.authorize(provider_url, client.redirect_uri))


def submit_key(browser: Browser, page_url: str, key: str) -> requests.Response:
    form = form_fields(get(browser.session, page_url))
    return post_form(browser, page_url, {**form, "api_key": key})


def page_text(response: requests.Response) -> str:
    """The page's words as a person reads them: tags removed, blanks collapsed."""
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", response.text)))


def mcp_initialize(connect: ConnectProxy, access_token: str) -> requests.Response:
    return requests.post(
        connect.resource,
        json=INITIALIZE,
        headers={**MCP_HEADERS, "Authorization": f"Bearer {access_token}"},
        timeout=15,
    )


# --- a downstream that refuses every key ------------------------------------------------------------------------------


class RefusingDownstream(ThreadingHTTPServer):
    """Answers every request 401, as an MCP server does to a key it does not know; counts what it saw."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RefusingHandler)
        self.keys_seen: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/mcp"


class _RefusingHandler(BaseHTTPRequestHandler):
    server: RefusingDownstream

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.keys_seen.append(self.headers.get("X-API-Key"))
        body = b'{"error": "invalid_token"}'
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_downstream() -> Iterator[RefusingDownstream]:
    with serving(RefusingDownstream()) as server:
        yield server
