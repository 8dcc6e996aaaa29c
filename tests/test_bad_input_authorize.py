"""Bad input at /authorize: a page before the client and its redirect URI are validated, an error redirect after."""

from __future__ import annotations

import secrets
from urllib.parse import urlencode, urlsplit

import pytest
import requests

from oauthproxy.crypto import hash_token
from oauthproxy.models import AuthorizationCode, db
from tests.bad_input_fixtures import (
    HTTPS_PUBLIC_URL,
    assert_error_redirect,
    assert_garbage_never_causes_a_server_error,
    assert_page,
    get,
    https_consent_page,
    new_client,
)
from tests.conftest import RunningProxy
from tests.flows import query_of
from tests.support.databases import SQLITE_ONLY

# --- /authorize: before the client and redirect URI are validated, errors are pages ----------------------------------


@SQLITE_ONLY
def test_authorize_without_client_id_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    assert_page(get(client.authorize_url(client_id=None)), text="no client_id")


@SQLITE_ONLY
def test_authorize_with_unknown_client_id_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(client_id="no-such-client-" + secrets.token_hex(8)))
    assert_page(response, text="is not registered here")


@SQLITE_ONLY
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


@SQLITE_ONLY
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


@SQLITE_ONLY
def test_authorize_page_escapes_a_hostile_client_id(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(client_id='<script>alert("x")</script>'))
    assert_page(response)
    assert "<script>alert" not in response.text


@SQLITE_ONLY
def test_authorize_with_unregistered_redirect_uri_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(redirect_uri="https://attacker.example/steal"))
    assert_page(response)
    assert 'href="https://attacker.example' not in response.text


@SQLITE_ONLY
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


@SQLITE_ONLY
def test_authorize_without_redirect_uri_when_several_are_registered_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy, redirect_uris=["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"])
    assert_page(get(client.authorize_url(redirect_uri=None)))


@SQLITE_ONLY
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


@SQLITE_ONLY
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


@SQLITE_ONLY
@pytest.mark.parametrize("name", ["client_id", "redirect_uri", "state", "code_challenge", "resource"])
def test_authorize_with_a_repeated_parameter_is_a_page(proxy: RunningProxy, name: str) -> None:
    client = new_client(proxy)
    url = client.authorize_url(resource=proxy.app.config["SETTINGS"].mcp_resource)
    value = query_of(url)[name]
    assert_page(get(url + "&" + urlencode({name: value + "x"})), text="more than once")


# --- /authorize: after validation, errors go back to the client with state and iss -----------------------------------


@SQLITE_ONLY
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


@SQLITE_ONLY
def test_authorize_without_response_type_redirects_with_error(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(response_type=None))
    params = query_of(response.headers.get("Location", ""))
    assert params.get("error") in ("invalid_request", "unsupported_response_type"), (response.status_code, params)
    assert_error_redirect(response, proxy, client, params["error"])


@SQLITE_ONLY
def test_authorize_without_code_challenge_redirects_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(code_challenge=None, code_challenge_method=None))
    assert_error_redirect(response, proxy, client, "invalid_request")


@SQLITE_ONLY
def test_authorize_with_plain_code_challenge_redirects_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    verifier = secrets.token_urlsafe(48)
    response = get(client.authorize_url(code_challenge=verifier, code_challenge_method="plain"))
    assert_error_redirect(response, proxy, client, "invalid_request")


@SQLITE_ONLY
def test_authorize_without_code_challenge_method_redirects_invalid_request(proxy: RunningProxy) -> None:
    """OAuth 2.1 defaults a missing method to plain, which is refused; S256 must be named."""
    client = new_client(proxy)
    response = get(client.authorize_url(code_challenge_method=None))
    assert_error_redirect(response, proxy, client, "invalid_request")


@SQLITE_ONLY
@pytest.mark.parametrize("method", ["s256", "S512", "none"])
def test_authorize_with_unknown_code_challenge_method_redirects_invalid_request(
    proxy: RunningProxy, method: str
) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(code_challenge_method=method))
    assert_error_redirect(response, proxy, client, "invalid_request")


@SQLITE_ONLY
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


@SQLITE_ONLY
def test_authorize_accepts_resource_with_upper_case_host(start_proxy) -> None:
    proxy = start_proxy(PUBLIC_URL=HTTPS_PUBLIC_URL)
    _, page = https_consent_page(proxy, "Upper", resource="https://PROXY.Example.TEST/mcp")
    assert f"{HTTPS_PUBLIC_URL}/mcp" in page.text


@SQLITE_ONLY
@pytest.mark.parametrize("scope", ["admin", "openid admin", "https://www.googleapis.com/auth/gmail.send"])
def test_authorize_with_unsupported_scope_redirects_invalid_scope(proxy: RunningProxy, scope: str) -> None:
    client = new_client(proxy)
    response = get(client.authorize_url(scope=scope))
    assert_error_redirect(response, proxy, client, "invalid_scope")


@pytest.mark.parametrize("path", ["/authorize"])  # the garbage sweep of tests.bad_input_fixtures, at this endpoint
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)
