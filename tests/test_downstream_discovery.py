"""Route `oauth = "discover"`: the proxy finds a downstream's authorization server as an MCP client would, identifies
itself there once for every worker and restart, and refuses bad metadata with an error an operator can act on.

The happy path runs against real parts: the MCP SDK's resource server (tests/mcp_protected_downstream.py) whose
authorization server is a second oidc-provider with open registration. The bad inputs come from a loopback server
whose every answer the test sets (a downstream and its authorization server in one).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import pytest
import requests
from flask import Flask
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from requests.structures import CaseInsensitiveDict

from oauthproxy import create_app
from oauthproxy.client_metadata import validate_metadata_document
from oauthproxy.connection_providers import CONNECT_CALLBACK_PATH, ConnectionProvider, connection_provider
from oauthproxy.database import rotate_encryption_key, upgrade_database
from oauthproxy.downstream_discovery import (
    CLIENT_METADATA_PATH,
    Answer,
    BoundedHttp,
    ClientIdentity,
    DiscoveredProvider,
    PublicAddressGuard,
    bearer_parameter,
    discover_authorization,
    forget_discovery,
    internal_address_problem,
    parse_challenges,
    store_registration,
    stored_registration,
)
from oauthproxy.models import DownstreamRegistration, db
from oauthproxy.providers import ProviderError
from oauthproxy.routes import Route
from oauthproxy.self_check import SelfCheck
from tests.downstream_auth_fixtures import DOWNSTREAM_SCOPE, ProtectedDownstream, write_routes_toml
from tests.provider_fixture import OidcProvider, follow_redirects_until
from tests.support.databases import SQLITE_ONLY
from tests.support.ports import free_port
from tests.support.servers import serving
from tests.support.settings import TEST_KEY, base_env

HTTPS_PUBLIC_URL = "https://proxy.example.test"


# -- the proxy app with a discover route ------------------------------------------------------------------------------


@dataclass
class DiscoverApp:
    app: Flask
    route: Route

    def provider(self) -> ConnectionProvider:
        with self.app.app_context():
            return connection_provider(self.route)

    def error(self) -> ProviderError:
        """The ProviderError discovery ends with (and nothing else: no other exception escapes)."""
        with self.app.app_context(), pytest.raises(ProviderError) as caught:
            connection_provider(self.route)
        return caught.value

    def forget(self) -> None:
        with self.app.app_context():
            forget_discovery(self.route.name)

    def registrations(self) -> list[DownstreamRegistration]:
        with self.app.app_context():
            rows = db.session.scalars(
                db.select(DownstreamRegistration).where(DownstreamRegistration.route == self.route.name)
            ).all()
            db.session.expunge_all()
            return list(rows)


@pytest.fixture
def discover_app(
    oidc_provider: OidcProvider, database_dsn: str, migrated_databases: set[str], tmp_path: Path
) -> Iterator[Callable[..., DiscoverApp]]:
    """Factory: `make(downstream_url, name=None, **settings)`: the proxy app (not served) with one discover route;
    the same `name` in two apps is one route seen by two instances of one deployment (the same PUBLIC_URL)."""
    apps: list[Flask] = []
    ports: dict[str, int] = {}

    def make(downstream_url: str, name: str | None = None, **overrides: str) -> DiscoverApp:
        name = name or f"disc-{secrets.token_hex(4)}"
        routes_file = write_routes_toml(
            tmp_path / f"routes-{len(apps)}.toml",
            [{"name": name, "path": f"/mcp/{name}", "url": downstream_url, "credential": "oauth", "oauth": "discover"}],
        )
        env = {
            **base_env(ports.setdefault(name, free_port()), oidc_provider, database_dsn, "proxy-discovery"),
            "MCP_ROUTES_FILE": routes_file,
            "PROVIDER_HTTP_TIMEOUT": "2",
            **overrides,
        }
        del env["MCP_SERVER_URL"]
        app = create_app(env)
        if database_dsn not in migrated_databases:
            upgrade_database(app)
            migrated_databases.add(database_dsn)
        apps.append(app)
        return DiscoverApp(app, app.config["SETTINGS"].routes[0])

    yield make
    for app in apps:
        with app.app_context():
            db.engine.dispose()


# -- a downstream and its authorization server whose every answer the test sets ---------------------------------------


Body = dict[str, Any] | list[Any] | bytes | Callable[[Any], Any]


@dataclass
class Canned:
    status: int = 200
    body: Body = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class FakeWorld(ThreadingHTTPServer):
    """A downstream MCP server (POST /mcp) and its authorization server (/as) on one loopback port."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.answers: dict[tuple[str, str], Canned] = {}
        self.hits: list[tuple[str, str]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def downstream_url(self) -> str:
        return self.base + "/mcp"

    @property
    def issuer(self) -> str:
        return self.base + "/as"

    @property
    def resource_metadata_path(self) -> str:
        return "/.well-known/oauth-protected-resource/mcp"

    @property
    def as_metadata_path(self) -> str:
        return "/.well-known/oauth-authorization-server/as"

    def set(self, method: str, path: str, status: int = 200, body: Body = b"", **options: Any) -> None:
        self.answers[(method, path)] = Canned(status, body, **options)

    def hit_count(self, method: str, path: str) -> int:
        return self.hits.count((method, path))

    def document(self, method: str, path: str) -> Any:
        body = self.answers[(method, path)].body
        assert isinstance(body, dict)
        return body

    def healthy(self) -> FakeWorld:
        """What a well-behaved downstream and authorization server answer."""
        self.set(
            "POST",
            "/mcp",
            401,
            {"error": "invalid_token"},
            headers={"WWW-Authenticate": f'Bearer resource_metadata="{self.base}{self.resource_metadata_path}"'},
        )
        self.set(
            "GET",
            self.resource_metadata_path,
            body={
                "resource": self.downstream_url,
                "authorization_servers": [self.issuer],
                "scopes_supported": ["tools"],
                "bearer_methods_supported": ["header"],
            },
        )
        self.set(
            "GET",
            self.as_metadata_path,
            body={
                "issuer": self.issuer,
                "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token",
                "registration_endpoint": self.issuer + "/register",
                "code_challenge_methods_supported": ["S256"],
                "scopes_supported": ["tools", "offline_access"],
                "response_types_supported": ["code"],
            },
        )
        self.set("POST", "/as/register", 201, lambda request: {**request, "client_id": f"fake-{secrets.token_hex(4)}"})
        return self


class _FakeHandler(BaseHTTPRequestHandler):
    server: FakeWorld

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, method: str) -> None:
        path = self.path.split("?")[0]
        self.server.hits.append((method, path))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        canned = self.server.answers.get((method, path), Canned(404, {"error": "not_found"}))
        if canned.delay:
            time.sleep(canned.delay)
        body = canned.body
        if callable(body):
            body = body(json.loads(raw or b"{}"))
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(canned.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in canned.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_DELETE(self) -> None:
        self._answer("DELETE")


@pytest.fixture
def world() -> Iterator[FakeWorld]:
    with serving(FakeWorld()) as server:
        yield server.healthy()


# -- helpers --------------------------------------------------------------------------------------------------------


def connect(found: ConnectionProvider, callback: str, login_hint: str = "alice") -> dict[str, Any]:
    """The connect hop as FLOW's view will run it: authorize at the discovered server (walked by the test provider's
    automatic login and consent), then redeem the code with the stored PKCE verifier and `resource`."""
    url, stored = found.provider.create_authorization_url(
        callback, list(found.scopes), extra_params={**found.authorize_params, "login_hint": login_hint}
    )
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["resource"] == [found.authorize_params["resource"]]
    with requests.Session() as browser:
        browser.trust_env = False
        location = follow_redirects_until(browser, url, callback)
    answer = {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}
    assert answer.get("state") == stored["state"], answer
    tokens, _response = found.provider.redeem_code(answer["code"], callback, stored, found.token_params)
    return {"access_token": tokens.access_token, "refresh_token": tokens.refresh_token}


def whoami(url: str, access_token: str) -> dict[str, Any]:
    """The MCP Python SDK client calls the downstream's `whoami` tool with this access token."""

    async def scenario() -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {access_token}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            result = await client.call_tool("whoami", {})
            assert result.is_error is False, result
            assert isinstance(result.structured_content, dict)
            return result.structured_content

    return anyio.run(scenario)


def registrations_at(provider: OidcProvider) -> int:
    return provider.endpoint_stats()["registration_requests"]


# -- against a real MCP server and its real authorization server ---------------------------------------------------


def test_discovery_finds_the_server_registers_once_and_every_instance_reuses_the_registration(
    discover_app: Callable[..., DiscoverApp],
    protected_downstream: ProtectedDownstream,
    downstream_provider: OidcProvider,
) -> None:
    before = registrations_at(downstream_provider)
    first = discover_app(protected_downstream.url)

    found = first.provider()
    assert found.issuer == downstream_provider.issuer
    assert found.scopes == (DOWNSTREAM_SCOPE, "offline_access")  # the resource's scope, and a refresh token
    assert found.authorize_params == found.token_params == {"resource": protected_downstream.resource}
    assert isinstance(found.provider, DiscoveredProvider)
    assert found.provider.registration_name == f"connection_{first.route.name}"
    assert found.provider.metadata_url == f"{downstream_provider.issuer}/.well-known/oauth-authorization-server"
    client_id = found.provider.client_id
    assert registrations_at(downstream_provider) == before + 1
    [row] = first.registrations()
    assert (row.client_id, row.issuer, row.client_secret) == (client_id, downstream_provider.issuer, None)
    assert "client_secret" not in json.loads(row.metadata_json)

    # The same process answers from memory; after forgetting, it reads the stored registration.
    assert first.provider() is found
    first.forget()
    assert first.provider().provider.client_id == client_id
    # Another instance (or a restart) on the same database: the same client, no second registration.
    second = discover_app(protected_downstream.url, name=first.route.name)
    again = second.provider()
    assert again.provider.client_id == client_id
    assert registrations_at(downstream_provider) == before + 1
    assert len(first.registrations()) == 1

    # The registration works: a user connects, the downstream takes the token, and a refresh keeps it working.
    callback = first.app.config["SETTINGS"].public_url + CONNECT_CALLBACK_PATH
    with second.app.app_context():
        tokens = connect(again, callback)
        assert tokens["refresh_token"]
        assert whoami(protected_downstream.url, tokens["access_token"])["subject"] == "alice"
        refreshed = again.provider.refresh(tokens["refresh_token"])
    assert refreshed.access_token != tokens["access_token"]
    assert whoami(protected_downstream.url, refreshed.access_token)["audience"] == protected_downstream.resource


def test_check_confirms_the_discovered_server_takes_the_connect_callback(
    discover_app: Callable[..., DiscoverApp], protected_downstream: ProtectedDownstream
) -> None:
    app = discover_app(protected_downstream.url)
    client_id = app.provider().provider.client_id
    with app.app.app_context():
        findings = list(SelfCheck(app.app, timeout=5).downstream_authorization(app.route))
    assert [finding.level for finding in findings] == ["ok", "ok", "ok"], findings
    assert f"as the client {client_id} it registered before" in findings[1].message
    assert findings[2].subject == f"route {app.route.name} callback URL"
    assert findings[2].message == "the provider accepted the callback URL (it sent the browser back to it)"


def test_the_first_stored_registration_wins_a_race_between_instances(
    discover_app: Callable[..., DiscoverApp],
) -> None:
    app = discover_app("http://127.0.0.1:9/mcp")
    issuer = "https://as.example.test"
    with app.app.app_context():
        first = store_registration(
            app.route.name,
            issuer,
            ClientIdentity("first", "first-secret", "client_secret_post"),
            {"token_endpoint_auth_method": "client_secret_post"},
            replace=False,
        )
        second = store_registration(
            app.route.name, issuer, ClientIdentity("second"), {"token_endpoint_auth_method": "none"}, replace=False
        )
    assert first.client_id == "first"
    assert (second.client_id, second.client_secret, second.token_endpoint_auth_method, second.source) == (
        "first",
        "first-secret",
        "client_secret_post",
        "stored",
    )
    [row] = app.registrations()
    assert row.client_secret and "first-secret" not in row.client_secret  # sealed


def test_rotate_key_re_encrypts_a_registrations_secret(discover_app: Callable[..., DiscoverApp]) -> None:
    old_key, new_key = TEST_KEY, base64.b64encode(os.urandom(32)).decode()
    callback = "https://proxy.example.test" + CONNECT_CALLBACK_PATH
    registered = {"token_endpoint_auth_method": "client_secret_post", "redirect_uris": [callback]}
    issuer = "https://as.example.test"
    app = discover_app("http://127.0.0.1:9/mcp")
    with app.app.app_context():
        store_registration(
            app.route.name, issuer, ClientIdentity("c", "s3cret", "client_secret_post"), registered, replace=False
        )
    both = discover_app("http://127.0.0.1:9/mcp", name=app.route.name, ENCRYPTION_KEY=f"{new_key},{old_key}")
    with both.app.app_context():
        assert rotate_encryption_key() >= 1
    only_new = discover_app("http://127.0.0.1:9/mcp", name=app.route.name, ENCRYPTION_KEY=new_key)
    with only_new.app.app_context():
        stored = stored_registration(app.route.name, issuer, callback)
    assert stored == ClientIdentity("c", "s3cret", "client_secret_post", "stored")
    # and back, so the shared test database is under the suite's key again
    back = discover_app("http://127.0.0.1:9/mcp", name=app.route.name, ENCRYPTION_KEY=f"{old_key},{new_key}")
    with back.app.app_context():
        assert rotate_encryption_key() >= 1


def test_concurrent_first_uses_walk_the_chain_and_register_once(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    app = discover_app(world.downstream_url)
    results: list[ConnectionProvider] = []

    def use() -> None:
        results.append(app.provider())

    threads = [threading.Thread(target=use) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 6 and len({id(result) for result in results}) == 1
    assert world.hit_count("POST", "/as/register") == 1
    assert world.hit_count("POST", "/mcp") == 1


def test_a_registration_for_another_callback_is_replaced(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    """PUBLIC_URL changed since the registration: its redirect URI is no longer the callback, so register again."""
    first = discover_app(world.downstream_url)
    old_client = first.provider().provider.client_id
    moved = discover_app(world.downstream_url, name=first.route.name, PUBLIC_URL="http://127.0.0.1:1")
    new_client = moved.provider().provider.client_id
    assert new_client != old_client
    assert world.hit_count("POST", "/as/register") == 2
    [row] = first.registrations()
    assert row.client_id == new_client
    assert json.loads(row.metadata_json)["redirect_uris"] == ["http://127.0.0.1:1" + CONNECT_CALLBACK_PATH]


def test_check_walks_the_chain_and_says_how_the_proxy_will_identify_itself(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    app = discover_app(world.downstream_url)
    check = SelfCheck(app.app, timeout=2)
    with app.app.app_context():
        before = list(check.downstream_authorization(app.route))
    assert [finding.level for finding in before] == ["ok", "ok"]
    assert world.issuer in before[0].message and "scopes: tools" in before[0].message
    assert "registering at " + world.issuer + "/register on first use" in before[1].message
    assert world.hit_count("POST", "/as/register") == 0  # the check registers nothing

    client_id = app.provider().provider.client_id
    with app.app.app_context():
        after = list(check.downstream_authorization(app.route))
    assert f"as the client {client_id} it registered before" in after[1].message

    world.set("GET", world.as_metadata_path, body={**world.document("GET", world.as_metadata_path), "issuer": "x"})
    with app.app.app_context():
        [failed] = list(check.downstream_authorization(app.route))
    assert failed.level == "fail" and "RFC 8414" in failed.message


def test_check_reports_the_downstream_401_as_expected_for_a_discover_route(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    app = discover_app(world.downstream_url)
    with app.app.app_context():
        [finding] = list(SelfCheck(app.app, timeout=2).downstream(app.route))
    assert finding.level == "ok" and "as expected" in finding.message


# -- the proxy's client metadata document -------------------------------------------------------------------------


@SQLITE_ONLY
def test_the_client_metadata_document_is_served_and_valid(discover_app: Callable[..., DiscoverApp]) -> None:
    app = discover_app("http://127.0.0.1:9/mcp", PUBLIC_URL=HTTPS_PUBLIC_URL)
    response = app.app.test_client().get(CLIENT_METADATA_PATH)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    document = response.get_json()
    url = HTTPS_PUBLIC_URL + CLIENT_METADATA_PATH
    assert document == {
        "client_id": url,
        "client_name": "oauthproxy at proxy.example.test",
        "client_uri": HTTPS_PUBLIC_URL,
        "redirect_uris": [HTTPS_PUBLIC_URL + CONNECT_CALLBACK_PATH],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    # What an authorization server checks (the proxy's own checks, as an MCP client's document): it passes.
    validate_metadata_document(url, document)
    assert app.app.test_client().post(CLIENT_METADATA_PATH).status_code == 405


@SQLITE_ONLY
def test_a_server_taking_metadata_documents_gets_the_documents_url_as_client_id(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    metadata = world.document("GET", world.as_metadata_path)
    world.set("GET", world.as_metadata_path, body={**metadata, "client_id_metadata_document_supported": True})
    app = discover_app(world.downstream_url, PUBLIC_URL=HTTPS_PUBLIC_URL)
    found = app.provider()
    assert found.provider.client_id == HTTPS_PUBLIC_URL + CLIENT_METADATA_PATH
    assert found.provider.client_secret == ""
    assert world.hit_count("POST", "/as/register") == 0
    assert app.registrations() == []


@SQLITE_ONLY
def test_over_plain_http_the_proxy_registers_even_where_metadata_documents_are_taken(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    metadata = world.document("GET", world.as_metadata_path)
    world.set("GET", world.as_metadata_path, body={**metadata, "client_id_metadata_document_supported": True})
    found = discover_app(world.downstream_url).provider()
    assert found.provider.client_id.startswith("fake-")
    assert world.hit_count("POST", "/as/register") == 1


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("takes_documents", "public_url", "expected"),
    [
        (False, HTTPS_PUBLIC_URL, "advertises no client_id_metadata_document_supported"),
        (True, None, "PUBLIC_URL (http://127.0.0.1:"),
    ],
)
def test_without_registration_or_a_usable_metadata_document_the_error_says_what_is_missing(
    discover_app: Callable[..., DiscoverApp],
    world: FakeWorld,
    takes_documents: bool,
    public_url: str | None,
    expected: str,
) -> None:
    metadata = dict(world.document("GET", world.as_metadata_path))
    del metadata["registration_endpoint"]
    metadata["client_id_metadata_document_supported"] = takes_documents
    world.set("GET", world.as_metadata_path, body=metadata)
    app = discover_app(world.downstream_url, **({"PUBLIC_URL": public_url} if public_url else {}))
    error = app.error()
    assert error.kind == "misconfigured"
    assert "no registration_endpoint" in error.description and expected in error.description


# -- the well-known fallbacks and the challenge's parsing ------------------------------------------------------------


def test_challenges_are_parsed_robustly() -> None:
    header = 'Basic realm="a, b", Bearer error="invalid_token", RESOURCE_METADATA="https://x/m?a=\\"1\\"", scope=s'
    assert parse_challenges(header) == [
        ("basic", {"realm": "a, b"}),
        ("bearer", {"error": "invalid_token", "resource_metadata": 'https://x/m?a="1"', "scope": "s"}),
    ]
    assert (
        bearer_parameter("Negotiate abc==, Bearer resource_metadata=https://x/m", "resource_metadata") == "https://x/m"
    )
    for garbage in ("", "=", '"', "Bearer", 'Bearer resource_metadata="', 'Bearer ,,,=,="', "\x00\xff" * 100, "a=b"):
        assert bearer_parameter(garbage, "resource_metadata") is None
    assert (
        bearer_parameter('Bearer scope="x", resource_metadata="a", resource_metadata="b"', "resource_metadata") == "a"
    )


@SQLITE_ONLY
@pytest.mark.parametrize(
    "challenge",
    [
        None,
        "Bearer",
        'Bearer resource_metadata="unterminated',
        "Bearer resource_metadata=/relative/path",
        "Bearer resource_metadata=ftp://127.0.0.1/x",
        "Bearer resource_metadata=http://metadata.example.test/x",  # plain http on another host
        "\x7f garbage ,,, = \"'",
    ],
)
def test_without_a_usable_challenge_the_well_known_metadata_is_found(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld, challenge: str | None
) -> None:
    world.set("POST", "/mcp", 401, {}, headers={"WWW-Authenticate": challenge} if challenge is not None else {})
    found = discover_app(world.downstream_url).provider()
    assert found.issuer == world.issuer
    assert world.hit_count("GET", world.resource_metadata_path) == 1


@SQLITE_ONLY
def test_the_root_metadata_is_tried_last_and_names_a_parent_resource(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    document = world.document("GET", world.resource_metadata_path)
    world.answers.pop(("GET", world.resource_metadata_path))
    world.set("GET", "/.well-known/oauth-protected-resource", body={**document, "resource": world.base + "/"})
    world.set("POST", "/mcp", 401, {})
    found = discover_app(world.downstream_url).provider()
    assert found.authorize_params == {"resource": world.base + "/"}
    assert world.hits[:3] == [
        ("POST", "/mcp"),
        ("GET", world.resource_metadata_path),
        ("GET", "/.well-known/oauth-protected-resource"),
    ]


@SQLITE_ONLY
def test_an_issuer_without_a_path_is_found_by_oidc_discovery_after_rfc_8414(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    metadata = world.document("GET", world.as_metadata_path)
    world.answers.pop(("GET", world.as_metadata_path))
    world.set("GET", "/.well-known/openid-configuration", body={**metadata, "issuer": world.base})
    prm = world.document("GET", world.resource_metadata_path)
    world.set("GET", world.resource_metadata_path, body={**prm, "authorization_servers": [world.base]})
    found = discover_app(world.downstream_url).provider()
    assert found.issuer == world.base
    assert ("GET", "/.well-known/oauth-authorization-server") in world.hits
    assert found.provider.metadata_url == world.base + "/.well-known/openid-configuration"


# -- bad inputs: each a clear error ---------------------------------------------------------------------------------


def _prm(world: FakeWorld, **changes: Any) -> None:
    world.set(
        "GET", world.resource_metadata_path, body={**world.document("GET", world.resource_metadata_path), **changes}
    )


def _as(world: FakeWorld, **changes: Any) -> None:
    metadata = {**world.document("GET", world.as_metadata_path), **changes}
    world.set("GET", world.as_metadata_path, body={k: v for k, v in metadata.items() if v is not None})


BAD_INPUTS: dict[str, tuple[Callable[[FakeWorld], None], str, str]] = {
    "resource of another server": (
        lambda w: _prm(w, resource="http://127.0.0.1:1/mcp"),
        "misconfigured",
        "describes the resource 'http://127.0.0.1:1/mcp', not the downstream",
    ),
    "resource of a sibling path": (
        lambda w: _prm(w, resource=w.base + "/mc"),
        "misconfigured",
        "RFC 9728 §3.3",
    ),
    "resource with a fragment": (
        lambda w: _prm(w, resource=w.downstream_url + "#x"),
        "misconfigured",
        "RFC 9728 §3.3",
    ),
    "no authorization server": (
        lambda w: _prm(w, authorization_servers=[]),
        "misconfigured",
        "names no authorization server",
    ),
    "plain http authorization server off loopback": (
        lambda w: _prm(w, authorization_servers=["http://auth.example.test"]),
        "misconfigured",
        "'http://auth.example.test', which is not an https URL",
    ),
    "scopes not a list of scope names": (
        lambda w: _prm(w, scopes_supported=["ok", 'bad"scope']),
        "misconfigured",
        "scopes_supported",
    ),
    "no PKCE S256": (
        lambda w: _as(w, code_challenge_methods_supported=["plain"]),
        "misconfigured",
        "does not list S256 in code_challenge_methods_supported",
    ),
    "PKCE methods not advertised": (
        lambda w: _as(w, code_challenge_methods_supported=None),
        "misconfigured",
        "MCP requires PKCE S256",
    ),
    "plain http token endpoint off loopback": (
        lambda w: _as(w, token_endpoint="http://auth.example.test/token"),
        "misconfigured",
        "token_endpoint 'http://auth.example.test/token' must be an https URL",
    ),
    "plain http registration endpoint off loopback": (
        lambda w: _as(w, registration_endpoint="http://auth.example.test/register"),
        "misconfigured",
        "registration_endpoint 'http://auth.example.test/register' is not an https URL",
    ),
    "another server's metadata": (
        lambda w: _as(w, issuer="https://evil.example.test"),
        "misconfigured",
        "names the issuer 'https://evil.example.test', not",
    ),
    "no token endpoint": (lambda w: _as(w, token_endpoint=None), "misconfigured", "no token_endpoint"),
    "oversized resource metadata": (
        lambda w: _prm(w, padding="x" * 70_000),
        "misconfigured",
        "larger than 65536 bytes",
    ),
    "oversized metadata without a length": (
        lambda w: w.set("GET", w.as_metadata_path, body=b"{" + b" " * 70_000),
        "misconfigured",
        "larger than 65536 bytes",
    ),
    "resource metadata not JSON": (
        lambda w: w.set("GET", w.resource_metadata_path, body=b"<html>hello</html>"),
        "misconfigured",
        "/.well-known/oauth-protected-resource/mcp (not JSON)",
    ),
    "resource metadata nested too deep": (
        lambda w: w.set("GET", w.resource_metadata_path, body=b"[" * 60_000),
        "misconfigured",
        "(not JSON)",
    ),
    "resource metadata a JSON array": (
        lambda w: w.set("GET", w.resource_metadata_path, body=[w.downstream_url]),
        "misconfigured",
        "(not a JSON object)",
    ),
    "resource metadata without a resource": (
        lambda w: w.set("GET", w.resource_metadata_path, body={"authorization_servers": [w.issuer]}),
        "misconfigured",
        "(names no resource)",
    ),
    "authorization server metadata not JSON": (
        lambda w: w.set("GET", w.as_metadata_path, body=b"\xff\xfe garbage"),
        "misconfigured",
        "/.well-known/oauth-authorization-server/as (not JSON)",
    ),
    "a garbage challenge and no metadata": (
        lambda w: (
            w.set("POST", "/mcp", 401, {}, headers={"WWW-Authenticate": 'Bearer resource_metadata="x'}),
            w.answers.pop(("GET", w.resource_metadata_path)),
        ),
        "misconfigured",
        "answered an unauthenticated initialize with HTTP 401 without a Bearer resource_metadata challenge, and no "
        "protected resource metadata (RFC 9728) was found",
    ),
    "a downstream without authorization": (
        lambda w: (w.set("POST", "/mcp", 200, {}), w.answers.pop(("GET", w.resource_metadata_path))),
        "misconfigured",
        "with HTTP 200, and no protected resource metadata",
    ),
    "registration refused": (
        lambda w: w.set(
            "POST",
            "/as/register",
            400,
            {"error": "invalid_client_metadata", "error_description": "redirect_uris not allowed"},
        ),
        "misconfigured",
        "failed with HTTP 400: invalid_client_metadata (redirect_uris not allowed)",
    ),
    "registration without a client id": (
        lambda w: w.set("POST", "/as/register", 201, {"client_secret": "s"}),
        "misconfigured",
        "without a usable client_id",
    ),
    "registration unavailable": (
        lambda w: w.set("POST", "/as/register", 503, b"busy"),
        "transient",
        "failed with HTTP 503",
    ),
    "downstream failing": (lambda w: w.set("POST", "/mcp", 502, b"bad gateway"), "transient", "HTTP 502"),
    "resource metadata failing": (
        lambda w: (w.set("POST", "/mcp", 401, {}), w.set("GET", w.resource_metadata_path, 503, b"")),
        "transient",
        "(HTTP 503)",
    ),
    "authorization server metadata failing": (
        lambda w: w.set("GET", w.as_metadata_path, 500, b""),
        "transient",
        "could not load the metadata of the authorization server",
    ),
    "resource metadata slower than the timeout": (
        lambda w: w.set("GET", w.resource_metadata_path, body=w.document("GET", w.resource_metadata_path), delay=2.5),
        "transient",
        "could not reach the protected resource metadata",
    ),
}


@SQLITE_ONLY
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_end_in_a_clear_error(discover_app: Callable[..., DiscoverApp], world: FakeWorld, case: str) -> None:
    spoil, kind, words = BAD_INPUTS[case]
    spoil(world)
    app = discover_app(world.downstream_url, PROVIDER_HTTP_TIMEOUT="1")
    started = time.monotonic()
    error = app.error()
    assert time.monotonic() - started < 5
    assert error.kind == kind, error.description
    assert words in error.description, error.description
    assert app.registrations() == []


@SQLITE_ONLY
def test_a_downstream_that_is_down_is_a_transient_failure_remembered_briefly(
    discover_app: Callable[..., DiscoverApp], world: FakeWorld
) -> None:
    down = f"http://127.0.0.1:{free_port()}/mcp"
    app = discover_app(down)
    error = app.error()
    assert error.kind == "transient" and f"could not reach the downstream MCP server at {down}" in error.description

    # A failure is answered from memory for a few seconds, then the chain is walked again.
    spoiled = discover_app(world.downstream_url)
    world.set("POST", "/mcp", 503, b"")
    assert spoiled.error().kind == "transient"
    world.healthy()
    assert spoiled.error().kind == "transient"
    assert world.hit_count("POST", "/mcp") == 1
    spoiled.forget()
    assert spoiled.provider().issuer == world.issuer


# -- a remote downstream's metadata may not send the proxy to an internal address (blind SSRF) -----------------------


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("[::1]", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # an IPv4-mapped spelling reaches the same place
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud instance metadata
        ("fe80::1", "link-local"),
        ("[fe80::1%25eth0]", "zone id"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "not publicly routable"),  # carrier-grade NAT
        ("localhost", "loopback"),
        ("127.1", "resolves to 127.0.0.1, a loopback"),  # only the resolver reads it as an address: it is resolved
    ],
)
def test_internal_addresses_are_refused(host: str, kind: str) -> None:
    problem = internal_address_problem(host, timeout=5)
    assert problem is not None and kind in problem, problem


@pytest.mark.parametrize("host", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "[2606:4700:4700::1111]"])
def test_public_address_literals_pass(host: str) -> None:
    assert internal_address_problem(host, timeout=5) is None


def fake_resolver(monkeypatch: pytest.MonkeyPatch, names: dict[str, list[str]], delay: float = 0.0) -> list[str]:
    """socket.getaddrinfo answering `names` (a name not listed: unknown); returns the names asked for."""
    asked: list[str] = []

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        asked.append(host)
        time.sleep(delay)
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in names[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_name_is_refused_when_any_of_its_addresses_is_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(
        monkeypatch,
        {
            "public.example": ["93.184.215.14", "2606:4700:4700::1111"],
            "rebound.example": ["93.184.215.14", "10.0.0.7"],
            "metadata.example": ["169.254.169.254"],
        },
    )
    assert internal_address_problem("public.example", timeout=5) is None
    assert "resolves to 10.0.0.7, a private address" in str(internal_address_problem("rebound.example", timeout=5))
    assert "resolves to 169.254.169.254, a link-local" in str(internal_address_problem("metadata.example", timeout=5))
    # A name that does not resolve cannot be reached either: retry later, as for a request that fails.
    with pytest.raises(ProviderError) as unknown:
        internal_address_problem("unknown.example", timeout=5)
    assert unknown.value.kind == "transient" and "could not resolve unknown.example" in str(unknown.value)


def test_resolution_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, {"slow.example": ["93.184.215.14"]}, delay=3)
    started = time.monotonic()
    with pytest.raises(ProviderError) as slow:
        internal_address_problem("slow.example", timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert slow.value.kind == "transient" and "took longer than 0.3 s" in str(slow.value)


def test_the_guard_applies_only_to_a_downstream_on_a_public_address() -> None:
    internal = "https://10.0.0.7/token"
    assert PublicAddressGuard("http://127.0.0.1:8000/mcp", timeout=5).problem(internal) is None
    assert PublicAddressGuard("http://localhost:8000/mcp", timeout=5).problem(internal) is None
    remote = PublicAddressGuard("https://93.184.215.14/mcp", timeout=5)
    assert "is a private address" in str(remote.problem(internal))
    assert "is a loopback host" in str(remote.problem("http://127.0.0.1:9000/token"))
    # The downstream's own host is the operator's choice, whatever its address.
    assert PublicAddressGuard("https://10.0.0.5/mcp", timeout=5).problem("https://10.0.0.5/.well-known/x") is None
    # A downstream inside a private network may have its authorization server there too (an internal Keycloak).
    assert PublicAddressGuard("https://10.0.0.5/mcp", timeout=5).problem("https://10.0.0.6/realms/x") is None


class CannedHttp(BoundedHttp):
    """The one fetch function discovery uses, answering from `answers` by (method, URL), recording every request:
    a downstream on a public address cannot be reached from the tests, and what is checked here is pure logic."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, dict[str, str], Any]]):
        super().__init__(timeout=5, ca_bundle=None, budget=15)
        self.answers = answers
        self.sent: list[tuple[str, str]] = []

    def request(self, method: str, url: str, what: str, **kwargs: Any) -> Answer:
        self.sent.append((method, url))
        status, headers, body = self.answers.get((method, url), (404, {}, {"error": "not_found"}))
        return Answer(status, CaseInsensitiveDict(headers), json.dumps(body).encode())


REMOTE = "https://mcp.example/mcp"
REMOTE_PRM = "https://mcp.example/.well-known/oauth-protected-resource/mcp"
REMOTE_ISSUER = "https://auth.example"


def remote_world(
    resource_metadata: str = REMOTE_PRM, issuer: str = REMOTE_ISSUER, **endpoints: str
) -> dict[tuple[str, str], tuple[int, dict[str, str], Any]]:
    """A remote downstream and its authorization server, as their documents say; `endpoints` override the AS's."""
    metadata = {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token",
        "registration_endpoint": issuer + "/register",
        "revocation_endpoint": issuer + "/revoke",
        "code_challenge_methods_supported": ["S256"],
        "response_types_supported": ["code"],
        **endpoints,
    }
    return {
        ("POST", REMOTE): (401, {"WWW-Authenticate": f'Bearer resource_metadata="{resource_metadata}"'}, {}),
        ("GET", resource_metadata): (200, {}, {"resource": REMOTE, "authorization_servers": [issuer]}),
        ("GET", issuer + "/.well-known/oauth-authorization-server"): (200, {}, metadata),
    }


@pytest.fixture
def public_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return fake_resolver(monkeypatch, {"mcp.example": ["93.184.215.14"], "auth.example": ["93.184.215.15"]})


def test_a_remote_downstream_with_public_metadata_is_discovered(public_names: list[str]) -> None:
    http = CannedHttp(remote_world())
    found = discover_authorization(REMOTE, timeout=5, ca_bundle=None, http=http)
    assert found.issuer == REMOTE_ISSUER and found.metadata["token_endpoint"] == REMOTE_ISSUER + "/token"
    # Each resolved once per walk: the downstream's own host (public, so the guard applies), then the issuer's.
    assert public_names == ["mcp.example", "auth.example"]


@pytest.mark.parametrize(
    ("world", "refused"),
    [
        (remote_world(resource_metadata="http://127.0.0.1:8080/prm"), "resource_metadata 'http://127.0.0.1:8080/prm'"),
        (remote_world(issuer="http://127.0.0.1:9000"), "authorization server 'http://127.0.0.1:9000'"),
        (remote_world(issuer="https://169.254.169.254"), "authorization server 'https://169.254.169.254'"),
        (remote_world(token_endpoint="http://127.0.0.1:9000/token"), "token_endpoint 'http://127.0.0.1:9000/token'"),
        (remote_world(registration_endpoint="https://10.0.0.7/register"), "registration_endpoint"),
        (remote_world(revocation_endpoint="https://[fd00::1]/revoke"), "revocation_endpoint"),
        (remote_world(authorization_endpoint="https://192.168.1.1/authorize"), "authorization_endpoint"),
        (remote_world(token_endpoint="https://localhost/token"), "token_endpoint 'https://localhost/token'"),
    ],
)
def test_a_remote_downstreams_metadata_may_not_name_an_internal_address(
    public_names: list[str], world: dict[tuple[str, str], tuple[int, dict[str, str], Any]], refused: str
) -> None:
    http = CannedHttp(world)
    with pytest.raises(ProviderError) as error:
        discover_authorization(REMOTE, timeout=5, ca_bundle=None, http=http)
    assert error.value.kind == "misconfigured"
    assert refused in str(error.value) and "is not on loopback" in str(error.value), error.value
    # Refused before anything was sent there.
    internal = ("127.0.0.1", "169.254.169.254", "10.0.0.7", "fd00::1", "192.168.1.1", "localhost")
    assert not [url for _, url in http.sent if any(host in url for host in internal)], http.sent
