"""Bad input at the connect step (issue 13): unknown, replayed, expired or cross-browser tokens and states, forms
without CSRF, provider errors. Each is a page, or the right OAuth error at the client's redirect URI; never a 500,
never a grant or a connection."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest
import requests
from sqlalchemy import delete, func, select, update

from oauthproxy.database import purge_expired
from oauthproxy.models import DownstreamConnection, Grant, PendingConnection, db, utcnow
from tests.bad_input_fixtures import assert_error_redirect, assert_garbage_never_causes_a_server_error, assert_page
from tests.conftest import RunningProxy
from tests.connect_fixtures import (
    SECRET_ENV,
    ConnectProxy,
    at_connect_callback,
    continue_to_provider,
    form_fields,
    get,
    post_form,
    submit_key,
    to_connect_page,
)
from tests.flows import Browser, McpOAuthClient, query_of
from tests.provider_fixture import OidcProvider
from tests.support.ports import free_port

#: A value shaped like a real token or state that no pending row has. Fixed: parameter ids must be equal in every
#: pytest-xdist worker.
WELL_FORMED = "k" * 43


@pytest.fixture
def connect(start_connect_proxy) -> ConnectProxy:
    return start_connect_proxy("oauth")


@pytest.fixture
def failing_connect_provider(connect_provider: OidcProvider) -> Iterator[OidcProvider]:
    connect_provider.set_failure(None)
    try:
        yield connect_provider
    finally:
        connect_provider.set_failure(None)


def nothing_stored(connect: ConnectProxy, client: McpOAuthClient) -> bool:
    with connect.proxy.app.app_context():
        grants = db.session.scalar(select(func.count()).select_from(Grant).where(Grant.client_id == client.client_id))
        connections = db.session.scalar(
            select(func.count())
            .select_from(DownstreamConnection)
            .where(DownstreamConnection.route == connect.route_name)
        )
    return grants == 0 and connections == 0


def expire_pending(connect: ConnectProxy) -> None:
    with connect.proxy.app.app_context():
        db.session.execute(
            update(PendingConnection)
            .where(PendingConnection.route == connect.route_name)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()


def without(url: str, name: str) -> str:
    parts = urlsplit(url)
    query = urlencode({k: v for k, v in query_of(url).items() if k != name})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def to_callback(connect: ConnectProxy, login_hint: str = "alice") -> tuple[McpOAuthClient, Browser, str]:
    """Log in, Continue on the connect page, sign in at the second provider: its redirect to /connect/callback."""
    client, browser = connect.client(), connect.browser()
    provider_url = continue_to_provider(browser, to_connect_page(connect, client, browser))
    return client, browser, at_connect_callback(browser, provider_url, connect.url, login_hint)


# --- /connect/callback -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "",
        "code=x",
        "code=x&state=",
        "code=x&state=unknown",
        "code=x&state=" + WELL_FORMED,
        "error=access_denied&state=" + WELL_FORMED,
        "code=x&state=%00%ff" + "s" * 300,
    ],
)
def test_callback_without_a_known_state_is_a_page(connect: ConnectProxy, query: str) -> None:
    assert_page(get(requests.Session(), f"{connect.url}/connect/callback?{query}"))


def test_callback_state_is_single_use(connect: ConnectProxy) -> None:
    client, browser, url = to_callback(connect)
    first = get(browser.session, url)
    assert first.status_code == 302 and "code" in query_of(first.headers["Location"])
    assert_page(get(browser.session, url), text="expired or was already used")
    with connect.proxy.app.app_context():
        assert (
            db.session.scalar(select(func.count()).select_from(Grant).where(Grant.client_id == client.client_id)) == 1
        )


def test_callback_in_another_browser_is_a_page(connect: ConnectProxy) -> None:
    client, _, url = to_callback(connect)
    other = connect.browser("bob")
    to_connect_page(connect, connect.client(), other)  # a browser with a login of its own
    assert_page(get(other.session, url), text="another browser")
    assert nothing_stored(connect, client)
    # The state is spent by that attempt: not even its own browser can use it now.
    client, _, url = to_callback(connect)
    assert_page(get(requests.Session(), url), text="another browser")  # no cookies at all
    assert nothing_stored(connect, client)


def test_callback_without_code_is_a_server_error_for_the_client(connect: ConnectProxy) -> None:
    client, browser, url = to_callback(connect)
    assert_error_redirect(get(browser.session, without(url, "code")), connect.proxy, client, "server_error")
    assert nothing_stored(connect, client)


@pytest.mark.parametrize(("login_hint", "error"), [("deny", "access_denied"), ("error", "temporarily_unavailable")])
def test_provider_refusal_reaches_the_client(connect: ConnectProxy, login_hint: str, error: str) -> None:
    client, browser, url = to_callback(connect, login_hint)
    assert "error" in query_of(url) and "code" not in query_of(url)
    assert_error_redirect(get(browser.session, url), connect.proxy, client, error)
    assert nothing_stored(connect, client)


def test_failed_code_exchange_is_temporarily_unavailable(
    connect: ConnectProxy, failing_connect_provider: OidcProvider
) -> None:
    client, browser, url = to_callback(connect)
    failing_connect_provider.set_failure("code_server_error")
    assert_error_redirect(get(browser.session, url), connect.proxy, client, "temporarily_unavailable")
    assert nothing_stored(connect, client)


def test_forged_code_is_refused_for_the_client(connect: ConnectProxy) -> None:
    client, browser, url = to_callback(connect)
    forged = without(url, "code") + "&code=" + secrets.token_urlsafe(32)
    # The provider's invalid_grant: a failed sign-in, as at the login's own callback (login.EXCHANGE_ERRORS).
    assert_error_redirect(get(browser.session, forged), connect.proxy, client, "server_error")
    assert nothing_stored(connect, client)


def test_an_answer_from_another_authorization_server_is_refused(
    connect: ConnectProxy, connect_provider: OidcProvider
) -> None:
    """RFC 9207: the test provider names itself in `iss`; an answer naming another issuer, or none, is a mix-up
    (another route's server answering with this hop's state) and its code is never redeemed."""
    client, browser, url = to_callback(connect)
    assert query_of(url)["iss"] == connect_provider.issuer  # what an honest answer carries
    other = without(url, "iss") + "&iss=" + requests.utils.quote("https://as.attacker.example", safe="")
    assert_error_redirect(get(browser.session, other), connect.proxy, client, "server_error")
    assert nothing_stored(connect, client)
    # This server advertises that it always sends `iss`: an answer without one is refused too.
    client, browser, url = to_callback(connect)
    assert_error_redirect(get(browser.session, without(url, "iss")), connect.proxy, client, "server_error")
    assert nothing_stored(connect, client)


def test_callback_for_an_expired_hop_is_a_page(connect: ConnectProxy) -> None:
    client, browser, url = to_callback(connect)
    expire_pending(connect)
    assert_page(get(browser.session, url), text="expired")
    assert nothing_stored(connect, client)
    with connect.proxy.app.app_context():
        assert purge_expired().pending_connections >= 1
        assert (
            db.session.scalar(
                select(func.count()).select_from(PendingConnection).where(PendingConnection.route == connect.route_name)
            )
            == 0
        )


@pytest.mark.parametrize("path", ["/connect/callback"])  # the garbage sweep of tests.bad_input_fixtures
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)


# --- /connect/<token> ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["x", WELL_FORMED, "%00", "a" * 5000, "..%2f..%2fauthorize"])
def test_unknown_connect_page_is_a_page(connect: ConnectProxy, token: str) -> None:
    response = get(requests.Session(), f"{connect.url}/connect/{token}")
    assert response.status_code in (400, 404), response.status_code
    if response.status_code == 400:
        assert_page(response, text="expired")


def test_expired_connect_page_is_a_page(connect: ConnectProxy) -> None:
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    form = form_fields(get(browser.session, page_url))
    expire_pending(connect)
    assert_page(get(browser.session, page_url), text="expired")
    assert_page(post_form(browser, page_url, {**form, "decision": "continue"}), text="expired")
    assert_page(post_form(browser, page_url, {**form, "decision": "cancel"}), text="expired")
    assert nothing_stored(connect, client)


def test_connect_page_in_another_browser_is_a_page(connect: ConnectProxy) -> None:
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    other = connect.browser("bob")
    to_connect_page(connect, connect.client(), other)
    assert_page(get(other.session, page_url), text="another browser")
    form = form_fields(get(other.session, to_connect_page(connect, connect.client(), other)))
    assert_page(post_form(other, page_url, {**form, "decision": "continue"}), text="another browser")
    assert_page(post_form(other, page_url, {**form, "decision": "cancel"}), text="another browser")
    # Still there for its own browser.
    assert get(browser.session, page_url).status_code == 200
    assert nothing_stored(connect, client)


@pytest.mark.parametrize("csrf", [None, "", "forged-csrf-token-value"])
@pytest.mark.parametrize("decision", ["continue", "cancel"])
def test_connect_form_without_csrf_is_a_page(connect: ConnectProxy, csrf: str | None, decision: str) -> None:
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    form = {"decision": decision} if csrf is None else {"csrf_token": csrf, "decision": decision}
    assert_page(post_form(browser, page_url, form), text="could not be verified")
    assert get(browser.session, page_url).status_code == 200  # nothing was spent
    assert nothing_stored(connect, client)


def test_key_form_without_csrf_is_a_page(start_connect_proxy) -> None:
    connect = start_connect_proxy("user_api_key", credential_header="X-API-Key")
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    assert_page(post_form(browser, page_url, {"api_key": "a-key"}), text="could not be verified")
    assert "a-key" not in post_form(browser, page_url, {"api_key": "a-key"}).text
    assert nothing_stored(connect, client)
    assert submit_key(browser, page_url, "a-key").status_code == 302  # the real form still works


def test_unreadable_pending_login_is_a_page(connect: ConnectProxy) -> None:
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    with connect.proxy.app.app_context():
        db.session.execute(
            update(PendingConnection)
            .where(PendingConnection.route == connect.route_name)
            .values(login="v1.00000000.AAAA")
        )
        db.session.commit()
    try:
        assert_page(get(browser.session, page_url), text="could not be completed")
        assert nothing_stored(connect, client)
    finally:
        # The session's database is shared: rotate-key in another test must not meet this unreadable row.
        with connect.proxy.app.app_context():
            db.session.execute(delete(PendingConnection).where(PendingConnection.route == connect.route_name))
            db.session.commit()


@pytest.mark.parametrize("path", ["/connect/" + "t" * 43])
def test_connect_page_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)


def test_unreachable_authorization_server_keeps_the_page(start_connect_proxy) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    connect = start_connect_proxy(
        "oauth", oauth={"authorize_url": closed, "client_id": "proxy", "client_secret_env": SECRET_ENV}
    )
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)
    form = form_fields(get(browser.session, page_url))
    response = post_form(browser, page_url, {**form, "decision": "continue"})
    assert_page(response, status=503, text="cannot be reached right now")
    assert response.headers["Retry-After"]
    assert 'value="continue"' in response.text  # the same page, to try again
    # Nothing was spent: the person can still cancel, and the client hears of it.
    cancelled = post_form(browser, page_url, {**form, "decision": "cancel"})
    assert_error_redirect(cancelled, connect.proxy, client, "access_denied")
    assert nothing_stored(connect, client)
