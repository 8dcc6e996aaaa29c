"""The protected MCP endpoints: RFC 9728 metadata, 401/403 challenges, audiences, scopes, Origin, CORS, the token cache."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import event, update

from oauthproxy.crypto import hash_token
from oauthproxy.models import Token, db, utcnow
from tests.conftest import RunningProxy
from tests.flows import Browser, McpOAuthClient
from tests.proxy_fixtures import EchoServer, log_in, write_routes


def challenge(response: requests.Response) -> dict[str, str]:
    header = response.headers["WWW-Authenticate"]
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


@pytest.fixture
def two_routes(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, tmp_path: Path
) -> Callable[..., RunningProxy]:
    """A proxy fronting /mcp/gmail and /mcp/github (both on the echo downstream), with extra route keys."""

    def start(gmail: dict | None = None, github: dict | None = None, **env: str) -> RunningProxy:
        path = write_routes(
            tmp_path / "routes.toml",
            [
                {"name": "gmail", "path": "/mcp/gmail", "url": echo_downstream.url + "/gmail", **(gmail or {})},
                {"name": "github", "path": "/mcp/github", "url": echo_downstream.url + "/github", **(github or {})},
            ],
        )
        return start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=path, **env)

    return start


def test_protected_resource_metadata_per_route_and_at_the_root(two_routes: Callable[..., RunningProxy]) -> None:
    proxy = two_routes()
    issuer = requests.get(proxy.url + "/.well-known/oauth-authorization-server", timeout=5).json()["issuer"]
    for path in ("/mcp/gmail", "/mcp/github"):
        response = requests.get(f"{proxy.url}/.well-known/oauth-protected-resource{path}", timeout=5)
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == "*"  # browser clients read it (AS-16)
        assert response.json() == {
            "resource": proxy.url + path,  # exactly PUBLIC_URL + path
            "authorization_servers": [issuer],  # byte-for-byte the AS issuer
            "scopes_supported": ["openid", "email", "profile"],
            "bearer_methods_supported": ["header"],
            "resource_name": path.rsplit("/", 1)[1],
        }
    root = requests.get(proxy.url + "/.well-known/oauth-protected-resource", timeout=5).json()
    assert root["resource"] == proxy.url + "/mcp/gmail"


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE", "PUT"])
def test_a_request_without_a_token_gets_a_challenge(proxy: RunningProxy, method: str) -> None:
    response = requests.request(method, proxy.url + "/mcp", json={"jsonrpc": "2.0"}, timeout=5)
    assert response.status_code == 401
    params = challenge(response)
    assert params == {
        "scope": "openid email profile",
        "resource_metadata": proxy.url + "/.well-known/oauth-protected-resource/mcp",
    }
    assert "error" not in params  # RFC 6750 §3.1: no error code when no token was sent
    assert response.headers["Cache-Control"] == "no-store"


def test_tokens_are_read_from_the_authorization_header_only(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(proxy.url, proxy.url + "/mcp")
    in_query = requests.get(proxy.url + "/mcp", params={"access_token": login.access_token}, timeout=5)
    assert in_query.status_code == 401 and "error" not in challenge(in_query)
    in_body = requests.post(proxy.url + "/mcp", data={"access_token": login.access_token}, timeout=5)
    assert in_body.status_code == 401
    assert echo_downstream.seen == []
    for header in (f"Basic {login.access_token}", "Bearer", "Bearer not a token", "Bearer " + "x" * 43):
        response = requests.post(proxy.url + "/mcp", headers={"Authorization": header}, timeout=5)
        assert response.status_code == 401, header
        assert challenge(response)["error"] == "invalid_token"
        assert challenge(response)["resource_metadata"] == proxy.url + "/.well-known/oauth-protected-resource/mcp"
    assert echo_downstream.seen == []
    assert (
        requests.post(
            proxy.url + "/mcp", headers={"Authorization": f"bearer {login.access_token}"}, timeout=5
        ).status_code
        == 200
    )  # the scheme is case-insensitive (RFC 7235 §2.1)


def test_expired_and_revoked_tokens_are_refused(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", TOKEN_CACHE_TTL="0")
    url = proxy.url + "/mcp"
    # Two users: a second sign-in of one user through the same (deduplicated) client would replace the first.
    expired, revoked = log_in(proxy.url, url), log_in(proxy.url, url, login_hint="bob")
    with proxy.app.app_context():
        db.session.execute(
            update(Token)
            .where(Token.access_token_hash == hash_token(expired.access_token))
            .values(access_expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
    response = requests.post(url, headers=expired.bearer, timeout=5)
    assert response.status_code == 401
    assert challenge(response)["error"] == "invalid_token"
    assert challenge(response)["error_description"] == "the access token has expired"

    assert requests.post(url, headers=revoked.bearer, timeout=5).status_code == 200
    assert revoked.client.revoke(revoked.access_token).status_code == 200
    response = requests.post(url, headers=revoked.bearer, timeout=5)
    assert response.status_code == 401 and challenge(response)["error_description"] == "the access token was revoked"


def test_a_revocation_takes_effect_within_the_cache_lifetime(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    """Two instances on one database: the one that revokes forgets at once; the other within TOKEN_CACHE_TTL."""
    env = {"MCP_SERVER_URL": echo_downstream.url + "/mcp", "TOKEN_CACHE_TTL": "2"}
    first = start_proxy(**env)
    second = start_proxy(PUBLIC_URL=first.url, **env)  # one public URL, two instances behind it
    second_url = f"http://127.0.0.1:{second.server.server_port}"
    login = log_in(first.url, first.url + "/mcp")
    for base in (first.url, second_url):
        assert requests.post(base + "/mcp", headers=login.bearer, timeout=5).status_code == 200
    revoked_at = time.monotonic()
    revocation = requests.post(
        second_url + "/revoke", data={"token": login.access_token, "client_id": login.client.client_id}, timeout=5
    )
    assert revocation.status_code == 200
    # The instance that revoked forgets the grant at once.
    assert requests.post(second_url + "/mcp", headers=login.bearer, timeout=5).status_code == 401
    # The documented bound: an instance that validated the token in the last TOKEN_CACHE_TTL seconds still
    # honours it, and no longer than that.
    assert requests.post(first.url + "/mcp", headers=login.bearer, timeout=5).status_code == 200
    time.sleep(max(0.0, 2.05 - (time.monotonic() - revoked_at)))
    assert requests.post(first.url + "/mcp", headers=login.bearer, timeout=5).status_code == 401


def test_two_routes_refuse_each_others_tokens(
    two_routes: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = two_routes()
    gmail = log_in(proxy.url, proxy.url + "/mcp/gmail")
    github = log_in(proxy.url, proxy.url + "/mcp/github")
    for login, own, other in ((gmail, "gmail", "github"), (github, "github", "gmail")):
        assert requests.post(f"{proxy.url}/mcp/{own}", headers=login.bearer, timeout=5).status_code == 200
        assert echo_downstream.last().target == f"/{own}"
        for path in (f"/mcp/{other}", f"/mcp/{other}/", f"/mcp/{other}/sub/path"):
            # The token is cached by now: the audience is still checked for every request.
            response = requests.post(proxy.url + path, headers=login.bearer, timeout=5)
            assert response.status_code == 401, path
            params = challenge(response)
            assert params["error"] == "invalid_token"
            assert params["error_description"] == "the access token was issued for another resource"
            assert params["resource_metadata"] == f"{proxy.url}/.well-known/oauth-protected-resource/mcp/{other}"
    assert [seen.target for seen in echo_downstream.seen] == ["/gmail", "/github"]


def test_a_token_without_the_routes_scope_gets_403_naming_the_scope(two_routes: Callable[..., RunningProxy]) -> None:
    proxy = two_routes(gmail={"scopes": ["profile"]})
    url = proxy.url + "/mcp/gmail"
    unauthenticated = requests.post(url, timeout=5)
    assert challenge(unauthenticated)["scope"] == "profile"  # the challenge asks for what the route needs
    narrow = log_in(proxy.url, url, scope="openid email")
    assert narrow.scope == "openid email"
    response = requests.post(url, headers=narrow.bearer, timeout=5)
    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert challenge(response) == {
        "error": "insufficient_scope",
        "error_description": "this resource requires the scope(s): profile",
        "scope": "profile",
        "resource_metadata": proxy.url + "/.well-known/oauth-protected-resource/mcp/gmail",
    }
    broad = log_in(proxy.url, url, scope="openid email profile")
    assert requests.post(url, headers=broad.bearer, timeout=5).status_code == 200


def test_a_route_can_admit_only_some_users(two_routes: Callable[..., RunningProxy]) -> None:
    proxy = two_routes(github={"allowed_email_domains": ["example.org"]})
    url = proxy.url + "/mcp/github"
    # alice@example.com is told at sign-in, before any token exists: the route's list is checked there too.
    client = McpOAuthClient.register(proxy.url)
    browser = Browser(proxy.url, login_hint="alice")
    with pytest.raises(AssertionError, match="403"):
        client.login(browser, resource=url)
    assert "alice@example.com is not allowed to use this server" in browser.last_page.text
    # Through the other route she is let in; that token is refused here (another audience) as before.
    alice = log_in(proxy.url, proxy.url + "/mcp/gmail", login_hint="alice")
    assert requests.post(url, headers=alice.bearer, timeout=5).status_code == 401
    bob = log_in(proxy.url, url, login_hint="bob")  # bob@example.org
    assert requests.post(url, headers=bob.bearer, timeout=5).status_code == 200


def test_a_cached_token_costs_no_database_query(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(proxy.url, proxy.url + "/mcp")
    statements: list[str] = []
    with proxy.app.app_context():
        engine = db.engine

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        if (
            threading.current_thread().name != "audit-flush"
        ):  # the audit trail's batched writes are off the request path
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=5).status_code == 200
        assert len(statements) == 1, statements  # one query joins the token and its grant
        statements.clear()
        for _ in range(5):
            assert requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=5).status_code == 200
        assert statements == []
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_origin_is_checked_and_browser_clients_get_cors(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    inspector = "http://localhost:6274"
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", ALLOWED_ORIGINS=inspector)
    url = proxy.url + "/mcp"
    login = log_in(proxy.url, url)

    foreign = requests.post(url, headers={**login.bearer, "Origin": "http://evil.example"}, timeout=5)
    assert foreign.status_code == 403 and foreign.json()["error"] == "forbidden_origin"
    assert "Access-Control-Allow-Origin" not in foreign.headers
    assert echo_downstream.seen == []

    preflight = requests.options(
        url,
        headers={
            "Origin": inspector,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version, "
            "mcp-session-id, mcp-param-region, x-unlisted",
        },
        timeout=5,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == inspector
    assert "DELETE" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type, mcp-protocol-version, mcp-session-id, mcp-param-region"
    )
    assert echo_downstream.seen == []  # a preflight carries no credentials and is answered here

    expected_exposed = {"WWW-Authenticate", "Mcp-Session-Id", "MCP-Protocol-Version"}
    unauthenticated = requests.post(url, headers={"Origin": inspector}, timeout=5)
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["Access-Control-Allow-Origin"] == inspector
    assert set(unauthenticated.headers["Access-Control-Expose-Headers"].split(", ")) == expected_exposed

    allowed = requests.post(
        url, headers={**login.bearer, "Origin": inspector}, json={"method": "initialize"}, timeout=5
    )
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == inspector and allowed.headers["Vary"] == "Origin"
    assert set(allowed.headers["Access-Control-Expose-Headers"].split(", ")) == expected_exposed
    assert allowed.headers["Mcp-Session-Id"].startswith("downstream-")
    # The proxy's own origin is always allowed; the Origin is never passed on (SDK servers 403 a foreign one).
    assert requests.post(url, headers={**login.bearer, "Origin": proxy.url}, timeout=5).status_code == 200
    assert all(seen.header("Origin") is None for seen in echo_downstream.seen)
