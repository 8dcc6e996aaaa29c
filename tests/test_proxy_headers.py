"""Header rules, asserted on the wire at the downstream: removal, identity, credential modes, injection, MCP headers."""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from flask import Flask
from sqlalchemy import select, update

from oauthproxy import create_app
from oauthproxy.components import components
from oauthproxy.crypto import hash_token
from oauthproxy.models import Grant, Token, db
from tests.conftest import RunningProxy
from tests.proxy_fixtures import EchoServer, GunicornProxy, log_in, write_routes

AUTH_HEADERS = {
    "authorization",
    "x-api-key",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-name",
    "x-forwarded-access-token",
}


@dataclass
class Front:
    """The proxy under test, in-process (werkzeug) or under gunicorn with the gevent worker."""

    url: str
    app: Flask


@pytest.fixture(params=["werkzeug", "gunicorn"])
def serve(
    request: pytest.FixtureRequest,
    start_proxy: Callable[..., RunningProxy],
    start_gunicorn: Callable[..., GunicornProxy],
) -> Iterator[Callable[..., Front]]:
    apps: list[Flask] = []

    def start(**env: str) -> Front:
        if request.param == "werkzeug":
            running = start_proxy(**env)
            return Front(running.url, running.app)
        gunicorn = start_gunicorn(**env)
        app = create_app(gunicorn.env)  # same settings and database, to look at rows from the test
        apps.append(app)
        return Front(gunicorn.url, app)

    yield start
    for app in apps:
        with app.app_context():
            db.engine.dispose()


def grant_of(app: Flask, access_token: str) -> Grant:
    with app.app_context():
        token = db.session.scalar(select(Token).where(Token.access_token_hash == hash_token(access_token)))
        grant = db.session.get(Grant, token.grant_id)
        db.session.expunge(grant)
        return grant


def upstream_token_of(app: Flask, access_token: str) -> str:
    grant = grant_of(app, access_token)
    with app.app_context():
        return components(app).secret_box.decrypt(
            grant.upstream_access_token, f"grant:{grant.id}:upstream_access_token"
        )


def test_header_rules_on_the_wire(serve: Callable[..., Front], echo_downstream: EchoServer) -> None:
    front = serve(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(front.url, front.url + "/mcp")
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search"}}'
    session = requests.post(
        front.url + "/mcp", headers=login.bearer, json={"jsonrpc": "2.0", "id": 0, "method": "initialize"}, timeout=10
    ).headers["Mcp-Session-Id"]
    sent = {
        **login.bearer,
        # spoofing attempts: identity and forwarding headers are the proxy's to set
        "X-Forwarded-User": "mallory",
        "X-Forwarded-Email": "mallory@evil.example",
        "X-Forwarded-Name": "Mallory",
        "X-Forwarded-Access-Token": "stolen",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=203.0.113.9",
        "X-Real-IP": "203.0.113.9",
        "X_Forwarded_User": "mallory-underscore",
        # hop-by-hop, including one named by Connection
        "Connection": "keep-alive, X-Hop-Custom",
        "X-Hop-Custom": "hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "websocket",
        "Proxy-Authorization": "Basic cHJveHk6cHc=",
        "Origin": front.url,
        # MCP headers pass untouched
        "Mcp-Session-Id": session,
        "MCP-Protocol-Version": "2025-06-18",
        "Last-Event-ID": "42",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "search",
        "Mcp-Param-Region": "eu-west",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "Cookie": "oauthproxy-session=proxy-secret; theme=dark; oauthproxy-consent=also-secret",
        "X-Custom": "kept",
    }
    response = requests.post(front.url + "/mcp/sub/path?x=1&access_token=leak&y=2", data=body, headers=sent, timeout=10)
    assert response.status_code == 200, response.text
    seen = echo_downstream.last()

    assert seen.target == "/mcp/sub/path?x=1&y=2"  # sub-path and query pass; a query token never does
    assert seen.body == body and seen.header("Content-Length") == str(len(body))
    assert seen.header("Authorization") is None  # the client's token is never passed on (MCP P-6)
    assert login.access_token not in str(seen.headers)
    assert seen.header("X-Forwarded-User") == "alice"
    assert seen.header("X-Forwarded-Email") == "alice@example.com"
    assert seen.header("X-Forwarded-Name") == "Alice Liddell"
    # The user's provider token goes only to routes that ask for it (forward_access_token, upstream_token).
    assert seen.header("X-Forwarded-Access-Token") is None
    assert upstream_token_of(front.app, login.access_token) not in str(seen.headers)
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Host") == front.url.split("//", 1)[1]
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("Host") == echo_downstream.url.split("//", 1)[1]  # the downstream's own Host
    for name in (
        "Forwarded",
        "X-Real-IP",
        "X_Forwarded_User",
        "Origin",
        "Keep-Alive",
        "TE",
        "Upgrade",
        "Proxy-Authorization",
        "X-Hop-Custom",
        "Transfer-Encoding",
    ):
        assert seen.header(name) is None, name
    assert seen.header("Connection") in (None, "keep-alive")  # requests' own connection handling, nothing else
    for name in (
        "Mcp-Session-Id",
        "MCP-Protocol-Version",
        "Last-Event-ID",
        "Mcp-Method",
        "Mcp-Name",
        "Mcp-Param-Region",
        "Content-Type",
        "Accept",
        "X-Custom",
    ):
        assert seen.header(name) == sent[name], name
    assert seen.header("Cookie") == "theme=dark"  # the proxy's own cookies stay with the proxy

    # Back to the client: MCP headers and the downstream's own headers, no hop-by-hop ones, no buffering.
    assert response.headers["Mcp-Session-Id"] == session
    assert response.headers["MCP-Protocol-Version"] == "2025-11-25"
    assert response.headers["X-Downstream-Custom"] == "kept"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Keep-Alive" not in response.headers and "X-Hop-Secret" not in response.headers


def test_the_upstream_token_sent_downstream_works_at_the_provider(
    serve: Callable[..., Front], echo_downstream: EchoServer, oidc_provider
) -> None:
    front = serve(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_FORWARD_ACCESS_TOKEN="true")
    login = log_in(front.url, front.url + "/mcp", login_hint="bob")
    assert requests.post(front.url + "/mcp", headers=login.bearer, timeout=10).status_code == 200
    token = echo_downstream.last().header("X-Forwarded-Access-Token")
    me = requests.get(oidc_provider.url("/me"), headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert me.status_code == 200 and me.json()["email"] == "bob@example.org"


def test_each_credential_mode_puts_exactly_the_configured_headers_on_the_wire(
    serve: Callable[..., Front], echo_downstream: EchoServer, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("file-api-key-123\n")
    modes = {
        "identity": {},  # the default: identity headers only
        "identity-token": {"forward_access_token": True},
        "upstream": {"credential": "upstream_token", "identity_headers": False},
        "upstream-identity": {"credential": "upstream_token"},
        "upstream-identity-no-token": {"credential": "upstream_token", "forward_access_token": False},
        "static-bearer": {"credential": "static", "credential_env": "TEST_DOWNSTREAM_TOKEN", "identity_headers": False},
        "static-key-identity": {
            "credential": "static",
            "credential_header": "X-API-Key",
            "credential_file": str(key_file),
        },
        "static-key-token": {
            "credential": "static",
            "credential_header": "X-API-Key",
            "credential_file": str(key_file),
            "forward_access_token": "yes",
        },
        "nothing": {"identity_headers": False},
    }
    routes = write_routes(
        tmp_path / "routes.toml",
        [
            {"name": name, "path": f"/mcp/{name}", "url": f"{echo_downstream.url}/{name}", **options}
            for name, options in modes.items()
        ],
    )
    front = serve(MCP_SERVER_URL="", MCP_ROUTES_FILE=routes, TEST_DOWNSTREAM_TOKEN="static-token-456")
    identity = {
        "x-forwarded-user": "alice",
        "x-forwarded-email": "alice@example.com",
        "x-forwarded-name": "Alice Liddell",
    }
    for name in modes:
        login = log_in(front.url, f"{front.url}/mcp/{name}")
        upstream = upstream_token_of(front.app, login.access_token)
        expected = {
            "identity": identity,  # a static key or plain identity route never sees the user's provider token
            "identity-token": {**identity, "x-forwarded-access-token": upstream},
            "upstream": {"authorization": f"Bearer {upstream}"},
            "upstream-identity": {
                **identity,
                "x-forwarded-access-token": upstream,
                "authorization": f"Bearer {upstream}",
            },
            "upstream-identity-no-token": {**identity, "authorization": f"Bearer {upstream}"},
            "static-bearer": {"authorization": "Bearer static-token-456"},
            "static-key-identity": {**identity, "x-api-key": "file-api-key-123"},
            "static-key-token": {**identity, "x-forwarded-access-token": upstream, "x-api-key": "file-api-key-123"},
            "nothing": {},
        }[name]
        # The client tries to supply the credential headers itself; only the configured ones may arrive.
        response = requests.post(
            f"{front.url}/mcp/{name}", headers={**login.bearer, "X-API-Key": "client-key"}, timeout=10
        )
        assert response.status_code == 200, (name, response.text)
        seen = echo_downstream.last()
        assert seen.target == f"/{name}"
        arrived = {header.lower(): value for header, value in seen.headers if header.lower() in AUTH_HEADERS}
        assert len(arrived) == len([h for h, _ in seen.headers if h.lower() in AUTH_HEADERS]), name  # no duplicates
        if not name.startswith("static-key"):
            expected = {**expected, "x-api-key": "client-key"}  # an ordinary header where the route sets none
        assert arrived == expected, name
        assert seen.header("X-Forwarded-Proto") == "http"  # forwarding headers are not identity: always there
        # The proxy's own answers never show a static secret.
        for own in (
            requests.post(f"{front.url}/mcp/{name}", timeout=10),
            requests.get(f"{front.url}/.well-known/oauth-protected-resource/mcp/{name}", timeout=10),
        ):
            assert "static-token-456" not in own.text + str(own.headers)
            assert "file-api-key-123" not in own.text + str(own.headers)


def test_identity_header_values_cannot_inject_headers(serve: Callable[..., Front], echo_downstream: EchoServer) -> None:
    front = serve(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(front.url, front.url + "/mcp")
    grant = grant_of(front.app, login.access_token)
    with front.app.app_context():  # as if the provider had returned these (before the token is first cached)
        db.session.execute(
            update(Grant)
            .where(Grant.id == grant.id)
            .values(user_name="Mallory\r\nX-Injected: yes", user_email="alice@example.com\nX-Evil: 1")
        )
        db.session.commit()
    assert requests.post(front.url + "/mcp", headers=login.bearer, timeout=10).status_code == 200
    seen = echo_downstream.last()
    assert seen.header("X-Injected") is None and seen.header("X-Evil") is None
    assert seen.header("X-Forwarded-Name") == "MalloryX-Injected: yes"
    assert seen.header("X-Forwarded-Email") == "alice@example.comX-Evil: 1"

    other = log_in(front.url, front.url + "/mcp")
    with front.app.app_context():
        db.session.execute(
            update(Grant).where(Grant.id == grant_of(front.app, other.access_token).id).values(user_name="Zoë 李")
        )
        db.session.commit()
    assert requests.post(front.url + "/mcp", headers=other.bearer, timeout=10).status_code == 200
    # Non-ASCII names go out as UTF-8 bytes (the server here decodes header bytes as Latin-1).
    raw = echo_downstream.last().header("X-Forwarded-Name")
    assert raw.encode("latin-1").decode("utf-8") == "Zoë 李"


def test_request_bodies_stream_through(serve: Callable[..., Front], echo_downstream: EchoServer) -> None:
    front = serve(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(front.url, front.url + "/mcp")
    parts = [b'{"jsonrpc": "2.0", ', b'"id": 2, ', b'"method": "ping"}']
    chunked = requests.post(front.url + "/mcp", data=iter(parts), headers=login.bearer, timeout=10)
    assert chunked.status_code == 200
    assert echo_downstream.last().body == b"".join(parts)
    assert echo_downstream.last().header("Transfer-Encoding") == "chunked"  # forwarded as it came, not buffered
    big = b"x" * 3_000_000
    assert requests.put(front.url + "/mcp/upload", data=big, headers=login.bearer, timeout=20).status_code == 200
    assert echo_downstream.last().body == big and echo_downstream.last().header("Content-Length") == str(len(big))


def test_downstream_answers_are_mapped_safely(serve: Callable[..., Front], echo_downstream: EchoServer) -> None:
    front = serve(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(front.url, front.url + "/mcp")
    url = front.url + "/mcp"

    # A downstream's own challenge would send the client to an authorization server it does not know (RS-2).
    refused = requests.post(url + "/status/401", headers=login.bearer, timeout=10)
    assert refused.status_code == 401
    assert 'realm="downstream"' not in refused.headers["WWW-Authenticate"]
    assert (
        f'resource_metadata="{front.url}/.well-known/oauth-protected-resource/mcp"'
        in refused.headers["WWW-Authenticate"]
    )
    assert refused.json() == {"error": "downstream says no"}
    forbidden = requests.post(url + "/status/403", headers=login.bearer, timeout=10)
    assert forbidden.status_code == 403 and "WWW-Authenticate" not in forbidden.headers
    assert requests.post(url + "/status/500", headers=login.bearer, timeout=10).status_code == 500

    redirect = requests.get(url + "/redirect", headers=login.bearer, allow_redirects=False, timeout=10)
    assert redirect.status_code == 302 and redirect.content == b"{}"
    assert redirect.headers["Location"] == front.url + "/mcp/elsewhere?x=1"  # never the internal address

    # A cookie the downstream sets goes to that client only; the proxy keeps no cookie jar across users.
    cookie = requests.get(url + "/set-cookie?who=alice", headers=login.bearer, timeout=10)
    assert cookie.headers["Set-Cookie"] == "downstream-session=alice; Path=/"
    bob = log_in(front.url, url, login_hint="bob")
    assert requests.get(url, headers=bob.bearer, timeout=10).status_code == 200
    assert echo_downstream.last().header("Cookie") is None

    count = len(echo_downstream.seen)
    host, port = front.url.split("//", 1)[1].split(":")
    for path in ("/mcp/../admin", "/mcp/a/%2e%2e/admin", "/mcp/./x", "/mcp/a/%2E%2E"):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)  # sends the path as is
        connection.request("GET", path, headers=login.bearer)
        status = connection.getresponse().status
        connection.close()
        assert status == 400, path
    assert len(echo_downstream.seen) == count  # nothing outside the route's prefix reached the downstream


#: Headers other stacks trust for identity or for the original URL (oauth2-proxy, Apache, Kubernetes' front proxy,
#: IIS, Azure, Google IAP, AWS ALB, Cloudflare): a client must not be able to set them for the downstream.
SPOOFED = [
    "Remote-User",
    "X-Remote-User",
    "X-Remote-Group",
    "X-Remote-Extra-Scopes",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
    "X-Auth-Request-Access-Token",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Original-URI",
    "True-Client-IP",
    "CF-Connecting-IP",
    "X-Client-IP",
    "X-Cluster-Client-IP",
    "Fastly-Client-IP",
    "X-MS-Client-Principal-Name",
    "X-MS-Client-Principal",
    "X-Goog-Authenticated-User-Email",
    "X-Amzn-Oidc-Identity",
    "X-Amzn-Oidc-Data",
    "Cf-Access-Authenticated-User-Email",
    "Cf-Access-Jwt-Assertion",
]


def test_identity_headers_other_stacks_trust_are_removed_in_every_spelling(
    serve: Callable[..., Front], echo_downstream: EchoServer
) -> None:
    front = serve(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(front.url, front.url + "/mcp")
    host, port = front.url.split("//", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/mcp")
    connection.putheader("Authorization", login.bearer["Authorization"])
    for name in SPOOFED:
        for spelling in (name, name.lower(), name.upper()):  # each also twice over: duplicates
            connection.putheader(spelling, "mallory")
    connection.putheader("Remote_User", "mallory-underscore")
    connection.putheader("X-Custom-User", "kept")
    connection.putheader("Content-Length", "0")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 200, response.read()
    connection.close()
    seen = echo_downstream.last()
    assert "mallory" not in str(seen.headers), [(key, value) for key, value in seen.headers if "mallory" in value]
    assert seen.header("X-Custom-User") == "kept"  # only the names other stacks trust are removed
    assert seen.header("X-Forwarded-User") == "alice"
