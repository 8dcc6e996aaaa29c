"""SQLite under faults: another process holding the write lock never freezes a gevent worker; a locked or read-only
database or a full disk answers a JSON 503 with Retry-After, never an HTML 500."""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable

import requests

from oauthproxy.models import db
from tests.conftest import RunningProxy
from tests.fault_fixtures import (
    Probe,
    fill_disk,
    hold_sqlite_write_lock,
    small_filesystem,
    sqlite_locked,
    sqlite_path,
)
from tests.flows import hidden_inputs, query_of
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import EchoServer, GunicornProxy, log_in, sse_events
from tests.support.databases import SQLITE_ONLY
from tests.test_proxy_refresh import expire_upstream_token, grant_id_of

pytestmark = SQLITE_ONLY

REGISTRATION = {
    "client_name": "fault test",
    "redirect_uris": ["http://127.0.0.1:3999/callback"],
    "token_endpoint_auth_method": "none",
}


def assert_unavailable(response: requests.Response) -> None:
    """What a client must get while the database is in trouble: a JSON 503 it can act on."""
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    assert response.json()["error"] == "temporarily_unavailable"
    assert int(response.headers["Retry-After"]) > 0


def test_a_held_write_lock_never_freezes_the_worker(
    start_gunicorn: Callable[..., GunicornProxy], echo_downstream: EchoServer, database_dsn: str
) -> None:
    proxy = start_gunicorn(MCP_SERVER_URL=echo_downstream.url + "/mcp", DATABASE_TIMEOUT="2")
    login = log_in(proxy.url, proxy.url + "/mcp")
    assert requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=10).status_code == 200  # token cached

    arrivals: list[float] = []
    stream = requests.get(proxy.url + "/mcp/sse?events=35&pause=0.2", headers=login.bearer, stream=True, timeout=30)
    reader = threading.Thread(target=lambda: arrivals.extend(time.monotonic() for _ in sse_events(stream)), daemon=True)
    reader.start()
    health = Probe(proxy.url + "/healthz").start()
    time.sleep(0.5)

    holder = hold_sqlite_write_lock(sqlite_path(database_dsn), seconds=5)
    asked = time.monotonic()
    registration = requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30)
    answered = time.monotonic()
    released = holder.wait_released()
    health.stop()
    reader.join(timeout=30)

    # The write waited for the lock up to DATABASE_TIMEOUT, then gave up, while the other process still held it.
    assert_unavailable(registration)
    assert answered < released
    # While it waited (and while the lock was held), the worker kept serving: probes and stream events came through.
    assert len(health.answered_between(asked, answered)) >= 3
    assert all(status == 200 for _, _, status in health.results)
    during = [arrival for arrival in arrivals if holder.locked_at <= arrival <= released]
    assert len(during) >= 10, (len(during), len(arrivals))
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert max(gaps) < 3, max(gaps)  # a blocked worker showed one gap as long as the lock (5 s)
    # Once the lock is free, writes succeed again without a restart.
    assert requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30).status_code == 201


def test_a_locked_database_answers_503_on_every_writing_endpoint(
    start_proxy: Callable[..., RunningProxy], database_dsn: str
) -> None:
    proxy = start_proxy(DATABASE_TIMEOUT="2")
    path = sqlite_path(database_dsn)
    client = proxy.register_client()
    tokens = client.exchange(client.login(proxy.browser())["code"]).json()
    with sqlite_locked(path):
        assert_unavailable(requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30))
        assert_unavailable(client.refresh(tokens["refresh_token"]))
    # The refresh token was not spent by the failed attempt: a database blip does not log the user out.
    refreshed = client.refresh(tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text

    browser = proxy.browser()
    consent_page = browser.session.get(client.authorize_url(), allow_redirects=False, timeout=30)
    assert consent_page.status_code == 200 and 'action="/authorize/consent"' in consent_page.text
    form = {**hidden_inputs(consent_page.text), "decision": "approve"}
    with sqlite_locked(path):
        assert_unavailable(
            browser.session.post(proxy.url + "/authorize/consent", data=form, allow_redirects=False, timeout=30)
        )
    approved = browser.session.post(proxy.url + "/authorize/consent", data=form, allow_redirects=False, timeout=30)
    assert approved.is_redirect, approved.text  # to the provider's login
    callback = browser.authorize(approved.headers["Location"], proxy.url + "/callback")
    with sqlite_locked(path):
        assert_unavailable(browser.session.get(callback, allow_redirects=False, timeout=30))
    back = browser.session.get(callback, allow_redirects=False, timeout=30)  # the same callback, again
    assert back.is_redirect and back.headers["Location"].startswith(client.redirect_uri), back.text
    code = query_of(back.headers["Location"])["code"]
    with sqlite_locked(path):
        assert_unavailable(client.exchange(code))
    assert client.exchange(code).status_code == 200


def test_a_read_only_database_answers_503(start_proxy: Callable[..., RunningProxy], database_dsn: str) -> None:
    start_proxy()  # migrates the database
    read_only = f"sqlite:///file:{sqlite_path(database_dsn)}?mode=ro&uri=true"
    proxy = start_proxy(DATABASE_DSN=read_only)
    assert_unavailable(requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30))
    ready = requests.get(proxy.url + "/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["database"] == "not writable", ready.text


def test_no_database_lock_is_held_while_the_provider_refreshes(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, provider_failure_reset: OidcProvider
) -> None:
    """An upstream refresh waiting on a slow provider holds no SQLite lock: other writes go through meanwhile."""
    # The route forwards the provider's token, so a request refreshes it when it is about to expire.
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_FORWARD_ACCESS_TOKEN="true")
    login = log_in(proxy.url, proxy.url + "/mcp")
    grant_id = grant_id_of(proxy.app, login.access_token)
    expire_upstream_token(proxy.app, grant_id)
    provider_failure_reset.set_failure("token_delay", delay_ms=4000)

    finished: dict[str, float] = {}

    def call_mcp() -> None:
        assert requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=30).status_code == 200
        finished["mcp"] = time.monotonic()

    refreshing = threading.Thread(target=call_mcp)
    started = time.monotonic()
    refreshing.start()
    time.sleep(1)  # the refresh is now waiting for the provider
    registration = requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30)
    finished["register"] = time.monotonic()
    refreshing.join(timeout=30)
    assert registration.status_code == 201, registration.text
    assert finished["mcp"] - started > 3  # the MCP request did refresh, waiting for the slow provider
    assert finished["register"] < finished["mcp"]  # it did not wait for the provider


def row_counts(path: str) -> dict[str, int]:
    connection = sqlite3.connect(path)
    try:
        return {
            table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("oauth_clients", "grants", "authorization_codes", "tokens", "pending_authorizations")
        }
    finally:
        connection.close()


def test_a_full_disk_answers_503_and_recovers_when_space_is_freed(start_proxy: Callable[..., RunningProxy]) -> None:
    """The database file on a small tmpfs, filled up: writes get the JSON 503, nothing is half-written, /readyz
    says not writable, and once space is freed the same running proxy works again."""
    with small_filesystem("4m") as folder:
        path = str(folder / "oauthproxy.sqlite3")
        proxy = start_proxy(DATABASE_DSN=f"sqlite:///{path}", DATABASE_TIMEOUT="2")
        client = proxy.register_client()
        tokens = client.exchange(client.login(proxy.browser())["code"]).json()
        before = row_counts(path)

        filler = fill_disk(folder)
        assert os.statvfs(folder).f_bavail == 0
        assert_unavailable(requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30))
        assert_unavailable(client.refresh(tokens["refresh_token"]))
        ready = requests.get(proxy.url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["database"] == "not writable", ready.text
        assert row_counts(path) == before  # nothing half-written

        filler.unlink()
        ready = requests.get(proxy.url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30).status_code == 201
        # The refresh refused during the fault spent nothing: the user is still signed in.
        refreshed = client.refresh(tokens["refresh_token"])
        assert refreshed.status_code == 200, refreshed.text
        with proxy.app.app_context():
            db.engine.dispose()  # before the file system goes away


def test_a_disk_filling_up_never_logs_a_user_out(start_proxy: Callable[..., RunningProxy]) -> None:
    """Nearly full: room for a small change but not for the database to grow. A refresh either succeeds or gets the
    503 with nothing spent; never a rotated refresh token without its successor (which logged the user out:
    400 invalid_grant at the next try and every try after the disk was freed)."""
    with small_filesystem("4m") as folder:
        path = str(folder / "oauthproxy.sqlite3")
        proxy = start_proxy(DATABASE_DSN=f"sqlite:///{path}", DATABASE_TIMEOUT="2")
        client = proxy.register_client()
        refresh_token = client.exchange(client.login(proxy.browser())["code"]).json()["refresh_token"]
        for room in (8, 12, 16, 24, 32, 48):
            filler = fill_disk(folder, leave=room * 1024)
            answers = []
            for _ in range(4):
                refreshed = client.refresh(refresh_token)
                answers.append(refreshed.status_code)
                if refreshed.status_code == 200:
                    refresh_token = refreshed.json()["refresh_token"]
                else:
                    assert_unavailable(refreshed)
            filler.unlink()
            refreshed = client.refresh(refresh_token)
            assert refreshed.status_code == 200, (room, answers, refreshed.text)
            refresh_token = refreshed.json()["refresh_token"]
        with proxy.app.app_context():
            db.engine.dispose()


def grants_without_a_code(path: str) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(
            "SELECT count(*) FROM grants WHERE NOT EXISTS (SELECT 1 FROM authorization_codes "
            "WHERE authorization_codes.grant_id = grants.id)"
        ).fetchone()[0]
    finally:
        connection.close()


def test_a_disk_filling_up_leaves_no_half_written_login(start_proxy: Callable[..., RunningProxy]) -> None:
    """Logins at several levels of a nearly full disk: each step answers normally or with the JSON 503, and a
    callback whose authorization code cannot be stored leaves no grant behind (it holds the user's provider tokens,
    and nothing could ever use it)."""
    with small_filesystem("4m") as folder:
        path = str(folder / "oauthproxy.sqlite3")
        proxy = start_proxy(DATABASE_DSN=f"sqlite:///{path}", DATABASE_TIMEOUT="2")
        client = proxy.register_client()
        assert client.exchange(client.login(proxy.browser())["code"]).status_code == 200
        answers: list[tuple[str, int]] = []
        for room in range(8, 49, 4):
            filler = fill_disk(folder, leave=room * 1024)
            for _ in range(2):
                browser = proxy.browser()
                page = browser.session.get(client.authorize_url(), allow_redirects=False, timeout=30)
                assert page.status_code == 200, page.text  # reads only
                form = {**hidden_inputs(page.text), "decision": "approve"}
                approved = browser.session.post(
                    proxy.url + "/authorize/consent", data=form, allow_redirects=False, timeout=30
                )
                answers.append(("consent", approved.status_code))
                if not approved.is_redirect:
                    assert_unavailable(approved)
                    continue
                back = browser.session.get(
                    browser.authorize(approved.headers["Location"], proxy.url + "/callback"),
                    allow_redirects=False,
                    timeout=30,
                )
                answers.append(("callback", back.status_code))
                if not back.is_redirect:
                    assert_unavailable(back)
                    continue
                exchanged = client.exchange(query_of(back.headers["Location"])["code"])
                answers.append(("exchange", exchanged.status_code))
                if exchanged.status_code != 200:
                    assert_unavailable(exchanged)
            filler.unlink()
            assert grants_without_a_code(path) == 0, (room, answers)
        assert ("callback", 503) in answers, answers  # the disk filled up at the callback at least once
        assert client.exchange(client.login(proxy.browser())["code"]).status_code == 200  # and all works again
        with proxy.app.app_context():
            db.engine.dispose()
