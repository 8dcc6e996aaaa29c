"""Fixtures and assertions for the bad-input tests (tests/test_bad_input_*.py) and the redirect-URI tests.

Bad input, one test per case: every malformed or hostile request gets the specific OAuth error or a 4xx page. Never a
500, never a partial write, never a redirect to an unvalidated URI, never a secret in a log line (issue 2, "Bad
input"; MCP authorization checklist AS-4 … AS-13, P-3 … P-5).

A pytest plugin, loaded for every test module by `pytest_plugins` in tests/conftest.py (`document_server`,
`dev_proxy`, `sweep_proxy`); test modules import the helpers they use, among them the garbage sweep each endpoint's
module runs at its own path.
"""

from __future__ import annotations

import base64
import secrets
import socket
from collections.abc import Iterator
from html import unescape
from urllib.parse import urlencode, urlsplit

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from oauthproxy.models import db
from tests.conftest import RunningProxy
from tests.flows import Browser, McpOAuthClient, hidden_inputs, pkce_pair, query_of
from tests.support.servers import JsonDocumentServer, serving

HTTPS_PUBLIC_URL = "https://proxy.example.test"


def get(url: str, session: requests.Session | None = None) -> requests.Response:
    return (session or requests).get(url, allow_redirects=False, timeout=15)


def new_client(proxy: RunningProxy, auth_method: str | None = "none", **metadata) -> McpOAuthClient:
    """A freshly registered client. The unique name keeps identical-registration reuse from merging clients."""
    metadata.setdefault("client_name", f"Bad Input Client {secrets.token_hex(6)}")
    return proxy.register_client(auth_method=auth_method, **metadata)


def count(proxy: RunningProxy, model) -> int:
    with proxy.app.app_context():
        return db.session.scalar(select(func.count()).select_from(model))


def assert_page(response: requests.Response, status: int = 400, text: str | None = None) -> None:
    """An HTML error page: no Location header and no automatic onward navigation."""
    assert response.status_code == status, (response.status_code, dict(response.headers), response.text[:800])
    assert "Location" not in response.headers, response.headers["Location"]
    assert response.headers["Content-Type"].startswith("text/html"), response.headers["Content-Type"]
    assert 'http-equiv="refresh"' not in response.text
    if text is not None:
        assert text in unescape(response.text), response.text[:1500]


def assert_error_redirect(
    response: requests.Response, proxy: RunningProxy, client: McpOAuthClient, error: str
) -> dict[str, str]:
    """An authorization error response at the client's validated redirect URI, with `state` and `iss` (RFC 9207)."""
    assert response.status_code in (302, 303), (response.status_code, response.text[:800])
    location = response.headers["Location"]
    assert location.startswith(client.redirect_uri + "?"), location
    params = query_of(location)
    assert params["error"] == error, params
    assert params["state"] == client.state, params
    assert params["iss"] == proxy.url, params
    assert "code" not in params
    return params


def assert_token_error(response: requests.Response, status: int, *errors: str) -> dict:
    """RFC 6749 §5.2: a JSON error, never cached, and no token in it."""
    assert response.status_code == status, (response.status_code, response.text[:800])
    assert response.headers.get("Cache-Control") == "no-store", dict(response.headers)
    assert response.headers["Content-Type"].startswith("application/json"), response.headers["Content-Type"]
    body = response.json()
    assert body["error"] in errors, body
    assert "access_token" not in body and "refresh_token" not in body
    return body


def assert_register_error(response: requests.Response, error: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text[:800])
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error, body
    assert "client_id" not in body


def login_code(proxy: RunningProxy, client: McpOAuthClient, browser: Browser | None = None, **overrides: str) -> str:
    result = client.login(browser or proxy.browser(), **overrides)
    assert "code" in result, result
    return result["code"]


def tokens_for(proxy: RunningProxy, client: McpOAuthClient) -> dict:
    response = client.exchange(login_code(proxy, client))
    assert response.status_code == 200, response.text
    return response.json()


def consent_form(proxy: RunningProxy, client: McpOAuthClient, browser: Browser | None = None) -> tuple[Browser, dict]:
    """Open the consent page in a browser; return that browser and the page's hidden form fields."""
    browser = browser or proxy.browser()
    page = get(client.authorize_url(), browser.session)
    assert page.status_code == 200 and 'action="/authorize/consent"' in page.text, page.text[:800]
    return browser, hidden_inputs(page.text)


def post_consent(proxy: RunningProxy, browser: Browser, form: dict) -> requests.Response:
    return browser.session.post(proxy.url + "/authorize/consent", data=form, allow_redirects=False, timeout=15)


def callback_url(proxy: RunningProxy, client: McpOAuthClient, browser: Browser) -> str:
    """Consent and sign in upstream, stopping at the provider's redirect back to /callback (not yet followed)."""
    url = browser.authorize(client.authorize_url(), proxy.url + "/callback")
    assert "state=" in url and "code=" in url, url
    return url


def cookie_attributes(headers: list[str], name: str) -> tuple[str, set[str]]:
    """The Set-Cookie header for `name`, and its attribute names and values in lower case."""
    for header in headers:
        if header.split("=", 1)[0].strip() == name:
            return header, {part.strip().lower() for part in header.split(";")[1:]}
    raise AssertionError(f"no Set-Cookie for {name}: {headers}")


def https_consent_page(proxy: RunningProxy, client_name: str, **params: str) -> tuple[FlaskClient, TestResponse]:
    """Register a public client and open its consent page at `HTTPS_PUBLIC_URL`, through the app's test client (the
    proxy's own server speaks plain http): the answers a browser gets from an https deployment."""
    web = proxy.app.test_client()
    registered = web.post(
        "/register",
        base_url=HTTPS_PUBLIC_URL,
        json={
            "client_name": f"{client_name} {secrets.token_hex(4)}",
            "redirect_uris": ["https://client.example.test/cb"],
            "token_endpoint_auth_method": "none",
        },
    )
    assert registered.status_code == 201 and registered.json is not None, registered.text
    _, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": registered.json["client_id"],
            "state": "s",
            "redirect_uri": "https://client.example.test/cb",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **params,
        }
    )
    page = web.get("/authorize?" + query, base_url=HTTPS_PUBLIC_URL)
    assert page.status_code == 200, page.text[:800]
    return web, page


# --- Client ID Metadata Documents served from loopback ---


@pytest.fixture
def document_server() -> Iterator[JsonDocumentServer]:
    with serving(JsonDocumentServer()) as server:
        yield server


@pytest.fixture
def dev_proxy(start_proxy) -> RunningProxy:
    """Loopback http documents are a development setting; production requires https and public addresses."""
    return start_proxy(CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS="true")


def document_client(proxy: RunningProxy, server: JsonDocumentServer, **document) -> McpOAuthClient:
    client_id = f"http://127.0.0.1:{server.server_port}/oauth/{secrets.token_hex(4)}/client.json"
    server.document = {
        "client_id": client_id,
        "client_name": "Document Client",
        "redirect_uris": ["http://127.0.0.1:9/cimd-callback"],
        "token_endpoint_auth_method": "none",
        **document,
    }
    return McpOAuthClient(proxy.url, client_id, redirect_uri="http://127.0.0.1:9/cimd-callback")


# --- never a 500: a garbage sweep of one path ---------------------------------------------------------------------

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


def assert_garbage_never_causes_a_server_error(proxy: RunningProxy, path: str) -> None:
    """Every method, garbage queries, headers and bodies (authenticated too) and raw non-UTF-8 bytes at `path`:
    never a 5xx, never a connection closed without an answer."""
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
