"""Fixtures and assertions for the bad-input tests (tests/test_bad_input_*.py) and the redirect-URI tests.

Bad input, one test per case: every malformed or hostile request gets the specific OAuth error or a 4xx page. Never a
500, never a partial write, never a redirect to an unvalidated URI, never a secret in a log line (issue 2, "Bad
input"; MCP authorization checklist AS-4 … AS-13, P-3 … P-5).

A pytest plugin, loaded for every test module by `pytest_plugins` in tests/conftest.py (`document_server`,
`dev_proxy`); test modules import the helpers they use.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from html import unescape
from urllib.parse import urlencode

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
