"""Bad input, one test per case: every malformed or hostile request gets the specific OAuth error or a 4xx page.

Never a 500, never a partial write, never a redirect to an unvalidated URI, never a secret in a log line
(issue 2, "Bad input"; MCP authorization checklist AS-4 … AS-13, P-3 … P-5).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import socket
import threading
import zlib
from collections.abc import Iterator
from datetime import timedelta
from html import unescape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode, urlsplit

import pytest
import requests
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import func, select, update

from oauthproxy.components import components
from oauthproxy.crypto import hash_token
from oauthproxy.models import AuthorizationCode, Grant, OAuthClient, PendingAuthorization, Token, db, utcnow
from tests.conftest import RunningProxy, free_port
from tests.flows import Browser, McpOAuthClient, hidden_inputs, pkce_pair, query_of

HTTPS_PUBLIC_URL = "https://proxy.example.test"


# --- fixtures and helpers ---


# --- helpers ---------------------------------------------------------------------------------------------------------


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


# --- /authorize: before the client and redirect URI are validated, errors are pages ----------------------------------


def test_authorize_without_client_id_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    assert_page(get(client.authorize_url(client_id=None)), text="no client_id")


def test_authorize_with_unknown_client_id_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(client_id="no-such-client-" + secrets.token_hex(8)))
    assert_page(response, text="is not registered here")


@pytest.mark.parametrize(
    "accept", ["application/json", "application/json, text/plain, */*", "text/html;q=0.5, application/json"]
)
def test_authorize_with_unknown_client_id_is_json_when_json_is_preferred(proxy: RunningProxy, accept: str) -> None:
    """mcp-remote checks a stored registration so; with the HTML page it waited for a browser until its timeout."""
    client = new_client(proxy)
    url = client.authorize_url(client_id="no-such-client-" + secrets.token_hex(8))
    response = requests.get(url, headers={"Accept": accept}, allow_redirects=False, timeout=15)
    assert response.status_code == 400, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store" and "Location" not in response.headers
    body = response.json()
    assert body["error"] == "invalid_client" and "is not registered here" in body["error_description"]


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "*/*",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "application/json;q=0.5, text/html",
    ],
)
def test_authorize_with_unknown_client_id_is_a_page_for_browsers(proxy: RunningProxy, accept: str | None) -> None:
    client = new_client(proxy)
    url = client.authorize_url(client_id="no-such-client-" + secrets.token_hex(8))
    headers = {"Accept": accept} if accept is not None else {}
    assert_page(requests.get(url, headers=headers, allow_redirects=False, timeout=15), text="is not registered here")


def test_authorize_page_escapes_a_hostile_client_id(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(client_id='<script>alert("x")</script>'))
    assert_page(response)
    assert "<script>alert" not in response.text


def test_authorize_with_unregistered_redirect_uri_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(redirect_uri="https://attacker.example/steal"))
    assert_page(response)
    assert 'href="https://attacker.example' not in response.text


@pytest.mark.parametrize(
    "requested",
    [
        "https://other.example.test/oauth/callback",  # different host
        "https://client.example.test/oauth/elsewhere",  # different path
        "https://client.example.test/oauth/callback?x=1",  # added query
        "https://client.example.test/oauth/callback/",  # trailing slash
        "https://client.example.test:8443/oauth/callback",  # added port
        "https://client.example.test/oauth/callback#frag",  # fragment
        "https://client.example.test.attacker.example/oauth/callback",  # suffix host
    ],
    ids=["host", "path", "query", "trailing-slash", "port", "fragment", "suffix-host"],
)
def test_authorize_redirect_uri_must_match_exactly(proxy: RunningProxy, requested: str) -> None:
    client = new_client(proxy, redirect_uri="https://client.example.test/oauth/callback")
    assert_page(get(client.authorize_url(redirect_uri=requested)))


def test_authorize_without_redirect_uri_when_several_are_registered_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy, redirect_uris=["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"])
    assert_page(get(client.authorize_url(redirect_uri=None)))


def test_https_registered_redirect_cannot_be_downgraded_to_http(proxy: RunningProxy) -> None:
    client = new_client(proxy, redirect_uri="https://client.example.test/cb")
    assert_page(get(client.authorize_url(redirect_uri="http://client.example.test/cb")))


def test_loopback_redirect_may_use_another_port(proxy: RunningProxy) -> None:
    """RFC 8252 §7.3: VS Code registers http://127.0.0.1:33418/ and may come back on a random port."""
    client = new_client(proxy, redirect_uri="http://127.0.0.1:33418/callback")
    client.redirect_uri = "http://127.0.0.1:45123/callback"
    result = query_of(proxy.browser().authorize(client.authorize_url(), client.redirect_uri))
    assert result["state"] == client.state and "code" in result
    response = client.exchange(result["code"])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "requested",
    [
        "http://127.0.0.1:45123/elsewhere",
        "http://localhost:33418/callback",
        "http://127.0.0.1:33418/callback?x=1",
        "http://10.0.0.1:33418/callback",
    ],
    ids=["path", "host", "query", "not-loopback"],
)
def test_loopback_redirect_must_match_except_for_the_port(proxy: RunningProxy, requested: str) -> None:
    client = new_client(proxy, redirect_uri="http://127.0.0.1:33418/callback")
    assert_page(get(client.authorize_url(redirect_uri=requested)))


@pytest.mark.parametrize("name", ["client_id", "redirect_uri", "state", "code_challenge", "resource"])
def test_authorize_with_a_repeated_parameter_is_a_page(proxy: RunningProxy, name: str) -> None:
    client = new_client(proxy)
    url = client.authorize_url(resource=proxy.app.config["SETTINGS"].mcp_resource)
    value = query_of(url)[name]
    assert_page(get(url + "&" + urlencode({name: value + "x"})), text="more than once")


# --- /authorize: after validation, errors go back to the client with state and iss -----------------------------------


@pytest.mark.parametrize("response_type", ["token", "code id_token", "id_token", ""])
def test_authorize_unsupported_response_type_redirects_with_error(proxy: RunningProxy, response_type: str) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(response_type=response_type))
    params = query_of(response.headers.get("Location", ""))
    # RFC 6749 §4.1.2.1: an empty response_type may be read as missing (invalid_request) or unsupported
    expected = (
        ("invalid_request", "unsupported_response_type") if response_type == "" else ("unsupported_response_type",)
    )
    assert params.get("error") in expected, (response.status_code, params)
    assert_error_redirect(response, proxy, client, params["error"])


def test_authorize_without_response_type_redirects_with_error(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(response_type=None))
    params = query_of(response.headers.get("Location", ""))
    assert params.get("error") in ("invalid_request", "unsupported_response_type"), (response.status_code, params)
    assert_error_redirect(response, proxy, client, params["error"])


def test_authorize_without_code_challenge_redirects_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(code_challenge=None, code_challenge_method=None))
    assert_error_redirect(response, proxy, client, "invalid_request")


def test_authorize_with_plain_code_challenge_redirects_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    verifier = secrets.token_urlsafe(48)
    response = get(client.authorize_url(code_challenge=verifier, code_challenge_method="plain"))
    assert_error_redirect(response, proxy, client, "invalid_request")


def test_authorize_without_code_challenge_method_redirects_invalid_request(proxy: RunningProxy) -> None:
    """OAuth 2.1 defaults a missing method to plain, which is refused; S256 must be named."""
    client = new_client(proxy)
    response = get(client.authorize_url(code_challenge_method=None))
    assert_error_redirect(response, proxy, client, "invalid_request")


@pytest.mark.parametrize("method", ["s256", "S512", "none"])
def test_authorize_with_unknown_code_challenge_method_redirects_invalid_request(
    proxy: RunningProxy, method: str
) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(code_challenge_method=method))
    assert_error_redirect(response, proxy, client, "invalid_request")


@pytest.mark.parametrize(
    "resource",
    [
        "https://elsewhere.example/mcp",
        "http://127.0.0.1:9/mcp",  # the downstream's own URL is not a resource of this server
        "{proxy}/other",
        "{proxy}/mcp/deeper",
        "not a url",
    ],
    ids=["other-host", "downstream-url", "other-path", "sub-path", "garbage"],
)
def test_authorize_with_unknown_resource_redirects_invalid_target(proxy: RunningProxy, resource: str) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(resource=resource.format(proxy=proxy.url)))
    assert_error_redirect(response, proxy, client, "invalid_target")


@pytest.mark.parametrize(
    "resource",
    ["{proxy}/mcp/", "{proxy}/mcp?source=chatgpt", "HTTP://127.0.0.1:{port}/mcp"],
    ids=["trailing-slash", "query", "upper-case-scheme"],
)
def test_authorize_accepts_resource_variants(proxy: RunningProxy, resource: str) -> None:
    """RFC 8707 comparison: scheme and host case-insensitive, trailing slash ignored, ChatGPT's query ignored."""
    client = new_client(proxy)
    url = client.authorize_url(resource=resource.format(proxy=proxy.url, port=urlsplit(proxy.url).port))
    result = query_of(proxy.browser().authorize(url, client.redirect_uri))
    assert "code" in result, result
    with proxy.app.app_context():
        row = db.session.get(AuthorizationCode, hash_token(result["code"]))
        assert row.resource == proxy.app.config["SETTINGS"].mcp_resource


def test_authorize_accepts_resource_with_upper_case_host(start_proxy) -> None:
    proxy = start_proxy(PUBLIC_URL=HTTPS_PUBLIC_URL)
    web = proxy.app.test_client()
    registered = web.post(
        "/register",
        base_url=HTTPS_PUBLIC_URL,
        json={
            "client_name": f"Upper {secrets.token_hex(4)}",
            "redirect_uris": ["https://client.example.test/cb"],
            "token_endpoint_auth_method": "none",
        },
    )
    assert registered.status_code == 201, registered.text
    _, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": registered.json["client_id"],
            "state": "s",
            "redirect_uri": "https://client.example.test/cb",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": "https://PROXY.Example.TEST/mcp",
        }
    )
    page = web.get("/authorize?" + query, base_url=HTTPS_PUBLIC_URL)
    assert page.status_code == 200, page.text[:800]
    assert f"{HTTPS_PUBLIC_URL}/mcp" in page.text


@pytest.mark.parametrize("scope", ["admin", "openid admin", "https://www.googleapis.com/auth/gmail.send"])
def test_authorize_with_unsupported_scope_redirects_invalid_scope(proxy: RunningProxy, scope: str) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(scope=scope))
    assert_error_redirect(response, proxy, client, "invalid_scope")


# --- consent ---------------------------------------------------------------------------------------------------------


def test_consent_without_csrf_token_is_refused(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    del form["csrf_token"]
    before = count(proxy, PendingAuthorization)
    assert_page(post_consent(proxy, browser, {**form, "decision": "approve"}))
    assert count(proxy, PendingAuthorization) == before


def test_consent_with_wrong_csrf_token_is_refused(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    before = count(proxy, PendingAuthorization)
    assert_page(post_consent(proxy, browser, {**form, "csrf_token": secrets.token_urlsafe(32), "decision": "approve"}))
    assert count(proxy, PendingAuthorization) == before


def test_consent_form_posted_from_another_browser_is_refused(proxy: RunningProxy) -> None:
    """A form (with its CSRF token) lifted from the victim's page does not work in the attacker's browser."""
    client = new_client(proxy)
    _, form = consent_form(proxy, client)
    other = proxy.browser()
    consent_form(proxy, client, other)  # the other browser has a session (and CSRF token) of its own
    before = count(proxy, PendingAuthorization)
    assert_page(post_consent(proxy, other, {**form, "decision": "approve"}))
    assert count(proxy, PendingAuthorization) == before


def test_consent_with_tampered_request_is_refused(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    signed = form["request"]
    tampered = signed[:10] + ("A" if signed[10] != "A" else "B") + signed[11:]
    before = count(proxy, PendingAuthorization)
    assert_page(post_consent(proxy, browser, {**form, "request": tampered, "decision": "approve"}))
    assert_page(post_consent(proxy, browser, {**form, "request": "", "decision": "approve"}))
    assert count(proxy, PendingAuthorization) == before


def test_consent_request_with_swapped_redirect_uri_is_refused(proxy: RunningProxy) -> None:
    """The signed request's payload rewritten to an attacker's redirect URI, keeping the old signature."""
    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    payload, timestamp, signature = form["request"].rsplit(".", 2)
    raw = base64.urlsafe_b64decode(payload.lstrip(".") + "=" * (-len(payload.lstrip(".")) % 4))
    params = json.loads(zlib.decompress(raw) if payload.startswith(".") else raw)  # itsdangerous may compress
    params["redirect_uri"] = "https://attacker.example/steal"
    forged = base64.urlsafe_b64encode(json.dumps(params, separators=(",", ":")).encode()).rstrip(b"=").decode()
    response = post_consent(
        proxy, browser, {**form, "request": f"{forged}.{timestamp}.{signature}", "decision": "approve"}
    )
    assert_page(response)
    assert "attacker.example" not in response.headers.get("Location", "")


def test_consent_with_expired_request_is_refused(proxy: RunningProxy) -> None:
    """A consent form older than 10 minutes is refused, even with a valid signature and CSRF token."""

    class OldSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return super().get_timestamp() - 3600

    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    key = proxy.app.config["SETTINGS"].secret_key
    params = URLSafeTimedSerializer(key, salt="authorization-request").loads(form["request"])
    old = URLSafeTimedSerializer(key, salt="authorization-request", signer=OldSigner).dumps(params)
    before = count(proxy, PendingAuthorization)
    assert_page(post_consent(proxy, browser, {**form, "request": old, "decision": "approve"}))
    assert count(proxy, PendingAuthorization) == before


@pytest.mark.parametrize("decision", [None, "", "APPROVE", "yes"])
def test_consent_without_an_explicit_approval_is_a_denial(proxy: RunningProxy, decision: str | None) -> None:
    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    if decision is not None:
        form["decision"] = decision
    before = count(proxy, PendingAuthorization)
    assert_error_redirect(post_consent(proxy, browser, form), proxy, client, "access_denied")
    assert count(proxy, PendingAuthorization) == before


def test_consent_get_is_not_allowed(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    _, form = consent_form(proxy, client)
    response = get(proxy.url + "/authorize/consent?" + urlencode({**form, "decision": "approve"}))
    assert response.status_code == 405
    assert "Location" not in response.headers


def test_consent_page_forbids_framing(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    page = get(client.authorize_url())
    assert page.status_code == 200
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    # error pages too: they are the same origin and could be framed for clickjacking otherwise
    error_page = get(client.authorize_url(client_id="unknown-client"))
    assert error_page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in error_page.headers["Content-Security-Policy"]


def test_session_and_consent_cookies_are_httponly_and_samesite_lax(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser = proxy.browser()
    page = get(client.authorize_url(), browser.session)
    header, attributes = cookie_attributes(page.raw.headers.getlist("Set-Cookie"), "oauthproxy-session")
    assert {"httponly", "samesite=lax"} <= attributes, header
    approved = post_consent(proxy, browser, {**hidden_inputs(page.text), "decision": "approve"})
    assert approved.is_redirect, approved.text[:500]
    header, attributes = cookie_attributes(approved.raw.headers.getlist("Set-Cookie"), "oauthproxy-consent")
    assert {"httponly", "samesite=lax", "path=/"} <= attributes, header


def test_cookies_on_https_public_url_are_host_prefixed_and_secure(start_proxy) -> None:
    """P-4: `__Host-` prefix, Secure, HttpOnly, SameSite=Lax when PUBLIC_URL is https (and the provider is loopback)."""
    proxy = start_proxy(PUBLIC_URL=HTTPS_PUBLIC_URL)
    web = proxy.app.test_client()
    registered = web.post(
        "/register",
        base_url=HTTPS_PUBLIC_URL,
        json={
            "client_name": f"Secure Cookies {secrets.token_hex(4)}",
            "redirect_uris": ["https://client.example.test/cb"],
            "token_endpoint_auth_method": "none",
        },
    )
    assert registered.status_code == 201, registered.text
    _, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": registered.json["client_id"],
            "state": "s",
            "redirect_uri": "https://client.example.test/cb",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    page = web.get("/authorize?" + query, base_url=HTTPS_PUBLIC_URL)
    assert page.status_code == 200, page.text[:800]
    header, attributes = cookie_attributes(page.headers.getlist("Set-Cookie"), "__Host-oauthproxy-session")
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= attributes, header
    assert not any(a.startswith("domain=") for a in attributes), header
    form = hidden_inputs(page.text)
    approved = web.post("/authorize/consent", base_url=HTTPS_PUBLIC_URL, data={**form, "decision": "approve"})
    assert approved.status_code == 302, approved.text[:800]
    assert approved.headers["Location"].startswith(proxy.provider.issuer), approved.headers["Location"]
    header, attributes = cookie_attributes(approved.headers.getlist("Set-Cookie"), "__Host-oauthproxy-consent")
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= attributes, header
    assert not any(a.startswith("domain=") for a in attributes), header


@pytest.mark.parametrize("cookie", ["oauthproxy-consent", "oauthproxy-session"])
def test_forged_cookie_does_not_skip_consent(proxy: RunningProxy, cookie: str) -> None:
    client = new_client(proxy)
    browser = proxy.browser()
    value = base64.urlsafe_b64encode(json.dumps([client.client_id]).encode()).decode() + ".AAAA.BBBB"
    browser.session.cookies.set(cookie, value, domain="127.0.0.1", path="/")
    page = get(client.authorize_url(), browser.session)
    assert page.status_code == 200 and 'action="/authorize/consent"' in page.text, page.text[:500]


# --- /callback -------------------------------------------------------------------------------------------------------


def test_callback_without_state_is_a_page(proxy: RunningProxy) -> None:
    before = count(proxy, Grant)
    assert_page(get(proxy.url + "/callback?code=whatever"))
    assert_page(get(proxy.url + "/callback"))
    assert count(proxy, Grant) == before


@pytest.mark.parametrize(
    "query",
    [{"code": "x", "state": "unknown"}, {"error": "access_denied", "state": "unknown"}, {"code": "x", "state": ""}],
)
def test_callback_with_unknown_state_is_a_page(proxy: RunningProxy, query: dict[str, str]) -> None:
    before = count(proxy, Grant)
    assert_page(get(proxy.url + "/callback?" + urlencode(query)))
    assert count(proxy, Grant) == before


def test_callback_state_is_single_use(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser = proxy.browser()
    url = callback_url(proxy, client, browser)
    first = get(url, browser.session)
    assert first.status_code == 302 and first.headers["Location"].startswith(client.redirect_uri)
    assert "code" in query_of(first.headers["Location"])
    before = count(proxy, Grant)
    assert_page(get(url, browser.session))
    assert count(proxy, Grant) == before


def test_callback_in_another_browser_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    url = callback_url(proxy, client, proxy.browser())
    other = proxy.browser()
    consent_form(proxy, new_client(proxy), other)  # a browser with a session of its own
    before = count(proxy, Grant)
    assert_page(get(url, other.session), text="another browser")
    assert_page(get(url))  # no cookies at all
    assert count(proxy, Grant) == before


def test_callback_for_expired_pending_login_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser = proxy.browser()
    url = callback_url(proxy, client, browser)
    with proxy.app.app_context():
        db.session.execute(
            update(PendingAuthorization)
            .where(PendingAuthorization.client_id == client.client_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
    before = count(proxy, Grant)
    assert_page(get(url, browser.session), text="expired")
    assert count(proxy, Grant) == before


# --- /token ----------------------------------------------------------------------------------------------------------


def test_token_without_code_verifier_is_refused(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    before = count(proxy, Token)
    response = client.token_request(
        {"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri}
    )
    assert_token_error(response, 400, "invalid_request", "invalid_grant")
    assert count(proxy, Token) == before


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_token_without_code_verifier_is_refused_for_confidential_clients(proxy: RunningProxy, auth_method: str) -> None:
    """PKCE must not be skippable because the client has a secret."""
    client = new_client(proxy, auth_method=auth_method)
    code = login_code(proxy, client)
    response = client.token_request(
        {"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri}
    )
    assert_token_error(response, 400, "invalid_request", "invalid_grant")


@pytest.mark.parametrize("verifier", ["wrong", "challenge", ""], ids=["other-verifier", "challenge-itself", "empty"])
def test_token_with_wrong_code_verifier_is_invalid_grant(proxy: RunningProxy, verifier: str) -> None:
    client = new_client(proxy)
    url = client.authorize_url()
    challenge = query_of(url)["code_challenge"]
    code = query_of(proxy.browser().authorize(url, client.redirect_uri))["code"]
    value = {"wrong": pkce_pair()[0], "challenge": challenge, "": ""}[verifier]
    before = count(proxy, Token)
    response = client.exchange(code, code_verifier=value)
    assert_token_error(response, 400, "invalid_grant", "invalid_request")
    assert count(proxy, Token) == before


@pytest.mark.parametrize(
    "redirect_uri",
    ["http://127.0.0.1:9/other", "https://attacker.example/cb", None],
    ids=["other-path", "other-host", "missing"],
)
def test_token_with_wrong_redirect_uri_is_invalid_grant(proxy: RunningProxy, redirect_uri: str | None) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    data = {"grant_type": "authorization_code", "code": code, "code_verifier": client.verifier}
    if redirect_uri is not None:
        data["redirect_uri"] = redirect_uri
    assert_token_error(client.token_request(data), 400, "invalid_grant")


def test_code_issued_to_one_client_is_refused_to_another(proxy: RunningProxy) -> None:
    alice_client = new_client(proxy)
    code = login_code(proxy, alice_client)
    thief = new_client(proxy)
    thief.verifier = alice_client.verifier
    assert thief.client_id != alice_client.client_id
    before = count(proxy, Token)
    assert_token_error(thief.exchange(code), 400, "invalid_grant")
    assert count(proxy, Token) == before


@pytest.mark.parametrize(
    "grant_type",
    [
        "password",
        "client_credentials",
        "implicit",
        "urn:ietf:params:oauth:grant-type:device_code",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "AUTHORIZATION_CODE",
    ],
)
def test_unsupported_grant_type_is_refused(proxy: RunningProxy, grant_type: str) -> None:
    client = new_client(proxy, auth_method="client_secret_basic")
    response = client.token_request({"grant_type": grant_type, "username": "alice", "password": "x", "scope": "openid"})
    assert_token_error(response, 400, "unsupported_grant_type", "unauthorized_client")


def test_missing_grant_type_is_refused(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = client.token_request({"code": "x", "redirect_uri": client.redirect_uri})
    assert_token_error(response, 400, "unsupported_grant_type", "invalid_request")


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_confidential_client_with_wrong_secret_is_invalid_client(proxy: RunningProxy, auth_method: str) -> None:
    client = new_client(proxy, auth_method=auth_method)
    code = login_code(proxy, client)
    client.client_secret = secrets.token_urlsafe(32)
    before = count(proxy, Token)
    response = client.exchange(code)
    assert_token_error(response, 401, "invalid_client")
    if auth_method == "client_secret_basic":
        assert response.headers["WWW-Authenticate"].startswith("Basic")  # RFC 6749 §5.2
    assert count(proxy, Token) == before


def test_confidential_client_without_its_secret_is_invalid_client(proxy: RunningProxy) -> None:
    client = new_client(proxy, auth_method="client_secret_post")
    code = login_code(proxy, client)
    client.auth_method = "none"  # sends only client_id
    assert_token_error(client.exchange(code), 401, "invalid_client")


def test_public_client_presenting_a_secret_method_is_invalid_client(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    client.auth_method, client.client_secret = "client_secret_basic", "made-up"
    assert_token_error(client.exchange(code), 401, "invalid_client")


@pytest.mark.parametrize("client_id", ["no-such-client", "x" * 300, "https://client.invalid/client.json"])
def test_unknown_client_at_token_is_invalid_client(proxy: RunningProxy, client_id: str) -> None:
    response = requests.post(
        proxy.url + "/token",
        data={
            "grant_type": "authorization_code",
            "code": "x",
            "client_id": client_id,
            "code_verifier": "y",
            "redirect_uri": "http://127.0.0.1:9/callback",
        },
        timeout=15,
    )
    assert_token_error(response, 401, "invalid_client")


def test_expired_code_is_invalid_grant(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    with proxy.app.app_context():
        db.session.execute(
            update(AuthorizationCode)
            .where(AuthorizationCode.code_hash == hash_token(code))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
    before = count(proxy, Token)
    assert_token_error(client.exchange(code), 400, "invalid_grant")
    assert count(proxy, Token) == before


@pytest.mark.parametrize("code", ["garbage", "", "x" * 5000])
def test_unknown_code_is_invalid_grant(proxy: RunningProxy, code: str) -> None:
    client = new_client(proxy)
    client.verifier = pkce_pair()[0]
    assert_token_error(client.exchange(code), 400, "invalid_grant", "invalid_request")


@pytest.mark.parametrize("resource", ["https://elsewhere.example/mcp", "{proxy}/other"])
def test_token_resource_differing_from_the_authorized_one_is_invalid_target(proxy: RunningProxy, resource: str) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client, resource=proxy.app.config["SETTINGS"].mcp_resource)
    before = count(proxy, Token)
    response = client.exchange(code, resource=resource.format(proxy=proxy.url))
    assert_token_error(response, 400, "invalid_target")
    assert count(proxy, Token) == before


def test_refresh_resource_differing_from_the_authorized_one_is_invalid_target(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    tokens = tokens_for(proxy, client)
    assert_token_error(
        client.refresh(tokens["refresh_token"], resource="https://elsewhere.example/mcp"), 400, "invalid_target"
    )
    # the refused request neither rotated nor revoked the token
    assert client.refresh(tokens["refresh_token"]).status_code == 200


def test_refresh_token_of_one_client_is_refused_to_another(proxy: RunningProxy) -> None:
    owner = new_client(proxy)
    tokens = tokens_for(proxy, owner)
    thief = new_client(proxy)
    before = count(proxy, Token)
    assert_token_error(thief.refresh(tokens["refresh_token"]), 400, "invalid_grant")
    assert count(proxy, Token) == before
    assert owner.refresh(tokens["refresh_token"]).status_code == 200


@pytest.mark.parametrize("refresh_token", ["garbage", "x" * 5000, "\u00e9\u00e8"], ids=["short", "long", "non-ascii"])
def test_garbage_refresh_token_is_invalid_grant(proxy: RunningProxy, refresh_token: str) -> None:
    client = new_client(proxy)
    assert_token_error(client.refresh(refresh_token), 400, "invalid_grant")


def test_missing_refresh_token_is_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    assert_token_error(client.token_request({"grant_type": "refresh_token"}), 400, "invalid_request")


def test_access_token_used_as_refresh_token_is_invalid_grant(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    tokens = tokens_for(proxy, client)
    assert_token_error(client.refresh(tokens["access_token"]), 400, "invalid_grant")


def test_token_responses_are_json_and_never_cached(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    bad = client.exchange(code, code_verifier=pkce_pair()[0])
    assert_token_error(bad, 400, "invalid_grant")
    good = client.exchange(code)
    assert good.status_code == 200 and good.headers["Cache-Control"] == "no-store"
    assert good.headers["Content-Type"].startswith("application/json")
    assert_token_error(client.refresh("nope"), 400, "invalid_grant")
    unauthenticated = requests.post(
        proxy.url + "/token",
        data={"grant_type": "refresh_token", "refresh_token": "x", "client_id": "nobody"},
        timeout=15,
    )
    assert_token_error(unauthenticated, 401, "invalid_client")


def test_token_request_with_json_body_is_a_400(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    response = requests.post(
        proxy.url + "/token",
        json={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": client.client_id,
            "redirect_uri": client.redirect_uri,
            "code_verifier": client.verifier,
        },
        timeout=15,
    )
    assert_token_error(response, 400, "invalid_request", "unsupported_grant_type")


def test_token_request_with_a_repeated_parameter_is_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    body = urlencode(
        [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code", "other"),
            ("client_id", client.client_id),
            ("redirect_uri", client.redirect_uri),
            ("code_verifier", client.verifier),
        ]
    )
    response = requests.post(
        proxy.url + "/token", data=body, timeout=15, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_token_error(response, 400, "invalid_request", "invalid_grant")


def test_token_parameters_in_the_query_string_are_not_used(proxy: RunningProxy) -> None:
    """OAuth 2.1 §3.2: token requests are POST bodies; a code in the URL (and so in access logs) is not honoured."""
    client = new_client(proxy)
    code = login_code(proxy, client)
    query = urlencode(
        {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": client.client_id,
            "redirect_uri": client.redirect_uri,
            "code_verifier": client.verifier,
        }
    )
    response = requests.post(proxy.url + "/token?" + query, timeout=15)
    assert 400 <= response.status_code < 500, response.text
    assert "access_token" not in response.text


# --- /register -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"client_name=x&redirect_uris=http://127.0.0.1:9/cb", "application/x-www-form-urlencoded"),
        (b'{"redirect_uris": ["http://127.0.0.1:9/cb"]', "application/json"),
        (b'{"redirect_uris": ["http://127.0.0.1:9/cb"]}', "text/plain"),
        (b"", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"null", "application/json"),
        (b'"a string"', "application/json"),
        (b"42", "application/json"),
    ],
    ids=["form", "broken-json", "text-plain", "empty", "binary", "null", "string", "number"],
)
def test_register_with_non_json_object_body_is_invalid_client_metadata(
    proxy: RunningProxy, body: bytes, content_type: str
) -> None:
    before = count(proxy, OAuthClient)
    response = requests.post(proxy.url + "/register", data=body, headers={"Content-Type": content_type}, timeout=15)
    assert_register_error(response, "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


def test_register_with_json_array_is_invalid_client_metadata(proxy: RunningProxy) -> None:
    before = count(proxy, OAuthClient)
    response = requests.post(proxy.url + "/register", json=[{"redirect_uris": ["http://127.0.0.1:9/cb"]}], timeout=15)
    assert_register_error(response, "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


def register(proxy: RunningProxy, **metadata) -> requests.Response:
    body = {
        "client_name": f"Bad Input {secrets.token_hex(6)}",
        "redirect_uris": ["http://127.0.0.1:9/cb"],
        "token_endpoint_auth_method": "none",
        **metadata,
    }
    return requests.post(proxy.url + "/register", json={k: v for k, v in body.items() if v is not None}, timeout=15)


@pytest.mark.parametrize(
    "redirect_uris",
    [None, [], "http://127.0.0.1:9/cb", [42], [""], [None]],
    ids=["missing", "empty", "string", "number", "empty-string", "null"],
)
def test_register_without_usable_redirect_uris_is_invalid_redirect_uri(proxy: RunningProxy, redirect_uris) -> None:
    before = count(proxy, OAuthClient)
    response = register(proxy, redirect_uris=redirect_uris)
    expected = "invalid_redirect_uri" if redirect_uris in (None, []) else response.json().get("error")
    assert expected in ("invalid_redirect_uri", "invalid_client_metadata"), response.text
    assert_register_error(response, expected)
    assert count(proxy, OAuthClient) == before


@pytest.mark.parametrize(
    "uri",
    [
        "http://client.example.test/cb",
        "http://192.168.1.10/cb",
        "http://127.0.0.1.attacker.example/cb",
        "http://localhost.attacker.example/cb",
        "https:///cb",
        "/relative/cb",
        "javascript:alert(1)",
        "data:text/html,hi",
        "file:///etc/passwd",
        "ftp://client.example.test/cb",
        "http://client.example.test/caf\u00e9",
        'http://client.example.test/it\'s"quoted"\\',
    ],
    ids=[
        "http-host",
        "http-private-ip",
        "loopback-prefix-host",
        "localhost-prefix-host",
        "no-host",
        "relative",
        "javascript",
        "data",
        "file",
        "ftp",
        "non-ascii",
        "quotes-backslash",
    ],
)
def test_register_with_unsafe_redirect_uri_is_invalid_redirect_uri(proxy: RunningProxy, uri: str) -> None:
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, redirect_uris=["http://127.0.0.1:9/ok", uri]), "invalid_redirect_uri")
    assert count(proxy, OAuthClient) == before


@pytest.mark.parametrize("uri", ["https://client.example.test/cb#frag", "http://127.0.0.1:9/cb#", "cursor://cb#x"])
def test_register_with_fragment_in_redirect_uri_is_invalid_redirect_uri(start_proxy, uri: str) -> None:
    proxy = start_proxy(ALLOW_CUSTOM_REDIRECT_SCHEMES="true")
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, redirect_uris=[uri]), "invalid_redirect_uri")
    assert count(proxy, OAuthClient) == before


@pytest.mark.parametrize(
    "uri", ["cursor://anysphere.cursor-retrieval/oauth/callback", "vscode://cb", "com.example.app:/oauth2redirect"]
)
def test_register_private_use_scheme_is_refused_when_turned_off(start_proxy, uri: str) -> None:
    proxy = start_proxy(ALLOW_CUSTOM_REDIRECT_SCHEMES="false")
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, redirect_uris=[uri]), "invalid_redirect_uri")
    assert count(proxy, OAuthClient) == before


def test_register_private_use_scheme_is_accepted_when_allowed(start_proxy) -> None:
    proxy = start_proxy(ALLOW_CUSTOM_REDIRECT_SCHEMES="true")
    response = register(proxy, redirect_uris=["cursor://anysphere.cursor-retrieval/oauth/callback"])
    assert response.status_code == 201, response.text
    assert response.json()["redirect_uris"] == ["cursor://anysphere.cursor-retrieval/oauth/callback"]
    # http on a public host stays refused even then
    assert_register_error(register(proxy, redirect_uris=["http://client.example.test/cb"]), "invalid_redirect_uri")


@pytest.mark.parametrize("method", ["private_key_jwt", "client_secret_jwt", "tls_client_auth", "garbage", 42])
def test_register_unsupported_auth_method_is_invalid_client_metadata(proxy: RunningProxy, method) -> None:
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, token_endpoint_auth_method=method), "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


@pytest.mark.parametrize(
    "grant_types",
    [
        ["password"],
        ["client_credentials"],
        ["implicit"],
        ["authorization_code", "password"],
        "authorization_code",
        [42],
    ],
)
def test_register_unsupported_grant_types_is_invalid_client_metadata(proxy: RunningProxy, grant_types) -> None:
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, grant_types=grant_types), "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


@pytest.mark.parametrize("response_types", [["token"], ["code", "token"], ["id_token"], "code"])
def test_register_unsupported_response_types_is_invalid_client_metadata(proxy: RunningProxy, response_types) -> None:
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, response_types=response_types), "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


@pytest.mark.parametrize(
    "metadata",
    [
        {"client_name": ["not", "a", "string"]},
        {"scope": 42},
        {"client_uri": "javascript:alert(1)"},
        {"logo_uri": "not a url"},
        {"jwks": []},
        {"jwks": "x"},
        {"jwks": 1},
        {"jwks": {}},
        {"jwks": {"keys": "x"}},
        {"jwks": {"keys": [1]}},
        {"jwks": {"keys": [{}]}},
    ],
    ids=[
        "name-list",
        "scope-number",
        "client-uri-javascript",
        "logo-uri-garbage",
        "jwks-list",
        "jwks-string",
        "jwks-number",
        "jwks-no-keys",
        "jwks-keys-string",
        "jwks-keys-number",
        "jwks-key-empty",
    ],
)
def test_register_with_ill_typed_metadata_is_invalid_client_metadata(proxy: RunningProxy, metadata: dict) -> None:
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, **metadata), "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


def test_register_with_a_null_jwks_is_invalid_client_metadata(proxy: RunningProxy) -> None:
    """Found by the registration fuzzer: `"jwks": null` was a 500 (Authlib reads it as a JWK Set)."""
    before = count(proxy, OAuthClient)
    response = requests.post(
        proxy.url + "/register",
        timeout=15,
        json={"redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none", "jwks": None},
    )
    assert_register_error(response, "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


def test_identical_public_registrations_share_one_client(proxy: RunningProxy) -> None:
    name = f"Re-registering Client {secrets.token_hex(6)}"
    before = count(proxy, OAuthClient)
    first = register(proxy, client_name=name)
    second = register(proxy, client_name=name)
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert first.json()["client_id"] == second.json()["client_id"]
    assert count(proxy, OAuthClient) == before + 1


def test_registration_is_rate_limited_per_address(start_proxy) -> None:
    proxy = start_proxy(REGISTER_RATE_LIMIT="3 per minute")
    for _ in range(3):
        assert register(proxy).status_code == 201
    before = count(proxy, OAuthClient)
    limited = register(proxy)
    assert limited.status_code == 429, limited.text
    assert int(limited.headers["Retry-After"]) > 0
    assert limited.json()["error"]
    assert count(proxy, OAuthClient) == before


@pytest.mark.parametrize("auth_method", ["none", "client_secret_basic", "client_secret_post", None])
def test_successful_registration_is_201_with_issued_at(proxy: RunningProxy, auth_method: str | None) -> None:
    response = register(proxy, token_endpoint_auth_method=auth_method)
    assert response.status_code == 201, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["client_id"] and isinstance(body["client_id_issued_at"], int)
    if auth_method == "none":
        assert "client_secret" not in body
    else:
        assert body["token_endpoint_auth_method"] == (auth_method or "client_secret_basic")
        assert len(body["client_secret"]) >= 32
        assert body.get("client_secret_expires_at", 0) == 0


# --- /revoke ---------------------------------------------------------------------------------------------------------


def test_revoke_without_token_is_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = requests.post(proxy.url + "/revoke", data={"client_id": client.client_id}, timeout=15)
    assert_token_error(response, 400, "invalid_request")


def test_revoke_unknown_token_is_200(proxy: RunningProxy) -> None:
    """RFC 7009 §2.2: an invalid token is not an error, so a client cannot probe for valid ones."""
    client = new_client(proxy)
    response = client.revoke(secrets.token_urlsafe(32))
    assert response.status_code == 200, response.text


def test_revoke_by_unknown_client_is_invalid_client(proxy: RunningProxy) -> None:
    response = requests.post(proxy.url + "/revoke", data={"client_id": "nobody", "token": "x"}, timeout=15)
    assert_token_error(response, 401, "invalid_client")


@pytest.mark.parametrize("which", ["access_token", "refresh_token"])
def test_revoking_another_clients_token_does_not_revoke_it(proxy: RunningProxy, which: str) -> None:
    owner = new_client(proxy)
    tokens = tokens_for(proxy, owner)
    other = new_client(proxy)
    response = other.revoke(tokens[which])
    assert response.status_code in (200, 400), response.text
    with proxy.app.app_context():
        row = db.session.scalar(select(Token).where(Token.access_token_hash == hash_token(tokens["access_token"])))
        assert row.revoked_at is None
        assert db.session.get(Grant, row.grant_id).revoked_at is None
    assert owner.refresh(tokens["refresh_token"]).status_code == 200


# --- Client ID Metadata Documents ------------------------------------------------------------------------------------


class DocumentServer(ThreadingHTTPServer):
    document: dict = {}
    hits: int = 0


class DocumentHandler(BaseHTTPRequestHandler):
    server: DocumentServer

    def do_GET(self) -> None:
        self.server.hits += 1
        body = json.dumps(self.server.document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def document_server() -> Iterator[DocumentServer]:
    server = DocumentServer(("127.0.0.1", 0), DocumentHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def dev_proxy(start_proxy) -> RunningProxy:
    """Loopback http documents are a development setting; production requires https and public addresses."""
    return start_proxy(CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS="true")


def document_client(proxy: RunningProxy, server: DocumentServer, **document) -> McpOAuthClient:
    client_id = f"http://127.0.0.1:{server.server_port}/oauth/{secrets.token_hex(4)}/client.json"
    server.document = {
        "client_id": client_id,
        "client_name": "Document Client",
        "redirect_uris": ["http://127.0.0.1:9/cimd-callback"],
        "token_endpoint_auth_method": "none",
        **document,
    }
    return McpOAuthClient(proxy.url, client_id, redirect_uri="http://127.0.0.1:9/cimd-callback")


def test_metadata_document_naming_another_client_id_is_a_page(
    dev_proxy: RunningProxy, document_server: DocumentServer
) -> None:
    client = document_client(
        dev_proxy, document_server, client_id=f"http://127.0.0.1:{document_server.server_port}/oauth/someone-else.json"
    )
    response = get(client.authorize_url())
    assert_page(response, text="client_id")
    assert document_server.hits >= 1


def test_metadata_document_redirect_uri_not_listed_is_a_page(
    dev_proxy: RunningProxy, document_server: DocumentServer
) -> None:
    client = document_client(dev_proxy, document_server)
    assert get(client.authorize_url()).status_code == 200  # the document itself is fine
    assert_page(get(client.authorize_url(redirect_uri="http://127.0.0.1:9/elsewhere")))
    assert_page(get(client.authorize_url(redirect_uri="https://attacker.example/cimd-callback")))


def test_unreachable_metadata_document_is_a_page_naming_the_problem(dev_proxy: RunningProxy) -> None:
    closed_port = free_port()
    client_id = f"http://127.0.0.1:{closed_port}/oauth/client.json"
    client = McpOAuthClient(dev_proxy.url, client_id, redirect_uri="http://127.0.0.1:9/cimd-callback")
    response = get(client.authorize_url())
    assert_page(response, text=client_id)
    assert "could not connect" in unescape(response.text), response.text[:1500]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1", "0.0.0.0"])
def test_metadata_document_on_a_private_address_is_refused_without_fetching(proxy: RunningProxy, host: str) -> None:
    """With CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS off, https URLs that resolve to non-public addresses are refused
    before any connection (SSRF guard)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        client_id = f"https://{host}:{port}/oauth/client.json"
        client = McpOAuthClient(proxy.url, client_id, redirect_uri="http://127.0.0.1:9/cimd-callback")
        response = get(client.authorize_url())
        assert_page(response, text="Refusing to fetch")
        # Not a DNS oracle: the page does not say what the host resolves to, nor what kind of address it is.
        page = unescape(response.text).replace(client_id, "")
        assert "resolves to" not in page and "loopback" not in page and "private" not in page, page[:1500]
        if host == "localhost":
            assert "127.0.0.1" not in page and "::1" not in page
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing connected


def test_http_metadata_document_is_not_fetched_in_production(
    proxy: RunningProxy, document_server: DocumentServer
) -> None:
    client = document_client(proxy, document_server)
    assert_page(get(client.authorize_url()))
    assert document_server.hits == 0


# --- logs ------------------------------------------------------------------------------------------------------------


def full_flow_secrets(proxy: RunningProxy) -> dict[str, str]:
    """A complete flow (consent, upstream login, callback, code, refresh, revoke); every secret it involved."""
    client = new_client(proxy, auth_method="client_secret_post")
    browser = proxy.browser()
    _, form = consent_form(proxy, client, browser)
    url = callback_url(proxy, client, browser)
    back = get(url, browser.session)
    assert back.status_code == 302, back.text[:500]
    code = query_of(back.headers["Location"])["code"]
    first = client.exchange(code)
    assert first.status_code == 200, first.text
    second = client.refresh(first.json()["refresh_token"])
    assert second.status_code == 200, second.text
    assert client.revoke(second.json()["refresh_token"]).status_code == 200
    with proxy.app.app_context():
        row = db.session.scalar(
            select(Token).where(Token.access_token_hash == hash_token(first.json()["access_token"]))
        )
        grant = db.session.get(Grant, row.grant_id)
        box = components(proxy.app).secret_box
        upstream_access = box.decrypt(grant.upstream_access_token, f"grant:{grant.id}:upstream_access_token")
        upstream_refresh = box.decrypt(grant.upstream_refresh_token, f"grant:{grant.id}:upstream_refresh_token")
    return {
        "access token": first.json()["access_token"],
        "refresh token": first.json()["refresh_token"],
        "rotated access token": second.json()["access_token"],
        "rotated refresh token": second.json()["refresh_token"],
        "authorization code": code,
        "PKCE code_verifier": client.verifier,
        "client secret": client.client_secret,
        "CSRF token": form["csrf_token"],
        "upstream access token": upstream_access,
        "upstream refresh token": upstream_refresh,
        "upstream authorization code": query_of(url)["code"],
    }


def leaks(records: list[logging.LogRecord], secrets_by_name: dict[str, str]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    found = []
    for record in records:
        line = formatter.format(record)
        found += [
            f"{name} in {record.name} {record.levelname}: {line[:200]!r}"
            for name, value in secrets_by_name.items()
            if value and value in line
        ]
    return found


# Loggers whose level the migrations' alembic.ini sets (fileConfig) in whatever process ran them; a server
# started by `make run` (migrations in their own process) has them unset, inheriting the root level.
MIGRATION_CONFIGURED_LOGGERS = ("sqlalchemy.engine", "alembic", "flask_migrate")


@pytest.fixture
def every_logger_at_debug(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The root logger at DEBUG (an operator debugging the proxy) with every logger enabled; restored afterwards.

    Alembic's `fileConfig` (run by the migrations in this process) disables every logger that existed at that
    moment and pins the levels above; without undoing that, records from oauthproxy.* and authlib would silently
    go missing. Levels the application sets on purpose are left alone.
    """
    saved = []
    for logger in logging.root.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            saved.append((logger, logger.disabled, logger.level))
            logger.disabled = False
            if logger.name in MIGRATION_CONFIGURED_LOGGERS:
                logger.setLevel(logging.NOTSET)
    caplog.set_level(logging.DEBUG)
    yield caplog
    for logger, disabled, level in saved:
        logger.disabled, logger.level = disabled, level


def test_no_secret_in_application_logs(proxy: RunningProxy, every_logger_at_debug: pytest.LogCaptureFixture) -> None:
    """Everything the proxy's threads log at DEBUG (oauthproxy, authlib, SQLAlchemy statements and parameters,
    urllib3 calls to the provider), except the access log, which the next test covers. The test's own thread is
    left out: its requests/urllib3 lines are the test client's, not the proxy's."""
    test_thread = threading.get_ident()
    found = full_flow_secrets(proxy)
    records = [r for r in every_logger_at_debug.records if r.thread != test_thread and r.name != "werkzeug"]
    assert records, "no log records captured from the proxy"
    leaked = leaks(records, found)
    assert not leaked, "\n".join(leaked)


def test_no_secret_in_access_log(proxy: RunningProxy, every_logger_at_debug: pytest.LogCaptureFixture) -> None:
    """The request log of `flask --app wsgi run` (werkzeug; its line shows the query string, like gunicorn's
    default access-log format). The upstream provider's code arrives at /callback in the query."""
    test_thread = threading.get_ident()
    found = full_flow_secrets(proxy)
    records = [r for r in every_logger_at_debug.records if r.thread != test_thread and r.name == "werkzeug"]
    assert any("/callback" in r.getMessage() for r in records), "werkzeug request log not captured"
    leaked = leaks(records, found)
    assert not leaked, "\n".join(leaked)


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
