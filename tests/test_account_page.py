"""The account page: a person signs in through the real provider, sees their MCP clients and connections, ends them.

Debian's chromium (Playwright for Python) walks the page as a person would, with the mouse and with the keyboard; a
revoked client's token is then refused at the MCP endpoint of the proxy in front of a real MCP server. Request-level
tests send what a page never would: no CSRF token, another user's client, an unknown route, oversized or empty keys,
an expired account session, a callback in another browser.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from html import unescape
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Page, expect
from sqlalchemy import delete, func, select

from oauthproxy import account
from oauthproxy.components import components
from oauthproxy.config import ConfigError, load_settings
from oauthproxy.consent import CONSENT_PAGE_HEADERS
from oauthproxy.models import DownstreamConnection, Grant, PendingAuthorization, db, utcnow
from tests.account_fixtures import CALENDAR_ISSUER
from tests.bad_input_fixtures import assert_page
from tests.conftest import RunningProxy
from tests.downstream_auth_fixtures import ApiKeyDownstream
from tests.flows import Browser, McpOAuthClient
from tests.proxy_fixtures import Login
from tests.support.databases import SQLITE_ONLY
from tests.support.settings import TEST_KEY
from tests.test_bad_input_logs import MIGRATION_CONFIGURED_LOGGERS

HELLO = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "account", "version": "1"}},
}
NOTES = "/mcp/notes"
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


# -- fixtures ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def account_proxy(start_account_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    return start_account_proxy()


@pytest.fixture
def viewport() -> dict[str, int]:
    return {"width": 1000, "height": 900}


# -- helpers -----------------------------------------------------------------------------------------------------------


def client_login(
    proxy: RunningProxy, name: str, login_hint: str = "alice", client: McpOAuthClient | None = None
) -> Login:
    """An MCP client (registered under `name`, or `client`) signs `login_hint` in for the notes route."""
    client = client or McpOAuthClient.register(proxy.url, client_name=name)
    result = client.login(Browser(proxy.url, login_hint=login_hint), resource=proxy.url + NOTES)
    assert "code" in result, result
    token = client.exchange(result["code"])
    assert token.status_code == 200, token.text
    body = token.json()
    return Login(client, body["access_token"], body["refresh_token"], body.get("scope", ""))


def mcp_status(proxy: RunningProxy, login: Login) -> int:
    return requests.post(proxy.url + NOTES, json=HELLO, headers={**login.bearer, **MCP_HEADERS}, timeout=10).status_code


def user_id_of(proxy: RunningProxy, login: Login) -> str:
    with proxy.app.app_context():
        grant = db.session.scalar(
            select(Grant).where(Grant.client_id == login.client.client_id).order_by(Grant.id.desc()).limit(1)
        )
        assert grant is not None
        return grant.user_id


def live_grants(proxy: RunningProxy, client_id: str, user_id: str | None = None) -> list[Grant]:
    with proxy.app.app_context():
        query = select(Grant).where(Grant.client_id == client_id, Grant.revoked_at.is_(None))
        if user_id is not None:
            query = query.where(Grant.user_id == user_id)
        grants = list(db.session.scalars(query))
        db.session.expunge_all()
        return grants


def add_connection(
    proxy: RunningProxy, user_id: str, route: str, kind: str, secret: str, *, refresh: str | None = None
) -> None:
    """A stored connection, as the connect step leaves it: sealed to its row (the table is the interface)."""
    with proxy.app.app_context():
        db.session.execute(
            delete(DownstreamConnection).where(
                DownstreamConnection.user_id == user_id, DownstreamConnection.route == route
            )
        )
        row = DownstreamConnection(
            user_id=user_id,
            route=route,
            kind=kind,
            provider=CALENDAR_ISSUER if kind == "oauth" else "",
            expires_at=utcnow() + timedelta(hours=1) if kind == "oauth" else None,
        )
        db.session.add(row)
        db.session.flush()
        box = components(proxy.app).secret_box
        row.access_token = box.encrypt(secret, f"connection:{row.id}:access_token")
        if refresh:
            row.refresh_token = box.encrypt(refresh, f"connection:{row.id}:refresh_token")
        db.session.commit()


def connection_routes(proxy: RunningProxy, user_id: str) -> set[str]:
    with proxy.app.app_context():
        return set(
            db.session.scalars(select(DownstreamConnection.route).where(DownstreamConnection.user_id == user_id))
        )


def stored_key(proxy: RunningProxy, user_id: str, route: str) -> str | None:
    with proxy.app.app_context():
        row = db.session.scalar(
            select(DownstreamConnection).where(
                DownstreamConnection.user_id == user_id, DownstreamConnection.route == route
            )
        )
        if row is None or row.access_token is None:
            return None
        return components(proxy.app).secret_box.decrypt(row.access_token, f"connection:{row.id}:access_token")


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html[:1500]
    return unescape(match.group(1))


def account_browser(proxy: RunningProxy, login_hint: str = "alice") -> Browser:
    """A requests-based browser signed in to the account page through the real provider."""
    browser = Browser(proxy.url, login_hint=login_hint)
    page = browser.session.get(proxy.url + "/account", timeout=15)
    assert page.status_code == 200 and "Sign in with" in page.text, page.text[:800]
    started = browser.session.post(
        proxy.url + "/account/sign-in", data={"csrf_token": csrf_of(page.text)}, allow_redirects=False, timeout=15
    )
    assert started.status_code == 302, started.text[:800]
    browser.authorize(started.headers["Location"], proxy.url + "/account")
    signed_in = browser.session.get(proxy.url + "/account", timeout=15)
    assert "Signed in as" in signed_in.text, signed_in.text[:1500]
    return browser


def post(browser: Browser, path: str, data: dict[str, str], csrf: bool = True) -> requests.Response:
    if csrf:
        data = {"csrf_token": csrf_of(browser.session.get(browser.proxy_url + "/account", timeout=15).text), **data}
    return browser.session.post(browser.proxy_url + path, data=data, allow_redirects=False, timeout=15)


# -- in a real browser -------------------------------------------------------------------------------------------------


def test_a_person_signs_in_revokes_a_client_disconnects_and_signs_out(
    account_proxy: RunningProxy, page: Page, artifacts_dir: Path
) -> None:
    proxy = account_proxy
    name = f"Notes Desktop {secrets.token_hex(3)}"
    login = client_login(proxy, name)
    assert mcp_status(proxy, login) == 200  # through the proxy to the real MCP server
    alice = user_id_of(proxy, login)
    add_connection(proxy, alice, "calendar", "oauth", "calendar-access", refresh="calendar-refresh")
    add_connection(proxy, alice, "tickets", "user_api_key", "tickets-key-1")

    page.goto(proxy.url + "/account")
    expect(page.get_by_role("heading", level=1)).to_have_text("Your account")
    page.get_by_role("button", name=re.compile("^Sign in with")).click()  # through the real provider, and back
    page.wait_for_url(proxy.url + "/account")
    expect(page.locator(".signed-in")).to_contain_text("Signed in as Alice Liddell")

    item = page.locator("li.client", has=page.get_by_role("heading", name=name))
    expect(item).to_contain_text("127.0.0.1:9")  # where it sends the person back
    expect(item).to_contain_text(NOTES)
    expect(item).to_contain_text("notes")
    expect(item).to_contain_text("name given by the application itself")
    calendar = page.locator("li.connection", has=page.get_by_role("heading", name="calendar"))
    expect(calendar).to_contain_text("Calendar Sign-in")
    expect(calendar).to_contain_text("renewed automatically")
    tickets = page.locator("li.connection", has=page.get_by_role("heading", name="tickets"))
    expect(tickets).to_contain_text("does not expire")
    expect(tickets.get_by_role("link", name="Replace key for tickets")).to_be_visible()
    html = page.content()
    assert "calendar-access" not in html and "tickets-key-1" not in html  # secrets never reach the page
    page.screenshot(path=str(artifacts_dir / "account.png"), full_page=True)

    # By keyboard alone: Tab reaches the client's Revoke button, Enter presses it.
    revoke_label = f"Revoke access for {name}"
    for _ in range(60):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('aria-label')") == revoke_label:
            break
    else:
        pytest.fail("Tab never reached the Revoke button")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_contain_text(f"{name} no longer has access")
    expect(page.get_by_role("heading", name=name)).to_have_count(0)

    assert mcp_status(proxy, login) == 401  # at once, in this worker
    refreshed = login.client.refresh(login.refresh_token)
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant", refreshed.text
    with proxy.app.app_context():
        reasons = set(db.session.scalars(select(Grant.revoked_reason).where(Grant.client_id == login.client.client_id)))
    assert reasons == {account.REVOKED_REASON}

    page.get_by_role("button", name="Disconnect calendar").click()
    expect(page.get_by_role("status")).to_contain_text("Disconnected from calendar")
    # The calendar's stored tokens are gone, the key stays (other test files may leave alice connections of theirs).
    remaining = connection_routes(proxy, alice)
    assert "calendar" not in remaining and "tickets" in remaining

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name=re.compile("^Sign in with"))).to_be_visible()
    page.goto(proxy.url + "/account")
    expect(page.get_by_role("button", name=re.compile("^Sign in with"))).to_be_visible()
    expect(page.locator(".signed-in")).to_have_count(0)


def test_a_person_replaces_a_key_from_the_account_page(account_proxy: RunningProxy, page: Page) -> None:
    proxy = account_proxy
    login = client_login(proxy, f"Key Tool {secrets.token_hex(3)}")
    alice = user_id_of(proxy, login)
    add_connection(proxy, alice, "tickets", "user_api_key", "old-key")

    page.goto(proxy.url + "/account")
    page.get_by_role("button", name=re.compile("^Sign in with")).click()
    page.get_by_role("link", name="Replace key for tickets").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Replace your key for tickets")
    expect(page.get_by_role("link", name="Where to find or create your key")).to_have_attribute(
        "href", "https://tickets.example.test/settings/keys"
    )
    field = page.get_by_label("API key")
    expect(field).to_have_attribute("type", "password")
    field.fill("  new-key-\u00e9  ")
    field.press("Enter")
    expect(page.get_by_role("status")).to_contain_text("Your key for tickets is saved")
    assert stored_key(proxy, alice, "tickets") == "new-key-\u00e9"  # kept as typed, without the spaces around it
    assert "new-key" not in page.content()


# -- sign-in and session -----------------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_the_pages_refuse_framing_and_caching(account_proxy: RunningProxy) -> None:
    signed_out = requests.get(account_proxy.url + "/account", timeout=10)
    assert signed_out.status_code == 200
    signed_in = account_browser(account_proxy).session.get(account_proxy.url + "/account", timeout=10)
    error = requests.post(account_proxy.url + "/account/clients/revoke", data={"client_id": "x"}, timeout=10)
    assert error.status_code == 400
    for response in (signed_out, signed_in, error):
        for name, value in CONSENT_PAGE_HEADERS.items():
            assert response.headers.get(name) == value, (name, response.headers)


def rewrite_session(proxy: RunningProxy, browser: Browser, change: Callable[[dict], None]) -> None:
    """Change the browser's signed session cookie as only the server could (here: move its sign-in time)."""
    serializer = proxy.app.session_interface.get_signing_serializer(proxy.app)  # type: ignore[attr-defined]
    name = proxy.app.config["SESSION_COOKIE_NAME"]
    value = serializer.loads(browser.session.cookies[name])
    change(value)
    browser.session.cookies.set(name, serializer.dumps(value), domain="127.0.0.1", path="/")


def test_an_expired_account_session_asks_to_sign_in_again(account_proxy: RunningProxy) -> None:
    login = client_login(account_proxy, f"Expiring {secrets.token_hex(3)}")
    browser = account_browser(account_proxy)
    csrf = csrf_of(browser.session.get(account_proxy.url + "/account", timeout=10).text)

    def an_hour_ago(value: dict) -> None:  # ACCOUNT_SESSION_TTL's default
        value["account"]["signed_in_at"] -= 3600 + 5

    rewrite_session(account_proxy, browser, an_hour_ago)
    data = {"csrf_token": csrf, "client_id": login.client.client_id}
    assert_page(post(browser, "/account/clients/revoke", data, False), 403, "Sign in again")
    assert len(live_grants(account_proxy, login.client.client_id)) == 1

    # The page itself, an hour on, says so and offers the sign-in; the session is ended, not only refused.
    reader = account_browser(account_proxy)
    rewrite_session(account_proxy, reader, an_hour_ago)
    page = reader.session.get(account_proxy.url + "/account", timeout=10)
    assert "Your session on this page has ended" in page.text and "Sign in with" in page.text
    assert login.client.client_id not in page.text
    rewrite_session(account_proxy, reader, lambda value: value.setdefault("account", {}).update(signed_in_at=1))
    assert "Signed in as" not in reader.session.get(account_proxy.url + "/account", timeout=10).text


def test_account_session_length_is_a_setting_of_at_most_an_hour() -> None:
    base = {
        "OAUTH_CLIENT_ID": "x",
        "OAUTH_CLIENT_SECRET": "y",
        "OAUTH_AUTHORIZE_URL": "https://id.example.test",
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "ENCRYPTION_KEY": TEST_KEY,
    }
    assert load_settings(base).account_session_ttl == 3600
    assert load_settings({**base, "ACCOUNT_SESSION_TTL": "600"}).account_session_ttl == 600
    with pytest.raises(ConfigError) as refused:
        load_settings({**base, "ACCOUNT_SESSION_TTL": "86400"})
    assert refused.value.problems == ["ACCOUNT_SESSION_TTL must be between 60 and 3600; got 86400"]


def test_a_callback_in_another_browser_signs_no_one_in(account_proxy: RunningProxy) -> None:
    started_in = Browser(account_proxy.url)
    page = started_in.session.get(account_proxy.url + "/account", timeout=10)
    start = started_in.session.post(
        account_proxy.url + "/account/sign-in",
        data={"csrf_token": csrf_of(page.text)},
        allow_redirects=False,
        timeout=10,
    )
    callback = started_in.authorize(start.headers["Location"], account_proxy.url + "/callback")

    other = Browser(account_proxy.url)
    other.session.get(account_proxy.url + "/account", timeout=10)  # a session of its own
    assert_page(other.session.get(callback, allow_redirects=False, timeout=10), 400, "started in another browser")
    assert "Signed in as" not in other.session.get(account_proxy.url + "/account", timeout=10).text
    # The state was spent by that attempt: the right browser cannot use it either now.
    assert_page(started_in.session.get(callback, allow_redirects=False, timeout=10), 400, "expired or was already used")
    assert "Signed in as" not in started_in.session.get(account_proxy.url + "/account", timeout=10).text


def test_the_account_sign_in_stores_a_pending_login_of_its_own_purpose_and_no_grant(
    account_proxy: RunningProxy,
) -> None:
    with account_proxy.app.app_context():
        grants_before = len(list(db.session.scalars(select(Grant.id))))
    browser = Browser(account_proxy.url)
    page = browser.session.get(account_proxy.url + "/account", timeout=10)
    start = browser.session.post(
        account_proxy.url + "/account/sign-in", data={"csrf_token": csrf_of(page.text)}, allow_redirects=False
    )
    with account_proxy.app.app_context():
        purposes = list(db.session.scalars(select(PendingAuthorization.purpose)))
    assert "account" in purposes
    browser.authorize(start.headers["Location"], account_proxy.url + "/account")
    with account_proxy.app.app_context():
        assert len(list(db.session.scalars(select(Grant.id)))) == grants_before  # the provider's tokens are not kept


@SQLITE_ONLY
def test_a_user_outside_the_allowlist_is_not_signed_in(start_account_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_account_proxy(ALLOWED_EMAIL_DOMAINS="example.com")
    browser = Browser(proxy.url, login_hint="carol")  # carol@outsider.test
    page = browser.session.get(proxy.url + "/account", timeout=10)
    start = browser.session.post(
        proxy.url + "/account/sign-in", data={"csrf_token": csrf_of(page.text)}, allow_redirects=False
    )
    callback = browser.authorize(start.headers["Location"], proxy.url + "/callback")
    assert_page(browser.session.get(callback, allow_redirects=False, timeout=10), 403, "carol@outsider.test is not")
    assert "Signed in as" not in browser.session.get(proxy.url + "/account", timeout=10).text


@SQLITE_ONLY
def test_an_unreachable_provider_is_a_page_to_retry(start_account_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_account_proxy(OAUTH_AUTHORIZE_URL="http://127.0.0.1:9", PROVIDER_HTTP_TIMEOUT="2")
    pending = select(func.count()).select_from(PendingAuthorization)
    with proxy.app.app_context():
        before = db.session.scalar(pending)
    browser = Browser(proxy.url)
    page = browser.session.get(proxy.url + "/account", timeout=10)
    started = time.monotonic()
    refused = post(browser, "/account/sign-in", {"csrf_token": csrf_of(page.text)}, False)
    assert time.monotonic() - started < 5
    assert_page(refused, 503, "cannot be reached right now")
    assert refused.headers["Retry-After"] == "30"
    with proxy.app.app_context():
        assert db.session.scalar(pending) == before  # nothing stored for a sign-in that could not start


# -- forms: what a page never sends ------------------------------------------------------------------------------------


def test_forms_without_a_valid_csrf_token_change_nothing(account_proxy: RunningProxy) -> None:
    login = client_login(account_proxy, f"Csrf Target {secrets.token_hex(3)}")
    alice = user_id_of(account_proxy, login)
    add_connection(account_proxy, alice, "tickets", "user_api_key", "kept-key")
    browser = account_browser(account_proxy)
    for token in (None, "", "forged-token-" + secrets.token_urlsafe(16)):
        extra = {} if token is None else {"csrf_token": token}
        revoke = post(browser, "/account/clients/revoke", {"client_id": login.client.client_id, **extra}, False)
        assert_page(revoke, 400, "could not be verified")
        disconnect = post(browser, "/account/connections/disconnect", {"route": "tickets", **extra}, False)
        assert_page(disconnect, 400)
        key = post(browser, "/account/keys/tickets", {"api_key": "attacker-key", **extra}, False)
        assert_page(key, 400)
        assert_page(post(browser, "/account/sign-out", extra, False), 400)
    assert len(live_grants(account_proxy, login.client.client_id)) == 1
    assert stored_key(account_proxy, alice, "tickets") == "kept-key"
    assert "Signed in as" in browser.session.get(account_proxy.url + "/account", timeout=10).text
    # Signed out, with a valid token of its own: a form still acts for nobody.
    stranger = Browser(account_proxy.url)
    csrf = csrf_of(stranger.session.get(account_proxy.url + "/account", timeout=10).text)
    data = {"csrf_token": csrf, "client_id": login.client.client_id}
    assert_page(post(stranger, "/account/clients/revoke", data, False), 403)
    assert len(live_grants(account_proxy, login.client.client_id)) == 1


def test_another_users_grants_are_not_found_and_not_touched(account_proxy: RunningProxy) -> None:
    shared = McpOAuthClient.register(account_proxy.url, client_name=f"Shared Tool {secrets.token_hex(3)}")
    alices = client_login(account_proxy, "", client=shared)
    bobs = client_login(account_proxy, "", login_hint="bob", client=shared)
    bob = user_id_of(account_proxy, bobs)
    bob_only = client_login(account_proxy, f"Bob Only {secrets.token_hex(3)}", login_hint="bob")
    browser = account_browser(account_proxy)  # alice

    page = browser.session.get(account_proxy.url + "/account", timeout=10).text
    assert shared.client_id in page and bob_only.client.client_id not in page
    missing = post(browser, "/account/clients/revoke", {"client_id": bob_only.client.client_id})
    assert_page(missing, 404)
    assert_page(post(browser, "/account/clients/revoke", {"client_id": "no-such-client"}), 404)
    assert_page(post(browser, "/account/clients/revoke", {}), 404)
    assert len(live_grants(account_proxy, bob_only.client.client_id)) == 1

    # The client both use: alice's revoke ends her grant, never bob's.
    done = post(browser, "/account/clients/revoke", {"client_id": shared.client_id})
    assert done.status_code == 303 and done.headers["Location"] == account_proxy.url + "/account"
    assert [g.user_id for g in live_grants(account_proxy, shared.client_id)] == [bob]
    assert mcp_status(account_proxy, alices) == 401 and mcp_status(account_proxy, bobs) == 200
    assert_page(post(browser, "/account/clients/revoke", {"client_id": shared.client_id}), 404)  # already gone

    # Bob's connection: alice's disconnect of that route finds none of hers.
    add_connection(account_proxy, bob, "calendar", "oauth", "bobs-calendar")
    with account_proxy.app.app_context():
        db.session.execute(
            delete(DownstreamConnection).where(
                DownstreamConnection.route == "calendar", DownstreamConnection.user_id != bob
            )
        )
        db.session.commit()
    assert_page(post(browser, "/account/connections/disconnect", {"route": "calendar"}), 404)
    assert connection_routes(account_proxy, bob) >= {"calendar"}


def test_unknown_routes_are_not_found(account_proxy: RunningProxy) -> None:
    browser = account_browser(account_proxy)
    for route in ("no-such-route", "notes", "", "../tickets"):
        assert_page(post(browser, "/account/connections/disconnect", {"route": route}), 404)
    for route in ("no-such-route", "notes", "calendar"):  # none of them takes a key
        assert_page(browser.session.get(f"{account_proxy.url}/account/keys/{route}", timeout=10), 404)
        assert_page(post(browser, f"/account/keys/{route}", {"api_key": "k"}), 404)


def test_keys_out_of_bounds_are_refused_and_never_echoed(account_proxy: RunningProxy) -> None:
    login = client_login(account_proxy, f"Key Bounds {secrets.token_hex(3)}")
    alice = user_id_of(account_proxy, login)
    add_connection(account_proxy, alice, "tickets", "user_api_key", "current-key")
    browser = account_browser(account_proxy)
    cases = {
        "": "Enter your API key",
        "   ": "Enter your API key",
        "k" * 4097: "longer than 4096 characters",
        "line-one\nline-two": "control character",
        "nul\x00key": "control character",
        "tab\tkey": "control character",
    }
    for value, problem in cases.items():
        refused = post(browser, "/account/keys/tickets", {"api_key": value})
        assert_page(refused, 400, problem)
        if value.strip():
            assert value not in refused.text
    huge = post(browser, "/account/keys/tickets", {"api_key": "k" * 40_000})
    assert huge.status_code == 413
    assert stored_key(account_proxy, alice, "tickets") == "current-key"

    longest = "k" * 4096
    assert post(browser, "/account/keys/tickets", {"api_key": longest}).status_code == 303
    assert stored_key(account_proxy, alice, "tickets") == longest


@pytest.fixture
def every_log_record(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG, those the migrations' fileConfig disabled too (see tests/test_bad_input_logs.py)."""
    saved = [
        (logger, logger.disabled, logger.level)
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    for logger, _, _ in saved:
        logger.disabled = False
        if logger.name in MIGRATION_CONFIGURED_LOGGERS:
            logger.setLevel(logging.NOTSET)
    caplog.set_level(logging.DEBUG)
    yield caplog
    for logger, disabled, level in saved:
        logger.disabled, logger.level = disabled, level


def test_adding_a_first_key_and_no_secret_in_the_logs(
    account_proxy: RunningProxy, every_log_record: pytest.LogCaptureFixture
) -> None:
    caplog = every_log_record
    login = client_login(account_proxy, f"First Key {secrets.token_hex(3)}")
    alice = user_id_of(account_proxy, login)
    with account_proxy.app.app_context():
        db.session.execute(delete(DownstreamConnection).where(DownstreamConnection.user_id == alice))
        db.session.commit()
    browser = account_browser(account_proxy)
    page = browser.session.get(account_proxy.url + "/account", timeout=10).text
    assert "Add a key for tickets" in page
    form = browser.session.get(account_proxy.url + "/account/keys/tickets", timeout=10).text
    assert "Add your key for tickets" in form
    secret = "sk-" + secrets.token_urlsafe(24)
    assert post(browser, "/account/keys/tickets", {"api_key": secret}).status_code == 303
    assert stored_key(account_proxy, alice, "tickets") == secret
    assert secret not in caplog.text
    assert "stored a new API key for route tickets" in caplog.text
    with account_proxy.app.app_context():
        sealed = db.session.scalar(
            select(DownstreamConnection.access_token).where(
                DownstreamConnection.user_id == alice, DownstreamConnection.route == "tickets"
            )
        )
    assert sealed and secret not in sealed  # sealed at rest


@SQLITE_ONLY
def test_revoking_forgets_the_consent_so_the_client_asks_again(account_proxy: RunningProxy) -> None:
    client = McpOAuthClient.register(account_proxy.url, client_name=f"Consent Again {secrets.token_hex(3)}")
    person = Browser(account_proxy.url)
    assert "code" in client.login(person, resource=account_proxy.url + NOTES)
    assert person.consent_pages_seen == 1
    assert "code" in client.login(person, resource=account_proxy.url + NOTES)
    assert person.consent_pages_seen == 1  # remembered

    # The same browser signs in to the account page and revokes the client.
    start = person.session.post(
        account_proxy.url + "/account/sign-in",
        data={"csrf_token": csrf_of(person.session.get(account_proxy.url + "/account", timeout=10).text)},
        allow_redirects=False,
    )
    person.authorize(start.headers["Location"], account_proxy.url + "/account")
    assert post(person, "/account/clients/revoke", {"client_id": client.client_id}).status_code == 303
    assert "code" in client.login(person, resource=account_proxy.url + NOTES)
    assert person.consent_pages_seen == 2  # asked again, not signed back in unseen


def test_a_replacement_key_is_tried_first_where_the_route_says_so(
    start_proxy: Callable[..., RunningProxy], api_key_downstream: ApiKeyDownstream, tmp_path: Path
) -> None:
    """`api_key_verify`: the account page tries a new key with an MCP `initialize` before storing it, as the connect
    step does; a key the server refuses is not stored and the old one stays."""
    routes = tmp_path / "search.toml"
    routes.write_text(
        "[[routes]]\n"
        'name = "search"\n'
        'path = "/mcp/search"\n'
        f'url = "{api_key_downstream.url}"\n'
        'credential = "user_api_key"\n'
        f'credential_header = "{api_key_downstream.header}"\n'
        "api_key_verify = true\n"
    )
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=str(routes))
    browser = account_browser(proxy)
    alice = "alice"  # the test provider's subject is the login name
    add_connection(proxy, alice, "search", "user_api_key", "old-key")

    refused = post(browser, "/account/keys/search", {"api_key": "not-a-key-the-server-knows"})
    assert_page(refused, 400, "The server refused this key")
    assert "not-a-key-the-server-knows" not in refused.text
    assert stored_key(proxy, alice, "search") == "old-key"

    accepted = post(browser, "/account/keys/search", {"api_key": api_key_downstream.keys["alice"]})
    assert accepted.status_code == 303, accepted.text
    assert stored_key(proxy, alice, "search") == api_key_downstream.keys["alice"]


def test_disconnecting_on_the_account_page_takes_effect_on_the_mcp_endpoint(account_proxy: RunningProxy) -> None:
    """The stored key is used until the person disconnects it; from then on the client is told to authorize again
    (and the key is gone), not served with a credential its owner removed."""
    client = McpOAuthClient.register(account_proxy.url, client_name=f"Tickets Tool {secrets.token_hex(3)}")
    add_connection(account_proxy, "alice", "tickets", "user_api_key", "alices-tickets-key")
    result = client.login(Browser(account_proxy.url, login_hint="alice"), resource=account_proxy.url + "/mcp/tickets")
    assert "code" in result, result  # connected already: no key page
    bearer = {"Authorization": "Bearer " + client.exchange(result["code"]).json()["access_token"]}
    url = account_proxy.url + "/mcp/tickets"

    before = requests.post(url, json=HELLO, headers={**bearer, **MCP_HEADERS}, timeout=10)
    assert before.status_code == 502  # the key is sent on; the tickets server is not running (127.0.0.1:9)
    browser = account_browser(account_proxy)
    assert post(browser, "/account/connections/disconnect", {"route": "tickets"}).status_code == 303
    after = requests.post(url, json=HELLO, headers={**bearer, **MCP_HEADERS}, timeout=10)
    assert after.status_code == 401 and after.json()["error"] == "invalid_token"
    assert "authorize again" in after.json()["error_description"]
    assert stored_key(account_proxy, "alice", "tickets") is None
