"""End to end against the real OpenID provider: register → authorize → consent → upstream → callback → token → refresh → revoke."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from sqlalchemy import select

from oauthproxy.components import components
from oauthproxy.crypto import hash_token
from oauthproxy.models import Grant, Token, db
from tests.conftest import RunningProxy
from tests.flows import McpOAuthClient
from tests.proxy_fixtures import write_routes


def assert_token_response(response: requests.Response, scope: str | None = None) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert len(body["access_token"]) >= 43 and len(body["refresh_token"]) >= 43  # 256 bits, base64url
    if scope is not None:
        assert body["scope"] == scope
    return body


def complete_flow(proxy: RunningProxy, client: McpOAuthClient, login_hint: str = "alice") -> dict:
    browser = proxy.browser(login_hint)
    result = client.login(browser, resource=proxy.app.config["SETTINGS"].mcp_resource)
    assert result["state"] == client.state
    assert result["iss"] == proxy.url
    assert browser.consent_pages_seen == 1
    return assert_token_response(client.exchange(result["code"]), scope="openid email profile")


@pytest.mark.parametrize("auth_method", ["none", "client_secret_basic", "client_secret_post", None])
def test_registered_client_full_lifecycle(proxy: RunningProxy, auth_method: str | None) -> None:
    client = proxy.register_client(auth_method=auth_method)
    if auth_method is None:
        assert client.auth_method == "client_secret_basic"  # RFC 7591 §2 default
    tokens = complete_flow(proxy, client, login_hint="bob")

    with proxy.app.app_context():
        row = db.session.scalar(select(Token).where(Token.access_token_hash == hash_token(tokens["access_token"])))
        grant = db.session.get(Grant, row.grant_id)
        assert (grant.user_email, grant.user_name) == ("bob@example.org", "Bob Builder")
        assert grant.resource == proxy.url + "/mcp"
        # upstream tokens are stored encrypted, never in clear
        assert grant.upstream_access_token.startswith("v1.") and grant.upstream_refresh_token.startswith("v1.")
        upstream_access = components(proxy.app).secret_box.decrypt(
            grant.upstream_access_token, f"grant:{grant.id}:upstream_access_token"
        )
    assert (
        requests.get(
            proxy.provider.url("/me"), headers={"Authorization": f"Bearer {upstream_access}"}, timeout=5
        ).json()["email"]
        == "bob@example.org"
    )

    # refresh rotates; the new pair works, and so does the next refresh
    second = assert_token_response(client.refresh(tokens["refresh_token"]), scope="openid email profile")
    assert second["refresh_token"] != tokens["refresh_token"]
    third = assert_token_response(client.refresh(second["refresh_token"]))
    assert third["access_token"] not in (tokens["access_token"], second["access_token"])

    # revocation ends the grant: its refresh token no longer works
    assert client.revoke(third["refresh_token"]).status_code == 200
    refused = client.refresh(third["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"


def test_consent_is_remembered_per_client(proxy: RunningProxy) -> None:
    client = proxy.register_client()
    browser = proxy.browser()
    first = client.login(browser)
    assert "code" in first and browser.consent_pages_seen == 1
    second = client.login(browser)
    assert "code" in second and browser.consent_pages_seen == 1  # no second consent page
    other = proxy.register_client(client_name="Another Client")
    other.login(browser)
    assert browser.consent_pages_seen == 2  # a new client must be approved on its own


def test_consent_is_remembered_per_resource(start_proxy, tmp_path) -> None:
    routes = write_routes(
        tmp_path / "routes.toml",
        [
            {"name": "mail", "path": "/mcp/mail", "url": "http://127.0.0.1:9/mail"},
            {"name": "files", "path": "/mcp/files", "url": "http://127.0.0.1:9/files"},
        ],
    )
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=routes)
    client = proxy.register_client()
    browser = proxy.browser()
    assert "code" in client.login(browser, resource=proxy.url + "/mcp/mail")
    assert "code" in client.login(browser, resource=proxy.url + "/mcp/mail")
    assert browser.consent_pages_seen == 1
    # Approving the client for the mail server did not approve it for the files server.
    assert "code" in client.login(browser, resource=proxy.url + "/mcp/files")
    assert browser.consent_pages_seen == 2
    assert "code" in client.login(browser, resource=proxy.url + "/mcp/mail")
    assert "code" in client.login(browser, resource=proxy.url + "/mcp/files")
    assert browser.consent_pages_seen == 2  # both approvals are remembered


def test_denied_consent_returns_access_denied(proxy: RunningProxy) -> None:
    client = proxy.register_client()
    url = proxy.browser().authorize(client.authorize_url(), client.redirect_uri, decision="deny")
    result = dict(requests.utils.urlparse(url)._asdict())
    params = dict(p.split("=", 1) for p in result["query"].split("&"))
    assert params["error"] == "access_denied"
    assert params["state"] == client.state
    assert requests.utils.unquote(params["iss"]) == proxy.url


@pytest.mark.parametrize(("login_hint", "error"), [("deny", "access_denied"), ("error", "server_error")])
def test_upstream_denial_or_failure_reaches_the_client(proxy: RunningProxy, login_hint: str, error: str) -> None:
    client = proxy.register_client()
    result = client.login(proxy.browser(login_hint))
    assert result["error"] == error
    assert result["state"] == client.state
    assert result["iss"] == proxy.url
    assert "code" not in result


def test_provider_failing_at_the_code_exchange_is_temporarily_unavailable(
    proxy: RunningProxy, provider_failure_reset
) -> None:
    # A 500 from the provider's token endpoint is transient: the client may retry the sign-in later.
    client = proxy.register_client()
    provider_failure_reset.set_failure("code_server_error")
    result = client.login(proxy.browser())
    assert result["error"] == "temporarily_unavailable", result
    assert result["state"] == client.state and "code" not in result


def test_provider_hanging_at_the_code_exchange_is_temporarily_unavailable(
    proxy: RunningProxy, provider_failure_reset
) -> None:
    # The provider answers the token request after 3 s; the proxy's provider timeout is cut to 1 s for the test
    # (10 s by default, PROVIDER_HTTP_TIMEOUT).
    components(proxy.app).login_provider._client.client_kwargs["default_timeout"] = 1.0
    client = proxy.register_client()
    browser = proxy.browser()
    provider_failure_reset.set_failure("token_delay", delay_ms=3000)
    started = time.monotonic()
    result = client.login(browser)
    assert result["error"] == "temporarily_unavailable", result
    assert time.monotonic() - started < 3, "the proxy waited for the hung provider"


def test_provider_refusing_connections_at_the_code_exchange_is_temporarily_unavailable(start_proxy) -> None:
    # Discovery and login work; the token endpoint (configured explicitly) refuses connections.
    probe = start_proxy()
    discovery = probe.provider.discovery()
    proxy = start_proxy(
        OAUTH_AUTHORIZE_URL=discovery["authorization_endpoint"],
        OAUTH_TOKEN_URL="http://127.0.0.1:9/token",
        OAUTH_USERINFO_URL=discovery["userinfo_endpoint"],
    )
    client = proxy.register_client()
    result = client.login(proxy.browser())
    assert result["error"] == "temporarily_unavailable", result
    assert "code" not in result


def test_user_outside_allowlist_sees_page_and_client_gets_access_denied(start_proxy) -> None:
    proxy = start_proxy(ALLOWED_EMAIL_DOMAINS="example.com")
    client = proxy.register_client()
    browser = proxy.browser("carol")
    with pytest.raises(AssertionError, match="403"):
        client.login(browser)
    page = browser.last_page
    assert page.status_code == 403
    assert "carol@outsider.test is not allowed" in page.text
    continue_url = requests.utils.unquote(page.text.split('id="continue" href="')[1].split('"')[0]).replace(
        "&amp;", "&"
    )
    assert continue_url.startswith(client.redirect_uri)
    assert "error=access_denied" in continue_url and f"state={client.state}" in continue_url
    # alice is in the allowed domain
    assert "code" in client.login(proxy.browser("alice"))


def test_unverified_email_does_not_pass_the_allowlist(start_proxy) -> None:
    proxy = start_proxy(ALLOWED_EMAIL_DOMAINS="example.com")
    client = proxy.register_client()
    browser = proxy.browser("dave")  # dave@example.com, email_verified false
    with pytest.raises(AssertionError, match="403"):
        client.login(browser)


def test_reused_authorization_code_is_refused_and_revokes_its_tokens(proxy: RunningProxy) -> None:
    client = proxy.register_client()
    result = client.login(proxy.browser())
    tokens = assert_token_response(client.exchange(result["code"]))
    replay = client.exchange(result["code"])
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    refused = client.refresh(tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"


def test_concurrent_redemptions_of_one_code_succeed_once_and_revoke_what_it_gave(proxy: RunningProxy) -> None:
    client = proxy.register_client()
    code = client.login(proxy.browser())["code"]
    results: list[requests.Response] = []
    start = threading.Barrier(4)

    def redeem() -> None:
        start.wait()
        results.append(client.exchange(code))

    threads = [threading.Thread(target=redeem) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [response for response in results if response.status_code == 200]
    assert len(winners) == 1, [response.status_code for response in results]
    # OAuth 2.1 §4.1.3: the code was presented twice, so what the first redemption produced is revoked, whether
    # the second one raced it (the redeeming UPDATE lost) or came after it.
    refused = client.refresh(winners[0].json()["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"


def test_refresh_grace_window_then_family_revocation(start_proxy) -> None:
    proxy = start_proxy(REFRESH_GRACE_SECONDS="2")
    client = proxy.register_client()
    tokens = assert_token_response(client.exchange(client.login(proxy.browser())["code"]))
    first = assert_token_response(client.refresh(tokens["refresh_token"]))
    # The first response was "lost": a retry with the old token inside the grace window still succeeds.
    retry = assert_token_response(client.refresh(tokens["refresh_token"]))
    assert retry["refresh_token"] != first["refresh_token"]
    assert assert_token_response(client.refresh(retry["refresh_token"]))
    time.sleep(2.5)
    # Later, a replay of the rotated token is theft: the whole family is revoked.
    replay = client.refresh(tokens["refresh_token"])
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    with proxy.app.app_context():
        row = db.session.scalar(select(Token).where(Token.refresh_token_hash == hash_token(tokens["refresh_token"])))
        assert db.session.get(Grant, row.grant_id).revoked_reason == "refresh_token_reuse"
    after = client.refresh(first["refresh_token"])
    assert after.status_code == 400


def test_client_identified_by_metadata_document_full_lifecycle(start_proxy, document_server) -> None:
    # Loopback http documents are a development setting; production requires https and public addresses.
    proxy = start_proxy(CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS="true")
    client_id = f"http://127.0.0.1:{document_server.server_port}/oauth/client.json"
    redirect_uri = "http://127.0.0.1:9/cimd-callback"
    document_server.document = {
        "client_id": client_id,
        "client_name": "Document Client",
        "redirect_uris": [redirect_uri],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
    }
    client = McpOAuthClient(proxy.url, client_id, redirect_uri=redirect_uri)
    browser = proxy.browser()
    browser.session.get(client.authorize_url(), timeout=10)  # warm: the consent page names the client
    page = browser.session.get(client.authorize_url(), timeout=10)
    assert "Document Client" in page.text and client_id in page.text
    tokens = complete_flow(proxy, client)
    second = assert_token_response(client.refresh(tokens["refresh_token"]))
    assert client.revoke(second["access_token"]).status_code == 200
    assert client.refresh(second["refresh_token"]).status_code == 400
    # a redirect URI the document does not list is refused with a page, not a redirect
    bad = requests.get(
        client.authorize_url(redirect_uri="http://127.0.0.1:9/elsewhere"), allow_redirects=False, timeout=10
    )
    assert bad.status_code == 400 and "Location" not in bad.headers


def test_upstream_client_secret_with_reserved_characters(start_proxy) -> None:
    # RFC 6749 §2.3.1 form-encodes Basic credentials; a secret with `+`, `/`, `%` must still work upstream.
    proxy = start_proxy(OAUTH_CLIENT_SECRET="s3cret+with/slash%25and=equals")
    client = proxy.register_client()
    result = client.login(proxy.browser("bob"))
    assert "code" in result, result
    assert_token_response(client.exchange(result["code"]))
