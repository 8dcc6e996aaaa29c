"""Bad input at the consent step: forged, tampered, stale or cross-browser forms are refused; cookies locked down."""

from __future__ import annotations

import base64
import json
import secrets
import zlib
from urllib.parse import urlencode

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from oauthproxy.models import PendingAuthorization
from tests.bad_input_fixtures import (
    HTTPS_PUBLIC_URL,
    assert_error_redirect,
    assert_garbage_never_causes_a_server_error,
    assert_page,
    consent_form,
    cookie_attributes,
    count,
    get,
    https_consent_page,
    new_client,
    post_consent,
)
from tests.conftest import RunningProxy
from tests.flows import hidden_inputs
from tests.support.databases import SQLITE_ONLY

# --- consent ---------------------------------------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize("missing", [True, False], ids=["missing", "wrong"])
def test_consent_without_the_pages_csrf_token_is_refused(proxy: RunningProxy, missing: bool) -> None:
    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    if missing:
        del form["csrf_token"]
    else:
        form["csrf_token"] = secrets.token_urlsafe(32)
    before = count(proxy, PendingAuthorization)
    assert_page(post_consent(proxy, browser, {**form, "decision": "approve"}))
    assert count(proxy, PendingAuthorization) == before


@SQLITE_ONLY
def test_consent_form_posted_from_another_browser_is_refused(proxy: RunningProxy) -> None:
    """A form (with its CSRF token) lifted from the victim's page does not work in the attacker's browser."""
    client = new_client(proxy)
    _, form = consent_form(proxy, client)
    other = proxy.browser()
    consent_form(proxy, client, other)  # the other browser has a session (and CSRF token) of its own
    before = count(proxy, PendingAuthorization)
    assert_page(post_consent(proxy, other, {**form, "decision": "approve"}))
    assert count(proxy, PendingAuthorization) == before


@SQLITE_ONLY
def test_consent_with_tampered_request_is_refused(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    signed = form["request"]
    tampered = signed[:10] + ("A" if signed[10] != "A" else "B") + signed[11:]
    before = count(proxy, PendingAuthorization)
    assert_page(post_consent(proxy, browser, {**form, "request": tampered, "decision": "approve"}))
    assert_page(post_consent(proxy, browser, {**form, "request": "", "decision": "approve"}))
    assert count(proxy, PendingAuthorization) == before


@SQLITE_ONLY
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


@SQLITE_ONLY
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


@SQLITE_ONLY
@pytest.mark.parametrize("decision", [None, "", "APPROVE", "yes"])
def test_consent_without_an_explicit_approval_is_a_denial(proxy: RunningProxy, decision: str | None) -> None:
    client = new_client(proxy)
    browser, form = consent_form(proxy, client)
    if decision is not None:
        form["decision"] = decision
    before = count(proxy, PendingAuthorization)
    assert_error_redirect(post_consent(proxy, browser, form), proxy, client, "access_denied")
    assert count(proxy, PendingAuthorization) == before


@SQLITE_ONLY
def test_consent_get_is_not_allowed(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    _, form = consent_form(proxy, client)
    response = get(proxy.url + "/authorize/consent?" + urlencode({**form, "decision": "approve"}))
    assert response.status_code == 405
    assert "Location" not in response.headers


@SQLITE_ONLY
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
    web, page = https_consent_page(proxy, "Secure Cookies")
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


@pytest.mark.parametrize(
    "path", ["/authorize/consent"]
)  # the garbage sweep of tests.bad_input_fixtures, at this endpoint
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)
