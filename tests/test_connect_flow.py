"""The connect step (issue 13): a route that takes each user's own credential asks for it once, between the login and
the MCP client's code; a real second provider for `credential = "oauth"`, the real MCP server for `user_api_key`."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import requests
from sqlalchemy import func, select, update

from oauthproxy.consent import CONSENT_PAGE_HEADERS
from oauthproxy.models import DownstreamConnection, Grant, PendingConnection, db, utcnow
from tests.connect_fixtures import (
    ROUTE_PATH,
    ConnectProxy,
    RefusingDownstream,
    connect_with_oauth,
    continue_to_provider,
    form_fields,
    get,
    mcp_initialize,
    page_text,
    post_form,
    submit_key,
    to_connect_page,
)
from tests.flows import McpOAuthClient, query_of
from tests.provider_fixture import OidcProvider
from tests.support.ports import free_port

HELP_URL = "https://keys.example.test/where-is-my-key"


def grants_of(connect: ConnectProxy, client: McpOAuthClient) -> int:
    with connect.proxy.app.app_context():
        return db.session.scalar(select(func.count()).select_from(Grant).where(Grant.client_id == client.client_id))


def pending_rows(connect: ConnectProxy) -> int:
    with connect.proxy.app.app_context():
        return db.session.scalar(
            select(func.count()).select_from(PendingConnection).where(PendingConnection.route == connect.route_name)
        )


def assert_page_headers(response: requests.Response) -> None:
    for name, value in CONSENT_PAGE_HEADERS.items():
        assert response.headers.get(name) == value, (name, dict(response.headers))


def capture_proxy_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Everything the proxy logs (its own loggers at DEBUG, the server's request lines); not the test's HTTP client,
    whose debug lines show the URLs it requested."""
    caplog.set_level(logging.DEBUG, logger="oauthproxy")
    caplog.set_level(logging.INFO, logger="werkzeug")


def redeem(client: McpOAuthClient, result: dict[str, str]) -> dict:
    assert "code" in result, result
    response = client.exchange(result["code"])
    assert response.status_code == 200, response.text
    return response.json()


# --- credential = "oauth" ------------------------------------------------------------------------------------------


def test_oauth_route_connects_once_then_issues_the_code(
    start_connect_proxy, connect_provider: OidcProvider, caplog: pytest.LogCaptureFixture
) -> None:
    capture_proxy_logs(caplog)
    connect = start_connect_proxy("oauth")
    client, browser = connect.client(), connect.browser()

    page_url = to_connect_page(connect, client, browser)
    assert page_url.startswith(connect.url + "/connect/")
    page = get(browser.session, page_url)
    assert page.status_code == 200
    assert_page_headers(page)
    text = page_text(page)
    assert f"needs you to sign in to {connect_provider.issuer.removeprefix('http://')}" in text, text[:1500]
    assert connect.route_name in text and ROUTE_PATH in text and "alice@example.com" in text
    assert 'value="cancel"' in page.text and 'value="continue"' in page.text
    # Nothing of the login is a grant yet, and the client has no code.
    assert grants_of(connect, client) == 0

    provider_url = continue_to_provider(browser, page_url)
    assert provider_url.startswith(connect_provider.issuer + "/auth?"), provider_url
    hop = query_of(provider_url)
    assert hop["redirect_uri"] == connect.url + "/connect/callback"
    assert hop["code_challenge_method"] == "S256" and hop["client_id"] == connect.connection_client_id
    # The page's token was single-use: the hop's state replaced it.
    assert get(browser.session, page_url).status_code == 400

    result = query_of(browser.authorize(provider_url, client.redirect_uri))
    assert result["state"] == client.state and result["iss"] == connect.url
    tokens = redeem(client, result)
    assert mcp_initialize(connect, tokens["access_token"]).status_code == 200

    [connection] = connect.connections()
    assert (connection.kind, connection.provider, connection.refused_at) == ("oauth", connect_provider.issuer, None)
    assert connection.access_token.startswith("v1.") and connection.refresh_token.startswith("v1.")
    downstream_token = connect.connection_secret(connection)
    # A real token of the downstream's own authorization server, for the same person.
    me = requests.get(connect_provider.url("/me"), headers={"Authorization": f"Bearer {downstream_token}"}, timeout=10)
    assert me.status_code == 200 and me.json()["email"] == "alice@example.com", me.text
    assert pending_rows(connect) == 0
    assert downstream_token not in caplog.text
    page_token = page_url.rsplit("/", 1)[1]
    assert "/connect/[redacted]" in caplog.text and page_token not in caplog.text

    # The same user authorizing again (another client too) goes straight to the code: no connect page.
    other = connect.client()
    again = other.login(browser, resource=connect.resource)
    assert mcp_initialize(connect, redeem(other, again)["access_token"]).status_code == 200
    assert len(connect.connections()) == 1

    # Connections are per user: Bob is asked for his own.
    bob = connect.browser("bob")
    assert to_connect_page(connect, connect.client(), bob).startswith(connect.url + "/connect/")


def test_refused_connection_is_asked_again(start_connect_proxy) -> None:
    connect = start_connect_proxy("oauth")
    browser = connect.browser()
    redeem(client := connect.client(), connect_with_oauth(connect, client, browser))
    with connect.proxy.app.app_context():
        db.session.execute(
            update(DownstreamConnection)
            .where(DownstreamConnection.route == connect.route_name)
            .values(refused_at=utcnow())
        )
        db.session.commit()

    page_url = to_connect_page(connect, connect.client(), browser)
    assert "stopped working" in page_text(get(browser.session, page_url))
    result = query_of(browser.authorize(continue_to_provider(browser, page_url), connect.client().redirect_uri))
    assert "code" in result
    [connection] = connect.connections()
    assert connection.refused_at is None  # connecting again cleared it


def test_expired_connection_without_refresh_token_is_asked_again(start_connect_proxy) -> None:
    connect = start_connect_proxy("oauth")
    browser = connect.browser()
    redeem(client := connect.client(), connect_with_oauth(connect, client, browser))
    with connect.proxy.app.app_context():
        db.session.execute(
            update(DownstreamConnection)
            .where(DownstreamConnection.route == connect.route_name)
            .values(refresh_token=None, expires_at=utcnow() - timedelta(minutes=1))
        )
        db.session.commit()
    assert to_connect_page(connect, connect.client(), browser).startswith(connect.url + "/connect/")


def test_cancel_on_the_connect_page_sends_the_client_access_denied(start_connect_proxy) -> None:
    connect = start_connect_proxy("oauth")
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    response = post_form(browser, page_url, {**form_fields(get(browser.session, page_url)), "decision": "cancel"})
    assert response.status_code == 302
    result = query_of(response.headers["Location"])
    assert response.headers["Location"].startswith(client.redirect_uri + "?")
    assert (result["error"], result["state"], result["iss"]) == ("access_denied", client.state, connect.url)
    assert grants_of(connect, client) == 0 and connect.connections() == [] and pending_rows(connect) == 0


# --- credential = "user_api_key" -----------------------------------------------------------------------------------


@pytest.fixture
def key_proxy(start_connect_proxy) -> ConnectProxy:
    return start_connect_proxy(
        "user_api_key", credential_header="X-API-Key", api_key_help_url=HELP_URL, api_key_verify=True
    )


def test_api_key_route_asks_once_then_issues_the_code(
    key_proxy: ConnectProxy, caplog: pytest.LogCaptureFixture
) -> None:
    capture_proxy_logs(caplog)
    connect = key_proxy
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    page = get(browser.session, page_url)
    assert page.status_code == 200
    assert_page_headers(page)
    assert 'type="password"' in page.text and 'autocomplete="off"' in page.text and 'name="api_key"' in page.text
    assert f'href="{HELP_URL}"' in page.text
    assert "needs your API key" in page_text(page) and ROUTE_PATH in page.text
    assert grants_of(connect, client) == 0

    key = "sk-test-" + "k" * 40
    response = submit_key(browser, page_url, f"  {key}\t")  # pasted with blanks around it
    assert response.status_code == 302, page_text(response)[:1500]
    assert response.headers["Location"].startswith(client.redirect_uri + "?")
    tokens = redeem(client, query_of(response.headers["Location"]))
    assert mcp_initialize(connect, tokens["access_token"]).status_code == 200

    [connection] = connect.connections()
    assert connection.kind == "user_api_key" and connection.refresh_token is None
    assert connect.connection_secret(connection) == key
    assert key not in caplog.text

    other = connect.client()
    assert "code" in other.login(browser, resource=connect.resource)  # no second key page


def test_api_key_page_says_when_the_last_key_was_refused(key_proxy: ConnectProxy) -> None:
    browser = key_proxy.browser()
    page_url = to_connect_page(key_proxy, key_proxy.client(), browser)
    assert submit_key(browser, page_url, "first-key").status_code == 302
    with key_proxy.proxy.app.app_context():
        db.session.execute(
            update(DownstreamConnection)
            .where(DownstreamConnection.route == key_proxy.route_name)
            .values(refused_at=utcnow())
        )
        db.session.commit()
    page_url = to_connect_page(key_proxy, key_proxy.client(), browser)
    assert "refused the key you gave before" in page_text(get(browser.session, page_url))
    assert submit_key(browser, page_url, "second-key").status_code == 302
    [connection] = key_proxy.connections()
    assert key_proxy.connection_secret(connection) == "second-key" and connection.refused_at is None


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "Enter your API key."),
        ("   \t ", "Enter your API key."),
        ("k" * 4097, "longer than 4096 characters"),
        ("abc\ndef", "line break or another control character"),
        ("abc\r\nX-Other: 1", "line break or another control character"),
        ("abc\x00def", "line break or another control character"),
        ("abc\x7fdef", "line break or another control character"),
        ("abc\u2028def", "line break or another control character"),
    ],
)
def test_unusable_keys_are_refused_with_a_clear_message(key_proxy: ConnectProxy, key: str, message: str) -> None:
    client, browser = key_proxy.client(), key_proxy.browser()
    page_url = to_connect_page(key_proxy, client, browser)
    response = submit_key(browser, page_url, key)
    assert response.status_code == 400 and "Location" not in response.headers
    assert_page_headers(response)
    text = page_text(response)
    assert message in text, text[:1500]
    if key.strip():
        assert key.strip() not in response.text  # never echoed back
    assert 'name="api_key"' in response.text  # the form again, usable
    assert key_proxy.connections() == [] and grants_of(key_proxy, client) == 0
    # The page still works: a good key after a bad one.
    assert submit_key(browser, page_url, "good-key").status_code == 302


def test_a_key_the_downstream_refuses_is_not_stored(
    start_connect_proxy, refusing_downstream: RefusingDownstream
) -> None:
    connect = start_connect_proxy(
        "user_api_key", url=refusing_downstream.url, credential_header="X-API-Key", api_key_verify=True
    )
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    response = submit_key(browser, page_url, "wrong-key-123")
    assert response.status_code == 400
    assert "The server refused this key" in page_text(response)
    assert "wrong-key-123" not in response.text
    assert refusing_downstream.keys_seen == ["wrong-key-123"]  # tried as the route sends it
    assert connect.connections() == [] and grants_of(connect, client) == 0
    assert get(browser.session, page_url).status_code == 200  # still there, for another try


def test_a_key_is_not_stored_while_the_downstream_is_unreachable(start_connect_proxy) -> None:
    connect = start_connect_proxy(
        "user_api_key", url=f"http://127.0.0.1:{free_port()}/mcp", credential_header="X-API-Key", api_key_verify=True
    )
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    response = submit_key(browser, page_url, "some-key")
    assert response.status_code == 503 and response.headers.get("Retry-After")
    assert "Could not reach the server" in page_text(response)
    assert connect.connections() == [] and grants_of(connect, client) == 0


def test_without_verify_the_key_is_stored_untried(start_connect_proxy, refusing_downstream: RefusingDownstream) -> None:
    connect = start_connect_proxy("user_api_key", url=refusing_downstream.url, credential_header="X-API-Key")
    browser = connect.browser()
    page_url = to_connect_page(connect, connect.client(), browser)
    assert submit_key(browser, page_url, "untried-key").status_code == 302
    assert refusing_downstream.keys_seen == []
    assert len(connect.connections()) == 1


def test_cancel_on_the_key_page_sends_the_client_access_denied(key_proxy: ConnectProxy) -> None:
    client, browser = key_proxy.client(), key_proxy.browser()
    page_url = to_connect_page(key_proxy, client, browser)
    form = form_fields(get(browser.session, page_url))
    response = post_form(browser, page_url, {"csrf_token": form["csrf_token"], "decision": "cancel"})
    assert response.status_code == 302 and response.headers["Location"].startswith(client.redirect_uri + "?")
    assert query_of(response.headers["Location"])["error"] == "access_denied"
    assert key_proxy.connections() == [] and grants_of(key_proxy, client) == 0
