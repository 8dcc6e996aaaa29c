"""Garbage at every endpoint (methods, queries, headers, bodies, raw bytes): never a 5xx, never a dropped connection."""

from __future__ import annotations

import base64
import socket
from urllib.parse import urlsplit

import pytest
import requests

from tests.bad_input_fixtures import (
    new_client,
)
from tests.conftest import RunningProxy

# --- never a 500 -----------------------------------------------------------------------------------------------------

GARBAGE_QUERIES = [
    "",
    "client_id=" + "a" * 8000,
    "client_id=%ff%fe%fd&state=%c3%28&redirect_uri=%e2%82",
    "client_id=%00&state=%00&code=%00",
    "client_id=abc%00def&redirect_uri=http://127.0.0.1:9/callback%00",
    "client_id[]=x&client_id[]=y&redirect_uri[a]=b",
    "response_type=code&client_id=https://%5B::1%5D/x&code_challenge=x&code_challenge_method=S256",
    "response_type=code&client_id=http://[::1&redirect_uri=http://[::1",
    "client_id=https://example.com:99999/x.json",
    "client_id=https://user:pass@example.com/x.json",
    "resource=http://[broken&client_id=x",
    "state=" + "s" * 9000 + "&code=" + "c" * 9000,
    "=&&=&a==b&%%&%zz=%yy",
]

GARBAGE_HEADERS = [
    {},
    {"Content-Type": "application/json"},
    {"Content-Type": "application/x-www-form-urlencoded; charset=bogus-charset"},
    {"Content-Type": "multipart/form-data; boundary=nothere"},
    {"Content-Type": "multipart/form-data"},
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    {"Authorization": "Basic !!!not-base64!!!"},
    {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\x00\xfd").decode()},
    {"Authorization": "Basic " + base64.b64encode(b"no-colon-here").decode()},
    {"Authorization": "Basic " + base64.b64encode(b"%00:%ff").decode()},
    {"Authorization": "Basic " + base64.b64encode(b"x" * 500 + b":y").decode()},
    {"Authorization": "Bearer " + "t" * 100},
    {"Authorization": "Basic"},
    {"Cookie": "oauthproxy-session=garbage.garbage.garbage; oauthproxy-consent=%ff%00"},
    {"Cookie": "oauthproxy-session=" + "a" * 3000},
    {"Origin": "https://evil.example", "Host": "evil.example"},
    {"X-Forwarded-For": "1.2.3.4, garbage", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "gopher"},
]

GARBAGE_BODIES = [
    b"",
    b"{",
    b"null",
    b"[]",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b"\xff\xfe\xfd\x00\x01",
    b"grant_type=authorization_code&code=%ff%fe&client_id=%00&code_verifier=%c3%28",
    b"grant_type=refresh_token&refresh_token=%00&client_id=\xff",
    b"token=%00&client_id=%00&token_type_hint=%ff",
    b"grant_type=refresh_token&refresh_token=abc",
    b"grant_type=authorization_code&code=abc&code_verifier=def&redirect_uri=http://127.0.0.1:9/callback",
    b"token=abc&token_type_hint=refresh_token",
    b"grant_type=authorization_code&grant_type=refresh_token&client_id=x&client_id=y",
    b"client_id=" + b"a" * 70 + b"&client_secret=x&grant_type=authorization_code&code=x",
    b"client_id=a%00b&client_secret=x&grant_type=refresh_token&refresh_token=x",
    b"csrf_token=x&request=%ff%fe&decision=approve",
    b"csrf_token=&request=" + b"A" * 20_000 + b"&decision=approve",
    b'{"redirect_uris": ["http://127.0.0.1:9/cb\\u0000"], "client_name": "\\u0000"}',
    b'{"redirect_uris": [{"a": 1}], "grant_types": {"x": 1}, "client_name": 1e999}',
    b'{"redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none", "client_name": "'
    + b"n" * 200_000
    + b'"}',
    b'{"redirect_uris": ["http://127.0.0.1:9/cb"], "scope": "\\ud800", "jwks": {"keys": "x"}}',
    b"x" * 1_000_000,
]

ENDPOINTS = [
    "/authorize",
    "/authorize/consent",
    "/callback",
    "/token",
    "/revoke",
    "/register",
    "/.well-known/oauth-authorization-server",
    "/.well-known/openid-configuration",
    "/static/missing.css",
]


def raw_status(proxy: RunningProxy, request_line: bytes, headers: bytes = b"", body: bytes = b"") -> int:
    """Send bytes that an HTTP client library would refuse to send (raw non-UTF-8 in the request line)."""
    host, port = urlsplit(proxy.url).hostname, urlsplit(proxy.url).port
    with socket.create_connection((host, port), timeout=15) as sock:
        sock.sendall(
            request_line
            + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + headers
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


@pytest.fixture
def sweep_proxy(start_proxy) -> RunningProxy:
    return start_proxy(AUTHORIZE_RATE_LIMIT="100000 per minute", TOKEN_RATE_LIMIT="100000 per minute")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    proxy = sweep_proxy
    real = new_client(proxy, auth_method="client_secret_basic")
    failures: list[str] = []

    def check(label: str, status: int) -> None:
        if status >= 500 or status == 0:
            failures.append(f"{status} for {label}")

    session = requests.Session()
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO"):
        check(
            f"{method} {path}", session.request(method, proxy.url + path, timeout=15, allow_redirects=False).status_code
        )
    for query in [*GARBAGE_QUERIES, f"client_id={real.client_id}&response_type=code&redirect_uri=%ff"]:
        for method in ("GET", "POST"):
            response = session.request(method, f"{proxy.url}{path}?{query}", timeout=15, allow_redirects=False)
            check(f"{method} {path}?{query[:80]}", response.status_code)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for headers in [*GARBAGE_HEADERS, *({**form, **h} for h in GARBAGE_HEADERS if "Content-Type" not in h)]:
        for body in GARBAGE_BODIES:
            response = requests.post(proxy.url + path, data=body, headers=headers, timeout=30, allow_redirects=False)
            check(f"POST {path} headers={headers} body={body[:60]!r}", response.status_code)
    basic = {"Authorization": "Basic " + base64.b64encode(f"{real.client_id}:{real.client_secret}".encode()).decode()}
    for body in GARBAGE_BODIES:
        response = requests.post(
            proxy.url + path,
            data=body,
            timeout=30,
            allow_redirects=False,
            headers={**basic, "Content-Type": "application/x-www-form-urlencoded"},
        )
        check(f"POST {path} (authenticated) body={body[:60]!r}", response.status_code)
    for raw_query in (b"client_id=\xff\xfe\x80&state=\xc3\x28", b"\x00\x01\x02", b"client_id=" + "é".encode()):
        check(
            f"raw GET {path}?{raw_query!r}",
            raw_status(proxy, b"GET " + path.encode() + b"?" + raw_query + b" HTTP/1.1"),
        )
        check(
            f"raw POST {path} body {raw_query!r}",
            raw_status(
                proxy,
                b"POST " + path.encode() + b" HTTP/1.1",
                b"Content-Type: application/x-www-form-urlencoded\r\n",
                raw_query,
            ),
        )
    assert not failures, "\n".join(failures)
