"""The admin page: an admin (ADMIN_EMAILS, verified email) signs in through the real provider, sees every user's grants,
clients and connections, and revokes them; the audit search form.

Debian's chromium (Playwright for Python) walks the page as an operator would, keyboard included; a revoked grant's
token is then refused at the MCP endpoint of the proxy in front of a real MCP server. Request-level tests send what the
page never would: no CSRF token, unknown and non-numeric ids, oversized filters, a non-admin, an unverified email on
the list, an admin taken off the list (the app restarted with the new setting), bad audit dates.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import time
import types
from collections.abc import Callable, Iterator
from datetime import datetime
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Page, expect
from sqlalchemy import select

from oauthproxy import admin
from oauthproxy.config import ConfigError, load_settings
from oauthproxy.consent import CONSENT_PAGE_HEADERS
from oauthproxy.models import Grant, db
from tests.bad_input_fixtures import assert_page
from tests.conftest import RunningProxy
from tests.flows import Browser, McpOAuthClient
from tests.support.databases import SQLITE_ONLY
from tests.support.settings import TEST_KEY
from tests.test_account_page import (
    add_connection,
    client_login,
    connection_routes,
    csrf_of,
    live_grants,
    mcp_status,
    user_id_of,
)

ALICE = "alice@example.com"  # the test provider's alice, verified: the admin here
BOB = "bob@example.org"


@pytest.fixture
def admin_proxy(start_account_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    """The account page's routes (tests/account_fixtures.py), with alice as the admin."""
    return start_account_proxy(ADMIN_EMAILS=ALICE)


@pytest.fixture
def viewport() -> dict[str, int]:
    return {"width": 1280, "height": 900}


@pytest.fixture
def admin_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The admin page's log lines (its logger re-enabled: the migrations' fileConfig disables loggers it finds)."""
    logger = logging.getLogger("oauthproxy.admin")
    disabled, logger.disabled = logger.disabled, False
    caplog.set_level(logging.DEBUG)
    yield caplog
    logger.disabled = disabled


def admin_browser(proxy: RunningProxy, login_hint: str = "alice", expect_admin: bool = True) -> Browser:
    """A requests-based browser signed in on the admin page through the real provider."""
    browser = Browser(proxy.url, login_hint=login_hint)
    signed_out = browser.session.get(proxy.url + "/admin", timeout=15)
    assert signed_out.status_code == 200 and "Sign in with" in signed_out.text, signed_out.text[:800]
    started = browser.session.post(
        proxy.url + "/admin/sign-in", data={"csrf_token": csrf_of(signed_out.text)}, allow_redirects=False, timeout=15
    )
    assert started.status_code == 302, started.text[:800]
    back = browser.authorize(started.headers["Location"], proxy.url + "/admin")
    assert back == proxy.url + "/admin"  # the sign-in returns to the page it started on
    if expect_admin:
        assert "Signed in as" in browser.session.get(proxy.url + "/admin", timeout=15).text
    return browser


def admin_post(browser: Browser, path: str, data: dict[str, str], csrf: bool = True) -> requests.Response:
    if csrf:
        page = browser.session.get(browser.proxy_url + "/account", timeout=15).text  # the same session's token
        data = {"csrf_token": csrf_of(page), **data}
    return browser.session.post(browser.proxy_url + path, data=data, allow_redirects=False, timeout=15)


def grant_ids(proxy: RunningProxy, client_id: str) -> list[int]:
    return [grant.id for grant in live_grants(proxy, client_id)]


def revoked_reasons(proxy: RunningProxy, client_id: str) -> set[str | None]:
    with proxy.app.app_context():
        return set(db.session.scalars(select(Grant.revoked_reason).where(Grant.client_id == client_id)))


# -- in a real browser -------------------------------------------------------------------------------------------------


def test_an_admin_sees_everyone_and_revokes_a_users_grant_by_keyboard(
    admin_proxy: RunningProxy, page: Page, artifacts_dir: Path
) -> None:
    proxy = admin_proxy
    name = f"Bob Notes {secrets.token_hex(3)}"
    bobs = client_login(proxy, name, login_hint="bob")
    assert mcp_status(proxy, bobs) == 200  # through the proxy to the real MCP server
    bob = user_id_of(proxy, bobs)
    add_connection(proxy, bob, "calendar", "oauth", "bobs-calendar-access", refresh="bobs-calendar-refresh")
    alices = client_login(proxy, f"Alice Notes {secrets.token_hex(3)}")

    page.goto(proxy.url + "/admin")
    expect(page.get_by_role("heading", level=1)).to_have_text("Admin")
    page.get_by_role("button", name=re.compile("^Sign in with")).click()  # through the real provider, and back
    page.wait_for_url(proxy.url + "/admin")
    expect(page.locator(".signed-in")).to_contain_text("Signed in as Alice Liddell")

    users = page.locator("section", has=page.get_by_role("heading", name="Users"))
    expect(users.locator("tr.user", has_text="Bob Builder")).to_contain_text(BOB)
    clients = page.locator("section", has=page.get_by_role("heading", name="Clients"))
    client_row = clients.locator("tr.client", has_text=bobs.client.client_id)
    expect(client_row).to_contain_text(name)
    expect(client_row).to_contain_text("127.0.0.1:9")  # where it sends users back
    grants = page.locator("section", has=page.get_by_role("heading", name="Grants"))
    expect(grants.locator("tr.grant", has_text=name)).to_contain_text("/mcp/notes")
    connections = page.locator("section", has=page.get_by_role("heading", name="Connections"))
    expect(connections.locator("tr.connection", has_text=bob)).to_contain_text("Calendar Sign-in")
    expect(page.get_by_text(re.compile(r"at most 200 are shown|200 most recent"))).to_have_count(4)
    html = page.content()
    assert "bobs-calendar" not in html  # no secret reaches the page
    page.screenshot(path=str(artifacts_dir / "admin.png"), full_page=True)

    # Narrow the grants to bob's client with the filter form, then by keyboard alone: Tab to Revoke, Enter.
    page.get_by_label("Client id").fill(bobs.client.client_id)
    page.get_by_label("Client id").press("Enter")
    page.wait_for_url(re.compile(r"/admin\?.*client="))
    expect(grants.locator("tr.grant")).to_have_count(1)
    (grant_id,) = grant_ids(proxy, bobs.client.client_id)
    label = f"Revoke grant {grant_id} of {BOB} through {name}"
    for _ in range(120):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('aria-label')") == label:
            break
    else:
        pytest.fail("Tab never reached the grant's Revoke button")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_contain_text(f"Grant {grant_id} of {BOB} is revoked")
    expect(page).to_have_url(re.compile(r"client="))  # still filtered as it was
    expect(grants.locator("tr.grant", has_text=name)).to_contain_text("revoked_by_admin")

    assert mcp_status(proxy, bobs) == 401  # at once
    refreshed = bobs.client.refresh(bobs.refresh_token)
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant", refreshed.text
    assert revoked_reasons(proxy, bobs.client.client_id) == {admin.REVOKED_REASON}
    assert mcp_status(proxy, alices) == 200  # nobody else's

    page.get_by_role("link", name="Show all").click()
    page.get_by_role("button", name=f"Disconnect {bob} from calendar").click()
    expect(page.get_by_role("status")).to_contain_text(f"Disconnected user {bob} from calendar")
    assert "calendar" not in connection_routes(proxy, bob)

    page.get_by_role("link", name="Audit search").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Audit search")
    page.get_by_role("link", name="Back to the admin page").click()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name=re.compile("^Sign in with"))).to_be_visible()


# -- who is an admin ---------------------------------------------------------------------------------------------------


def test_admin_emails_compare_as_the_allowlists_do() -> None:
    base = {
        "OAUTH_CLIENT_ID": "x",
        "OAUTH_CLIENT_SECRET": "y",
        "OAUTH_AUTHORIZE_URL": "https://id.example.test",
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "ENCRYPTION_KEY": TEST_KEY,
    }
    settings = load_settings({**base, "ADMIN_EMAILS": "Kate@Example.test, ops@example.test"})
    assert settings.user_is_admin("kate@example.test") and settings.user_is_admin("KATE@EXAMPLE.TEST")
    assert not settings.user_is_admin("\u212aate@example.test")  # KELVIN SIGN: another mailbox, not "k"
    assert not settings.user_is_admin(None)  # no verified email: never an admin
    assert not settings.user_is_admin("kate@example.test.evil")
    assert not settings.user_is_admin("ops@example.test@evil.test")
    assert not load_settings(base).user_is_admin("kate@example.test")  # an empty list makes no one an admin
    with pytest.raises(ConfigError) as refused:
        load_settings({**base, "ADMIN_EMAILS": "example.test"})
    assert refused.value.problems == ["ADMIN_EMAILS must list email addresses; got 'example.test'"]


@SQLITE_ONLY
def test_a_non_admin_gets_403_and_changes_nothing(admin_proxy: RunningProxy) -> None:
    alices = client_login(admin_proxy, f"Alice Tool {secrets.token_hex(3)}")
    (grant_id,) = grant_ids(admin_proxy, alices.client.client_id)
    bob = admin_browser(admin_proxy, login_hint="bob", expect_admin=False)
    refused = bob.session.get(admin_proxy.url + "/admin", timeout=10)
    assert_page(refused, 403, f"{BOB} is not listed in ADMIN_EMAILS")
    assert 'href="/account">Go to your account page' in refused.text and alices.client.client_id not in refused.text
    assert_page(bob.session.get(admin_proxy.url + "/admin/audit?user=x", timeout=10), 403)
    assert_page(admin_post(bob, "/admin/grants/revoke", {"grant_id": str(grant_id)}), 403)
    assert_page(admin_post(bob, "/admin/clients/revoke", {"client_id": alices.client.client_id}), 403)
    assert_page(admin_post(bob, "/admin/users/revoke", {"user_id": "alice"}), 403)
    assert grant_ids(admin_proxy, alices.client.client_id) == [grant_id]
    # Bob is still signed in to his own account page: the admin page's refusal is not a sign-out.
    assert "Signed in as" in bob.session.get(admin_proxy.url + "/account", timeout=10).text
    # Signed out, the admin page offers the sign-in and its forms act for nobody.
    stranger = Browser(admin_proxy.url)
    csrf = csrf_of(stranger.session.get(admin_proxy.url + "/admin", timeout=10).text)
    assert_page(
        admin_post(stranger, "/admin/grants/revoke", {"grant_id": str(grant_id), "csrf_token": csrf}, False), 403
    )
    assert grant_ids(admin_proxy, alices.client.client_id) == [grant_id]


@SQLITE_ONLY
@pytest.mark.parametrize("login_hint", ["dave", "erin"])  # email_verified false; no email_verified claim at all
def test_an_unverified_email_on_the_list_is_no_admin(
    start_account_proxy: Callable[..., RunningProxy], login_hint: str
) -> None:
    proxy = start_account_proxy(ADMIN_EMAILS="dave@example.com,erin@example.com")
    browser = admin_browser(proxy, login_hint=login_hint, expect_admin=False)
    refused = browser.session.get(proxy.url + "/admin", timeout=10)
    assert_page(refused, 403, "the provider vouched for no email")
    assert "Users" not in refused.text


def test_an_admin_taken_off_the_list_is_refused_after_the_restart(
    start_account_proxy: Callable[..., RunningProxy],
) -> None:
    first = start_account_proxy(ADMIN_EMAILS=ALICE)
    bobs = client_login(first, f"Bob Tool {secrets.token_hex(3)}", login_hint="bob")
    browser = admin_browser(first)
    csrf = csrf_of(browser.session.get(first.url + "/admin", timeout=10).text)

    # The same database and keys, restarted with ADMIN_EMAILS unchanged: the session carries over (the control) ...
    same = start_account_proxy(ADMIN_EMAILS=ALICE)
    browser.proxy_url = same.url
    assert "Signed in as" in browser.session.get(same.url + "/admin", timeout=10).text
    # ... and with alice taken off the list, the same session is refused, its forms too.
    changed = start_account_proxy(ADMIN_EMAILS=BOB)
    browser.proxy_url = changed.url
    assert_page(browser.session.get(changed.url + "/admin", timeout=10), 403, "not listed in ADMIN_EMAILS")
    data = {"csrf_token": csrf, "client_id": bobs.client.client_id}
    assert_page(admin_post(browser, "/admin/clients/revoke", data, False), 403)
    assert len(grant_ids(changed, bobs.client.client_id)) == 1


# -- forms and filters: what a page never sends ------------------------------------------------------------------------


def test_forms_without_a_valid_csrf_token_change_nothing(admin_proxy: RunningProxy) -> None:
    bobs = client_login(admin_proxy, f"Csrf Target {secrets.token_hex(3)}", login_hint="bob")
    bob = user_id_of(admin_proxy, bobs)
    add_connection(admin_proxy, bob, "tickets", "user_api_key", "kept-key")
    (grant_id,) = grant_ids(admin_proxy, bobs.client.client_id)
    browser = admin_browser(admin_proxy)
    forms = {
        "/admin/grants/revoke": {"grant_id": str(grant_id)},
        "/admin/users/revoke": {"user_id": bob},
        "/admin/clients/revoke": {"client_id": bobs.client.client_id},
        "/admin/connections/disconnect": {"user_id": bob, "route": "tickets"},
        "/admin/sign-out": {},
    }
    for token in (None, "", "forged-" + secrets.token_urlsafe(16)):
        extra = {} if token is None else {"csrf_token": token}
        for path, data in forms.items():
            assert_page(admin_post(browser, path, {**data, **extra}, False), 400, "Reload the admin page")
    assert grant_ids(admin_proxy, bobs.client.client_id) == [grant_id]
    assert "tickets" in connection_routes(admin_proxy, bob)
    assert "Signed in as" in browser.session.get(admin_proxy.url + "/admin", timeout=10).text


def test_unknown_and_malformed_ids_are_refused_with_a_page(admin_proxy: RunningProxy) -> None:
    bobs = client_login(admin_proxy, f"Id Target {secrets.token_hex(3)}", login_hint="bob")
    (grant_id,) = grant_ids(admin_proxy, bobs.client.client_id)
    browser = admin_browser(admin_proxy)
    for value in (
        "abc",
        "",
        "-1",
        "1.0",
        "1e3",
        " 1",
        "\u0661",
        "9" * 19,
        "0x10",
        str(grant_id) + "\x00",
        str(grant_id) + "\n",
    ):
        assert_page(admin_post(browser, "/admin/grants/revoke", {"grant_id": value}), 400, "A grant id is a number")
    assert_page(admin_post(browser, "/admin/grants/revoke", {}), 400)
    for value in ("9" * 18, str(2**31)):  # past the integer column: no grant id at all, on either database
        assert_page(admin_post(browser, "/admin/grants/revoke", {"grant_id": value}), 400, "A grant id is a number")
    assert_page(admin_post(browser, "/admin/grants/revoke", {"grant_id": str(2**31 - 1)}), 404, "No live grant")
    assert_page(admin_post(browser, "/admin/users/revoke", {"user_id": "no-such-user"}), 404)
    assert_page(admin_post(browser, "/admin/users/revoke", {"user_id": ""}), 400)
    assert_page(admin_post(browser, "/admin/users/revoke", {"user_id": "u" * 256}), 400, "at most 255")
    assert_page(admin_post(browser, "/admin/clients/revoke", {"client_id": "no-such-client"}), 404)
    assert_page(admin_post(browser, "/admin/clients/revoke", {"client_id": "c" * 2049}), 400, "at most 2048")
    for route in ("no-such-route", "notes", "", "../tickets"):  # notes takes no per-user credential
        assert_page(admin_post(browser, "/admin/connections/disconnect", {"user_id": "bob", "route": route}), 404)
    assert grant_ids(admin_proxy, bobs.client.client_id) == [grant_id]

    assert admin_post(browser, "/admin/grants/revoke", {"grant_id": str(grant_id)}).status_code == 303
    assert_page(admin_post(browser, "/admin/grants/revoke", {"grant_id": str(grant_id)}), 404, "revoked already")
    huge = admin_post(browser, "/admin/users/revoke", {"user_id": "u" * 40_000})
    assert huge.status_code == 413  # the form body bound, before any lookup


def test_filters_are_bounded_and_narrow_the_tables(admin_proxy: RunningProxy) -> None:
    bobs = client_login(admin_proxy, f"Filter Bob {secrets.token_hex(3)}", login_hint="bob")
    alices = client_login(admin_proxy, f"Filter Alice {secrets.token_hex(3)}")
    browser = admin_browser(admin_proxy)
    url = admin_proxy.url + "/admin"
    for query, problem in (
        ({"user": "u" * 256}, "at most 255 characters"),
        ({"client": "c" * 2049}, "at most 2048 characters"),
        ({"user": "bob\x00"}, "control character"),
        ({"client": "a\nb"}, "control character"),
    ):
        refused = browser.session.get(url, params=query, timeout=10)
        assert_page(refused, 400, problem)
        for name, value in CONSENT_PAGE_HEADERS.items():
            assert refused.headers.get(name) == value
    enormous = browser.session.get(url, params={"user": "u" * 60_000}, timeout=10)
    assert enormous.status_code in (400, 414), enormous.status_code  # refused, never a 500

    by_client = browser.session.get(url, params={"client": bobs.client.client_id}, timeout=10)
    assert by_client.status_code == 200
    grants = by_client.text.split('id="grants"')[1].split('id="connections"')[0]
    assert bobs.client.client_id in unescape(by_client.text)
    assert grants.count('class="grant') == 1 and "Filter Bob" in grants and "Filter Alice" not in grants
    by_user = browser.session.get(url, params={"user": user_id_of(admin_proxy, alices)}, timeout=10).text
    grants = by_user.split('id="grants"')[1].split('id="connections"')[0]
    assert "Filter Alice" in grants and "Filter Bob" not in grants
    nothing = browser.session.get(url, params={"client": "no-such-client"}, timeout=10).text
    assert "No grant matches these filters" in nothing


def test_revoking_every_grant_of_a_client_or_user_ends_their_tokens(
    admin_proxy: RunningProxy, admin_log: pytest.LogCaptureFixture
) -> None:
    proxy = admin_proxy
    shared = McpOAuthClient.register(proxy.url, client_name=f"Shared {secrets.token_hex(3)}")
    alices = client_login(proxy, "", client=shared)
    bobs = client_login(proxy, "", login_hint="bob", client=shared)
    bob = user_id_of(proxy, bobs)
    bob_other = client_login(proxy, f"Bob Other {secrets.token_hex(3)}", login_hint="bob")
    browser = admin_browser(proxy)

    done = admin_post(browser, "/admin/clients/revoke", {"client_id": shared.client_id, "client": shared.client_id})
    assert done.status_code == 303
    assert done.headers["Location"] == f"{proxy.url}/admin?client={shared.client_id}"  # the filter kept
    assert mcp_status(proxy, alices) == 401 and mcp_status(proxy, bobs) == 401
    assert mcp_status(proxy, bob_other) == 200
    assert revoked_reasons(proxy, shared.client_id) == {admin.REVOKED_REASON}

    assert admin_post(browser, "/admin/users/revoke", {"user_id": bob}).status_code == 303
    assert mcp_status(proxy, bob_other) == 401
    assert revoked_reasons(proxy, bob_other.client.client_id) == {admin.REVOKED_REASON}
    assert_page(admin_post(browser, "/admin/users/revoke", {"user_id": bob}), 404)  # nothing live is left

    log = admin_log.text
    assert f"admin alice revoked every grant of client {shared.client_id} (2 grant(s))" in log
    assert f"admin alice revoked every grant of user {bob}" in log
    for login in (alices, bobs, bob_other):
        assert login.access_token not in log and login.refresh_token not in log


# -- the audit search --------------------------------------------------------------------------------------------------


def test_the_audit_search_finds_what_the_audit_trail_recorded(admin_proxy: RunningProxy) -> None:
    """bob signs in through an MCP client and revokes its token; the admin's search by his email finds his sign-in,
    his tokens and the revocation (the trail is written in batches: within a few seconds)."""
    bobs = client_login(admin_proxy, f"Audited {secrets.token_hex(3)}", login_hint="bob")
    assert bobs.client.revoke(bobs.refresh_token).status_code == 200
    browser = admin_browser(admin_proxy)
    deadline = time.monotonic() + 15
    while True:
        found = browser.session.get(
            admin_proxy.url + "/admin/audit", params={"user": BOB, "client": bobs.client.client_id}, timeout=10
        )
        assert found.status_code == 200, found.text[:800]
        if "token_revoked" in found.text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for event in ("sign_in", "token_issued", "token_revoked"):
        assert event in found.text, found.text[:3000]
    assert bobs.client.client_id in found.text and "bob" in found.text
    assert bobs.access_token not in found.text and bobs.refresh_token not in found.text
    for name, value in CONSENT_PAGE_HEADERS.items():
        assert found.headers.get(name) == value


@SQLITE_ONLY
def test_the_audit_search_passes_validated_filters_and_explains_bad_ones(
    admin_proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def query_events(**filters: Any) -> list[dict[str, Any]]:
        calls.append(filters)
        return [
            {"at": datetime(2026, 11, 30, 14, 5, 7), "user": "bob", "tool": "<b>search</b>", "detail": "x" * 1000},
            {"at": datetime(2026, 11, 30, 14, 1), "user": "bob", "route": "notes"},
        ]

    audit = types.ModuleType("oauthproxy.audit")
    audit.query_events = query_events  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "oauthproxy.audit", audit)
    browser = admin_browser(admin_proxy)
    url = admin_proxy.url + "/admin/audit"

    found = browser.session.get(
        url,
        params={"user": "bob", "route": "notes", "tool": "search", "since": "2026-11-30", "until": "2026-11-30T15:00"},
        timeout=10,
    )
    assert found.status_code == 200, found.text[:800]
    assert calls == [
        {
            "user": "bob",
            "route": "notes",
            "tool": "search",
            "since": datetime(2026, 11, 30),
            "until": datetime(2026, 11, 30, 15, 0),
            "limit": 100,
        }
    ]
    assert "2026-11-30 14:05:07 UTC" in found.text and "&lt;b&gt;search&lt;/b&gt;" in found.text
    assert "x" * 301 not in found.text  # each value cut to a bound
    assert found.text.count('class="event"') == 2

    for params, problem in (
        ({"since": "yesterday"}, "“yesterday” is not a date"),
        ({"until": "2026-13-45"}, "is not a date"),
        ({"since": "2026-11-30", "until": "2026-11-01"}, "“From” is after “Until”"),
        ({"limit": "0"}, "a number from 1 to 500"),
        ({"limit": "100000000000000000000000"}, "a number from 1 to 500"),
        ({"user": "u" * 256}, "at most 255 characters"),
        ({"tool": "a\x00b"}, "control character"),
    ):
        refused = browser.session.get(url, params=params, timeout=10)
        assert refused.status_code == 400, (params, refused.status_code)
        assert problem in unescape(refused.text) and "The search was not run" in refused.text
    assert len(calls) == 1  # nothing queried for a search with a problem
    assert browser.session.get(url, params={"limit": "500", "user": "bob"}, timeout=10).status_code == 200
    assert calls[-1]["limit"] == 500


def test_the_sign_in_returns_only_to_its_own_pages(admin_proxy: RunningProxy) -> None:
    """The account page's sign-in still returns to the account page; the admin page's to the admin page."""
    account_start = Browser(admin_proxy.url)
    form = account_start.session.get(admin_proxy.url + "/account", timeout=10).text
    started = account_start.session.post(
        admin_proxy.url + "/account/sign-in", data={"csrf_token": csrf_of(form)}, allow_redirects=False
    )
    back = account_start.authorize(started.headers["Location"], admin_proxy.url + "/account")
    assert back == admin_proxy.url + "/account"
    admin_browser(admin_proxy)


@SQLITE_ONLY
def test_each_table_stops_at_its_cap_and_says_so(admin_proxy: RunningProxy) -> None:
    """201 grants of one client: the grants table shows 200 and says there are more; filtering still finds one."""
    client_id = "cap-" + secrets.token_hex(8)
    with admin_proxy.app.app_context():
        db.session.add_all(
            Grant(
                client_id=client_id,
                user_id=f"cap-user-{index}",
                resource=admin_proxy.url + "/mcp/notes",
                created_at=datetime(2000, 1, 1),  # older than anything else: the other tables keep their rows
            )
            for index in range(admin.ROW_CAP + 1)
        )
        db.session.commit()
    browser = admin_browser(admin_proxy)
    page_html = browser.session.get(admin_proxy.url + "/admin", params={"client": client_id}, timeout=30).text
    grants = page_html.split('id="grants"')[1].split('id="connections"')[0]
    assert grants.count('<tr class="grant') == admin.ROW_CAP
    assert "The 200 most recent grants are shown; there are more: filter by user or client" in grants
    assert "cap-user-200" in grants and "cap-user-0<" not in grants  # the newest first
    one = browser.session.get(admin_proxy.url + "/admin", params={"user": "cap-user-0"}, timeout=30).text
    grants = one.split('id="grants"')[1].split('id="connections"')[0]
    assert grants.count('<tr class="grant') == 1 and "1 grants (at most 200 are shown)" in grants
