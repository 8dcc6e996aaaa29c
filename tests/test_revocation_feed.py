"""The revocation feed (issue 14): a revoked grant stops working on every worker of every instance within a second,
while a cached token still costs no database query per request.

First the pure parts (payloads, the poller's cursor, the token cache, settings, the listener's bookkeeping); then
the announcement in the revoking transaction and each listener losing and finding its feed again (a private
PostgreSQL, a private Redis, a broken table); then the measurement: two gunicorn instances of two gevent workers
each on one database, a connection pinned to every worker, a revocation at /revoke, and the time until all four
workers answer 401. It runs for each feed (SQLite poll; PostgreSQL notify, poll and Redis) and once without one.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
import redis
import requests
from flask import Flask
from sqlalchemy import event, func, select, text

from oauthproxy import create_app
from oauthproxy.config import ConfigError, load_settings
from oauthproxy.crypto import hash_token
from oauthproxy.database import upgrade_database
from oauthproxy.downstream_credentials import Caller
from oauthproxy.models import Revocation, Token, db
from oauthproxy.provider_tokens import ProviderAccess
from oauthproxy.resource_server import TokenCache, ValidatedToken
from oauthproxy.revocation_feed import (
    CHANNEL,
    GAP_WAIT_SECONDS,
    MAX_GAPS,
    MissedAnnouncements,
    RevocationCursor,
    RevocationFeed,
    announce_revoked,
    notify_payloads,
    parse_payload,
    revoked_in_transaction,
)
from oauthproxy.self_check import SelfCheck
from tests.conftest import RunningProxy
from tests.deployment_fixtures import Instance, spawn_instance, wait_ready
from tests.fault_fixtures import PostgresCluster, start_postgres_cluster
from tests.interop_fixtures import worker_pids
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import EchoServer, Login, log_in
from tests.support.databases import SQLITE_ONLY
from tests.support.ports import free_port
from tests.support.settings import TEST_KEY, base_env

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
#: The promise: every worker of every instance refuses a revoked token within this long.
BOUND_SECONDS = 1.0
RUNS = 5


# -- pure parts -----------------------------------------------------------------------------------


def cached(grant_id: int, token_id: int = 1, lifetime: float = 3600) -> ValidatedToken:
    return ValidatedToken(
        token_id=token_id,
        grant_id=grant_id,
        scopes=frozenset({"openid"}),
        resource="http://127.0.0.1/mcp",
        expires_at=time.time() + lifetime,
        caller=Caller("alice", "alice@example.com", "Alice", None),
        upstream=ProviderAccess(None, None),
    )


def test_grant_ids_travel_in_payloads_below_postgresqls_limit() -> None:
    ids = list(range(1, 5001))
    payloads = notify_payloads(ids, limit=100)
    assert all(len(payload) <= 100 for payload in payloads)
    assert [grant_id for payload in payloads for grant_id in parse_payload(payload)] == ids
    assert notify_payloads([]) == []
    assert notify_payloads([7]) == ["7"]


def test_a_payload_is_read_as_grant_ids_only() -> None:
    assert parse_payload(b"1,22,333") == [1, 22, 333]
    assert parse_payload("1,-2,x,3.5,,٣,99999999999999999999,4") == [1, 4]  # nothing else is trusted as an id


def test_the_cursor_applies_each_row_once_even_when_commits_come_out_of_id_order() -> None:
    cursor = RevocationCursor(last_seen=10)
    assert cursor.advance([(11, 101), (12, 102)], now=0) == [101, 102]
    # PostgreSQL: 13 was handed out first but 14 committed first; the poller sees 14 alone.
    assert cursor.advance([(14, 104)], now=1) == [104]
    assert cursor.gaps.keys() == {13}
    # The next poll asks for the gap and for what is new: 13 arrives late and is applied, once.
    assert cursor.advance([(13, 103), (15, 105)], now=2) == [103, 105]
    assert cursor.gaps == {}
    assert cursor.advance([(13, 103), (14, 104), (15, 105)], now=3) == []  # read again: nothing twice


def test_a_gap_never_filled_is_given_up_after_its_wait() -> None:
    cursor = RevocationCursor(last_seen=0)
    cursor.advance([(2, 102)], now=0)  # 1: a rolled-back insert, say
    cursor.advance([], now=GAP_WAIT_SECONDS - 1)
    assert 1 in cursor.gaps
    cursor.advance([], now=GAP_WAIT_SECONDS)
    assert cursor.gaps == {}


def test_too_many_skipped_ids_count_as_a_missed_feed() -> None:
    cursor = RevocationCursor(last_seen=0)
    with pytest.raises(MissedAnnouncements):
        cursor.advance([(MAX_GAPS + 2, 1)], now=0)


def test_the_token_cache_forgets_a_grants_tokens_and_only_those() -> None:
    cache = TokenCache(ttl=30, max_entries=10)
    for key, grant_id in (("a", 1), ("b", 1), ("c", 2)):
        cache.put(key, cached(grant_id), cache.generation)
    cache.forget_grants({1})
    assert cache.get("a") is None and cache.get("b") is None
    assert cache.get("c") is not None
    cache.clear()
    assert len(cache) == 0 and cache.get("c") is None


def test_a_token_read_before_a_revocation_arrived_is_not_cached_after_it() -> None:
    cache = TokenCache(ttl=30, max_entries=10)
    before_query = cache.generation
    cache.forget_grants({1})  # announced while the request was reading the (then still live) row
    cache.put("a", cached(1), before_query)
    assert cache.get("a") is None
    cache.put("a", cached(1), cache.generation)  # read after it: cached as usual
    assert cache.get("a") is not None


def test_a_refreshed_entry_never_brings_back_a_forgotten_one() -> None:
    cache = TokenCache(ttl=30, max_entries=10)
    cache.put("a", cached(1), cache.generation)
    cache.forget_grant(1)
    cache.update("a", cached(1))  # the upstream refresh finishing after the revocation
    assert cache.get("a") is None


def test_evicted_and_expired_entries_leave_the_grant_index() -> None:
    cache = TokenCache(ttl=30, max_entries=2)
    cache.put("a", cached(1), cache.generation)
    cache.put("b", cached(2), cache.generation)
    cache.put("c", cached(3), cache.generation)  # evicts a
    cache.put("d", cached(4, lifetime=0.01), cache.generation)
    time.sleep(0.02)
    assert cache.get("d") is None
    assert set(cache._keys_of_grant) == {3}, cache._keys_of_grant


def feed_env(dsn: str, **extra: str) -> dict[str, str]:
    """Settings of an application that never calls its provider (no discovery: token and user info URLs given)."""
    return {
        "PUBLIC_URL": "http://127.0.0.1:9",
        "OAUTH_CLIENT_ID": "feed",
        "OAUTH_CLIENT_SECRET": "feed-secret",
        "OAUTH_AUTHORIZE_URL": "http://127.0.0.1:9/authorize",
        "OAUTH_TOKEN_URL": "http://127.0.0.1:9/token",
        "OAUTH_USERINFO_URL": "http://127.0.0.1:9/userinfo",
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "DATABASE_DSN": dsn,
        "DATABASE_TIMEOUT": "2",
        "ENCRYPTION_KEY": TEST_KEY,
        **extra,
    }


@pytest.mark.parametrize(
    ("dsn", "extra", "feed", "redis_url"),
    [
        ("sqlite:////tmp/x.db", {}, "poll", None),
        ("postgresql://u@h/db", {}, "notify", None),
        ("postgres://u@h/db", {"REVOCATION_FEED": "poll"}, "poll", None),  # behind a transaction-pooling PgBouncer
        ("postgresql://u@h/db", {"REVOCATION_REDIS_URL": "redis://r:6379/2"}, "redis", "redis://r:6379/2"),
        (
            "sqlite:////tmp/x.db",
            {"REVOCATION_FEED": "redis", "RATE_LIMIT_STORAGE_URI": "redis://r"},
            "redis",
            "redis://r",
        ),
        ("sqlite:////tmp/x.db", {"REVOCATION_FEED": "off"}, "off", None),
    ],
)
def test_the_feed_follows_the_database_unless_told_otherwise(
    dsn: str, extra: dict[str, str], feed: str, redis_url: str | None
) -> None:
    settings = load_settings(feed_env(dsn, **extra))
    assert (settings.revocation_feed, settings.revocation_redis_url) == (feed, redis_url)


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"REVOCATION_FEED": "notify"}, "REVOCATION_FEED=notify needs PostgreSQL"),
        ({"REVOCATION_FEED": "redis"}, "REVOCATION_FEED=redis needs REVOCATION_REDIS_URL"),
        ({"REVOCATION_REDIS_URL": "http://r"}, "REVOCATION_REDIS_URL must be a redis://"),
        ({"REVOCATION_FEED": "gossip"}, "REVOCATION_FEED must be auto or notify or poll or redis or off"),
    ],
)
def test_a_feed_that_cannot_work_is_refused_at_start(extra: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(feed_env("sqlite:////tmp/x.db", **extra))
    assert any(line.startswith(problem) for line in refused.value.problems), refused.value.problems


class ScriptedSubscription:
    """A subscription that yields what a test queues, or fails on cue: the listener's bookkeeping without a server."""

    def __init__(self) -> None:
        self.events: list[list[int] | Exception] = []
        self.subscribed = 0
        self.lock = threading.Lock()

    def __call__(self, stopped: threading.Event) -> Iterator[list[int]]:
        with self.lock:
            self.subscribed += 1
        yield []
        while not stopped.is_set():
            with self.lock:
                event = self.events.pop(0) if self.events else []
            if isinstance(event, Exception):
                raise event
            yield event
            time.sleep(0.01)


def wait_for(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> float:
    """Poll `condition` every 10 ms; return how long it took to hold."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def test_the_listener_forgets_what_it_hears_and_flushes_after_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    cache = TokenCache(ttl=30, max_entries=10)
    subscription = ScriptedSubscription()
    feed = RevocationFeed("poll", cache, subscription, None, "unused")
    cache.put("early", cached(9), cache.generation)  # cached before the listener ran: flushed when it connects
    caplog.set_level(logging.INFO, "oauthproxy.revocation_feed")
    feed.listen()
    try:
        wait_for(lambda: feed.connected, what="connected")
        assert cache.get("early") is None
        cache.put("a", cached(1), cache.generation)
        cache.put("b", cached(2), cache.generation)
        subscription.events.append([1])
        wait_for(lambda: cache.get("a") is None, what="grant 1 forgotten")
        assert cache.get("b") is not None

        subscription.events.append(ConnectionError("the feed went away"))
        wait_for(lambda: subscription.subscribed == 2, what="reconnected")
        wait_for(lambda: feed.connected, what="connected again")
        assert cache.get("b") is None  # whatever was announced meanwhile went unheard: nothing cached is kept

        def messages() -> list[str]:
            return [record.getMessage() for record in caplog.records]

        # The listener logs its return just after it says it is connected: wait for the line, not only the flag.
        wait_for(lambda: any("back after" in m and "token cache flushed" in m for m in messages()), what="back line")
        assert any(
            "lost: ConnectionError: the feed went away" in m and "TOKEN_CACHE_TTL (30 s)" in m for m in messages()
        )
    finally:
        feed.stop()
    wait_for(lambda: not feed.connected, what="stopped")


def test_a_listener_is_started_once_per_process_and_only_where_tokens_are_cached() -> None:
    subscription = ScriptedSubscription()
    feed = RevocationFeed("poll", TokenCache(ttl=30, max_entries=10), subscription, None, "unused")
    feed.listen_on_first_use()  # not asked to (no wsgi.py): an application inside a test or a CLI command
    time.sleep(0.1)
    assert subscription.subscribed == 0
    feed.autostart = True
    try:
        feed.listen_on_first_use()
        feed.listen_on_first_use()
        feed.listen()
        wait_for(lambda: feed.connected)
        time.sleep(0.1)
        assert subscription.subscribed == 1
    finally:
        feed.stop()
    uncached = RevocationFeed("poll", TokenCache(ttl=0, max_entries=10), subscription, None, "unused")
    uncached.listen()  # TOKEN_CACHE_TTL=0: nothing cached, nothing to forget
    time.sleep(0.1)
    assert subscription.subscribed == 1


def test_with_the_listener_running_a_cached_token_still_costs_no_database_query(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    feed = listener_of(proxy.app)
    login = log_in(proxy.url, proxy.url + "/mcp")
    by_thread: dict[str, list[str]] = {"requests": [], "listener": []}
    with proxy.app.app_context():
        engine = db.engine

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        if (
            threading.current_thread().name != "audit-flush"
        ):  # the audit trail's batched writes are off the request path
            by_thread["listener" if threading.current_thread().name == "revocation-feed" else "requests"].append(
                statement
            )

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=5).status_code == 200
        by_thread["requests"].clear()
        for _ in range(20):
            assert requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=5).status_code == 200
            time.sleep(0.05)
        assert by_thread["requests"] == []
        # The poller reads on its own, four times a second whatever the traffic; LISTEN holds a connection of its
        # own and reads nothing through the pool.
        assert (len(by_thread["listener"]) > 0) == (feed.mode == "poll"), by_thread["listener"]
    finally:
        event.remove(engine, "before_cursor_execute", count)
        feed.stop()


# -- the announcement, in the revoking transaction ---------------------------------------------------


@pytest.fixture
def feed_app(database_dsn: str, migrated_databases: set[str]) -> Iterator[Callable[..., Flask]]:
    """Factory: an application on the test database (migrated once), with extra settings; disposed at the end."""
    apps: list[Flask] = []

    def build(dsn: str | None = None, **extra: str) -> Flask:
        app = create_app(feed_env(dsn or database_dsn, **extra))
        target = dsn or database_dsn
        if target not in migrated_databases:
            upgrade_database(app)
            migrated_databases.add(target)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["oauthproxy"].revocation_feed.stop()
        with app.app_context():
            db.engine.dispose()


def rows_for(app: Flask, grant_id: int) -> int:
    with app.app_context():
        count = len(db.session.scalars(select(Revocation.id).where(Revocation.grant_id == grant_id)).all())
        db.session.rollback()
        return count


@contextmanager
def listening(dsn: str) -> Iterator[psycopg.Connection]:
    connection = psycopg.connect(dsn.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    try:
        connection.execute(f"LISTEN {CHANNEL}")
        yield connection
    finally:
        connection.close()


def heard(connection: psycopg.Connection, timeout: float = 0.3) -> list[str]:
    return [notification.payload for notification in connection.notifies(timeout=timeout)]


def test_an_announcement_commits_with_the_revocation_or_not_at_all(
    feed_app: Callable[..., Flask], database_dsn: str
) -> None:
    app = feed_app()
    grant_id = int(time.time() * 1000) % 1_000_000_000  # no grant row needed: the table holds ids only
    postgres = database_dsn.startswith("postgresql")
    with listening(database_dsn) if postgres else _nothing() as listener, app.app_context():
        revoked_in_transaction([grant_id])
        db.session.rollback()
        assert rows_for(app, grant_id) == 0
        revoked_in_transaction([grant_id])
        if listener is not None:
            assert heard(listener) == []  # NOTIFY is held until the commit
        db.session.commit()
        assert rows_for(app, grant_id) == 1
        if listener is not None:
            assert heard(listener, timeout=2) == [str(grant_id)]
        db.session.commit()  # a later commit announces nothing again
        assert rows_for(app, grant_id) == 1
        announce_revoked([grant_id + 1, grant_id + 2])  # after a commit of one's own (the account page)
        assert rows_for(app, grant_id + 1) == rows_for(app, grant_id + 2) == 1
        if listener is not None:
            assert heard(listener, timeout=2) == [f"{grant_id + 1},{grant_id + 2}"]


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def test_rows_older_than_the_retention_are_pruned_by_the_next_announcement(
    feed_app: Callable[..., Flask],
) -> None:
    app = feed_app()
    with app.app_context():
        db.session.execute(
            Revocation.__table__.insert().values(grant_id=424242, revoked_at=datetime(2000, 1, 1))  # type: ignore[attr-defined]
        )
        db.session.commit()
        assert rows_for(app, 424242) == 1
        announce_revoked([424243])
    assert rows_for(app, 424242) == 0


def test_every_revocation_in_the_code_goes_through_revoke_grant() -> None:
    """revoke_grant announces; a grant or token ended any other way would stay cached elsewhere for TOKEN_CACHE_TTL.
    So the only statements that set `revoked_at` are revoke_grant's (and the feed's own rows)."""
    package = Path(__file__).resolve().parent.parent / "oauthproxy"
    setters = {
        f"{path.name}:{number}"
        for path in package.rglob("*.py")
        if "migrations" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\brevoked_at\s*=(?!=)", line)
        and "Mapped[" not in line
        # Copying a row's value into a view (admin.py's GrantRow) reads it; it revokes nothing.
        and not re.search(r"\brevoked_at=\w+\.revoked_at\b", line)
    }
    assert {name.split(":")[0] for name in setters} == {"authorization_server.py", "revocation_feed.py"}, setters


def test_grants_revoked_by_the_operator_are_announced_once_committed(proxy: RunningProxy) -> None:
    logins = [log_in(proxy.url, proxy.url + "/mcp", login_hint=user) for user in ("alice", "bob")]
    with proxy.app.app_context():
        grant_ids = [
            db.session.scalar(select(Token.grant_id).where(Token.access_token_hash == hash_token(login.access_token)))
            for login in logins
        ]
        before = db.session.scalar(select(func.max(Revocation.id))) or 0
        db.session.rollback()
    result = proxy.app.test_cli_runner().invoke(args=["grants", "revoke", str(grant_ids[0])])
    assert result.exit_code == 0, result.output
    assert "within a second (revocation feed: " in result.output
    with proxy.app.app_context():
        announced = db.session.scalars(select(Revocation.grant_id).where(Revocation.id > before)).all()
        db.session.rollback()
    assert announced == [grant_ids[0]]  # bob's grant: neither revoked nor announced


# -- each listener loses its feed and finds it again -------------------------------------------------


def listener_of(app: Flask) -> RevocationFeed:
    feed: RevocationFeed = app.extensions["oauthproxy"].revocation_feed
    feed.listen()
    wait_for(lambda: feed.connected, what=f"the {feed.mode} feed connected")
    return feed


def forgets_within(feed: RevocationFeed, grant_id: int, announcer: Flask) -> float:
    """Cache a token of `grant_id` in `feed`'s cache, announce its revocation from `announcer` (another application
    on the same database), and return how long the listener took to forget it."""
    feed.cache.put(f"token-{grant_id}", cached(grant_id), feed.cache.generation)
    started = time.monotonic()
    with announcer.app_context():
        announce_revoked([grant_id])
    wait_for(lambda: feed.cache.get(f"token-{grant_id}") is None, 5, f"grant {grant_id} forgotten")
    return time.monotonic() - started


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of the tests' own, to stop and freeze (tests.fault_fixtures)."""
    # Not under pytest's temp folder: that is private to root, and the server runs as an unprivileged user.
    folder = Path(tempfile.mkdtemp(prefix="oauthproxy-feed-postgres-"))
    try:
        cluster = start_postgres_cluster(folder)
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@SQLITE_ONLY
def test_notify_listener_falls_back_while_postgresql_is_away_and_flushes_when_it_returns(
    feed_app: Callable[..., Flask], private_postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "oauthproxy.revocation_feed")
    dsn = private_postgres.dsn
    app = feed_app(dsn)
    announcer = feed_app(dsn)
    feed = listener_of(app)
    assert forgets_within(feed, 1, announcer) < BOUND_SECONDS

    feed.cache.put("kept", cached(2), feed.cache.generation)
    private_postgres.stop()
    wait_for(lambda: not feed.connected, 10, "the listener noticed")
    # While the feed is down the cache is still trusted, for TOKEN_CACHE_TTL at most: the bound before the feed.
    assert feed.cache.get("kept") is not None
    time.sleep(1)  # a few reconnection attempts fail meanwhile
    private_postgres.start()
    wait_for(lambda: feed.connected, 20, "the listener reconnected")
    assert feed.cache.get("kept") is None  # announcements made while it was away would have gone unheard
    assert forgets_within(feed, 3, announcer) < BOUND_SECONDS
    messages = [record.getMessage() for record in caplog.records]
    assert any("revocation feed (notify) lost" in m for m in messages), messages
    assert any("revocation feed (notify) back after" in m for m in messages), messages


@SQLITE_ONLY
def test_notify_listener_notices_a_frozen_server_by_its_heartbeat(
    feed_app: Callable[..., Flask], private_postgres: PostgresCluster
) -> None:
    app = feed_app(private_postgres.dsn)
    feed = listener_of(app)
    with private_postgres.frozen():
        # Nothing closes the connection: only the heartbeat (every 5 s of silence) finds that nothing answers
        # (within DATABASE_TIMEOUT + 1 s).
        took = wait_for(lambda: not feed.connected, 15, "the listener noticed the frozen server")
    assert took < 5 + 2 + 1 + 1
    wait_for(lambda: feed.connected, 20, "the listener reconnected")


@SQLITE_ONLY
def test_poll_listener_falls_back_while_it_cannot_read_and_flushes_when_it_can(
    feed_app: Callable[..., Flask], tmp_path: Path
) -> None:
    dsn = f"sqlite:///{tmp_path / 'feed.sqlite3'}"
    app, announcer = feed_app(dsn), feed_app(dsn)
    feed = listener_of(app)
    assert forgets_within(feed, 1, announcer) < BOUND_SECONDS
    feed.cache.put("kept", cached(2), feed.cache.generation)
    with announcer.app_context():
        db.session.execute(text("ALTER TABLE revocations RENAME TO revocations_away"))
        db.session.commit()
        wait_for(lambda: not feed.connected, 5, "the poller noticed")
        assert feed.cache.get("kept") is not None
        db.session.execute(text("ALTER TABLE revocations_away RENAME TO revocations"))
        db.session.commit()
    wait_for(lambda: feed.connected, 20, "the poller is back")
    assert feed.cache.get("kept") is None
    assert forgets_within(feed, 3, announcer) < BOUND_SECONDS


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_for(lambda: _redis_answers(port), 10, "redis-server started")
        return process

    start.port = port  # type: ignore[attr-defined]
    yield start
    for process in processes:
        process.kill()
        process.wait()


def _redis_answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@SQLITE_ONLY
def test_redis_listener_falls_back_while_redis_is_away_and_flushes_when_it_returns(
    feed_app: Callable[..., Flask], private_redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "oauthproxy.revocation_feed")
    server = private_redis()
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    dsn = f"sqlite:///{tmp_path / 'feed.sqlite3'}"
    app, announcer = feed_app(dsn, REVOCATION_REDIS_URL=url), feed_app(dsn, REVOCATION_REDIS_URL=url)
    feed = listener_of(app)
    assert feed.mode == "redis"
    assert forgets_within(feed, 1, announcer) < BOUND_SECONDS

    feed.cache.put("kept", cached(2), feed.cache.generation)
    server.kill()
    server.wait()
    wait_for(lambda: not feed.connected, 10, "the listener noticed")
    assert feed.cache.get("kept") is not None
    with announcer.app_context():
        announce_revoked([5])  # Redis is away: the revocation itself commits, and the failure is said
    assert rows_for(announcer, 5) == 1
    messages = [record.getMessage() for record in caplog.records]
    assert any("could not publish the revocation of grant(s) 5 to Redis" in m for m in messages), messages
    private_redis()
    wait_for(lambda: feed.connected, 20, "the listener reconnected")
    assert feed.cache.get("kept") is None
    assert forgets_within(feed, 3, announcer) < BOUND_SECONDS


@SQLITE_ONLY
def test_check_says_whether_the_feed_can_listen(feed_app: Callable[..., Flask], tmp_path: Path) -> None:
    dsn = f"sqlite:///{tmp_path / 'feed.sqlite3'}"
    cases = [
        (feed_app(dsn), "ok", "poll: revocations reach every worker within a second"),
        (
            feed_app(dsn, REVOCATION_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
            "fail",
            "redis: cannot listen (ConnectionError: ",
        ),
        (feed_app(dsn, REVOCATION_FEED="off"), "info", "off: a revoked token keeps working for up to 30 s"),
    ]
    for app, level, message in cases:
        with app.app_context():
            (finding,) = SelfCheck(app).revocation_feed()
        assert (finding.level, finding.message[: len(message)]) == (level, message), finding


# -- the measurement: two instances, two workers each --------------------------------------------------


def _server_side_inode(server_port: int, client_port: int) -> int | None:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
            return int(fields[9])
    return None


def _owner(inode: int, pids: set[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(descriptor) == target:
                    return pid
            except OSError:
                continue
    return None


class PinnedConnection:
    """A kept-alive connection to one gunicorn worker: every request on it reaches that worker (found in /proc)."""

    def __init__(self, instance: Instance):
        self.instance = instance
        self.http = http.client.HTTPConnection("127.0.0.1", instance.port, timeout=10)
        self.worker: int | None = None

    def call(self, token: str) -> int:
        self.http.request(
            "POST",
            "/mcp",
            body=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
            },
        )
        response = self.http.getresponse()
        response.read()
        if response.getheader("Connection", "").lower() == "close":
            raise AssertionError("the worker closed the pinned connection")
        return response.status

    def identify(self, token: str) -> int | None:
        self.call(token)  # accepted by now: the worker holds the server side of the socket
        assert self.http.sock is not None
        inode = _server_side_inode(self.instance.port, self.http.sock.getsockname()[1])
        self.worker = _owner(inode, worker_pids(self.instance)) if inode else None  # type: ignore[arg-type]
        return self.worker

    def close(self) -> None:
        self.http.close()


def pin_every_worker(instances: list[Instance], token: str, workers: int = 2) -> list[PinnedConnection]:
    pinned: list[PinnedConnection] = []
    for instance in instances:
        found: dict[int, PinnedConnection] = {}
        for _attempt in range(300):
            connection = PinnedConnection(instance)
            worker = connection.identify(token)
            if worker is None or worker in found:
                connection.close()
                continue
            found[worker] = connection
            if len(found) == workers:
                break
        assert len(found) == workers, f"reached workers {sorted(found)} of {sorted(worker_pids(instance))}"
        pinned.extend(found.values())
    return pinned


@dataclass
class Fleet:
    instances: list[Instance]
    public_url: str

    def log_in(self) -> Login:
        return log_in(self.public_url, self.public_url + "/mcp")


@contextmanager
def fleet_of(
    provider: OidcProvider, database_dsn: str, echo: EchoServer, folder: Path, **extra: str
) -> Iterator[Fleet]:
    """Two gunicorn instances, two gevent workers each, on one database, behind one PUBLIC_URL (the first's)."""
    ports = [free_port(), free_port()]
    public_url = f"http://127.0.0.1:{ports[0]}"
    client_id = f"feed-{ports[0]}"
    instances: list[Instance] = []
    try:
        for port in ports:
            env = {
                **os.environ,
                **base_env(port, provider, database_dsn, client_id),
                "PUBLIC_URL": public_url,
                "HOST": "127.0.0.1",
                "WEB_CONCURRENCY": "2",
                "OAUTHPROXY_ENV_FILE": os.devnull,
                "MCP_SERVER_URL": echo.url + "/mcp",
                "TOKEN_RATE_LIMIT": "1000 per minute",
                **extra,
            }
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            if not instances:
                provider.register_client(client_id, env["OAUTH_CLIENT_SECRET"], [f"{public_url}/callback"])
            # One after the other: the first migrates the database (on SQLite two masters would race at it).
            instances.append(wait_ready(spawn_instance(folder, env)))
        yield Fleet(instances, public_url)
    finally:
        for instance in instances:
            instance.stop()


@dataclass
class Run:
    revoke_seconds: float
    latencies: dict[int, float]  # worker pid -> seconds from sending /revoke to its first 401


def measure_once(fleet: Fleet, pinned: list[PinnedConnection], revoke_at: Instance, watch: float = 3.0) -> Run:
    login = fleet.log_in()
    for connection in pinned:  # the first call caches the token in that worker, the second is served from cache
        assert [connection.call(login.access_token) for _ in range(2)] == [200, 200]
    latencies: dict[int, float] = {}
    start = threading.Event()
    began = 0.0

    def poll(connection: PinnedConnection) -> None:
        start.wait()
        deadline = began + watch
        while time.monotonic() < deadline:
            status = connection.call(login.access_token)
            if status == 401:
                assert connection.worker is not None
                latencies[connection.worker] = time.monotonic() - began
                return
            assert status == 200, status
            time.sleep(0.02)  # about 50 requests a second per worker: the pollers must not load the machine

    threads = [threading.Thread(target=poll, args=(connection,)) for connection in pinned]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    start.set()
    revoked = replace(login.client, proxy_url=f"http://127.0.0.1:{revoke_at.port}").revoke(login.refresh_token)
    revoke_seconds = time.monotonic() - began
    assert revoked.status_code == 200, revoked.text
    for thread in threads:
        thread.join()
    return Run(revoke_seconds, latencies)


@pytest.mark.parametrize(
    ("database_dsn", "feed"),
    [("sqlite", "poll"), ("postgresql", "notify"), ("postgresql", "poll"), ("postgresql", "redis")],
    indirect=["database_dsn"],
)
def test_a_revocation_reaches_every_worker_of_both_instances_within_a_second(
    oidc_provider: OidcProvider,
    database_dsn: str,
    feed: str,
    echo_downstream: EchoServer,
    tmp_path: Path,
    artifacts_dir: Path,
) -> None:
    extra = {"REVOCATION_FEED": feed}
    if feed == "redis":
        extra["REVOCATION_REDIS_URL"] = REDIS_URL
    with fleet_of(oidc_provider, database_dsn, echo_downstream, tmp_path, **extra) as fleet:
        for instance in fleet.instances:
            # Each worker's listener starts after the worker boots and says so in the log: wait for both (a worker
            # that measured before its listener was up would time the fallback, not the feed).
            deadline = time.monotonic() + 15
            while instance.logs().count(f"revocation feed ({feed}) listening") < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert instance.logs().count(f"revocation feed ({feed}) listening") >= 2, instance.logs()[-3000:]
        pinned = pin_every_worker(fleet.instances, fleet.log_in().access_token)
        runs = [measure_once(fleet, pinned, fleet.instances[index % 2]) for index in range(RUNS)]
        for connection in pinned:
            connection.close()
    workers = {connection.worker for connection in pinned}
    samples = [seconds for run in runs for seconds in run.latencies.values()]
    after = [seconds - run.revoke_seconds for run in runs for seconds in run.latencies.values()]
    report = {
        "database": database_dsn.split(":", 1)[0].split("+", 1)[0],
        "feed": feed,
        "instances": 2,
        "workers_per_instance": 2,
        "runs": RUNS,
        "samples": len(samples),
        "p50_ms": round(statistics.median(samples) * 1000, 1) if samples else None,
        "max_ms": round(max(samples) * 1000, 1) if samples else None,
        # From the /revoke answer (the commit is before it) to each 401: how long the news took to spread.
        "after_revoke_answer_p50_ms": round(statistics.median(after) * 1000, 1) if after else None,
        "after_revoke_answer_max_ms": round(max(after) * 1000, 1) if after else None,
        "revoke_request_p50_ms": round(statistics.median(run.revoke_seconds for run in runs) * 1000, 1),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "latencies_ms": [{str(pid): round(s * 1000, 1) for pid, s in run.latencies.items()} for run in runs],
    }
    (artifacts_dir / f"revocation-latency-{report['database']}-{feed}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    for run in runs:
        assert set(run.latencies) == workers, f"some workers still answered 200 after 3 s: {report}"
    assert max(samples) < BOUND_SECONDS, report


@SQLITE_ONLY
def test_without_the_feed_other_workers_keep_a_revoked_token_for_the_cache_ttl(
    oidc_provider: OidcProvider, database_dsn: str, echo_downstream: EchoServer, tmp_path: Path
) -> None:
    """The control: the same measurement with REVOCATION_FEED=off sees the old bound, so the one above is no
    accident of how the workers were reached."""
    with fleet_of(oidc_provider, database_dsn, echo_downstream, tmp_path, REVOCATION_FEED="off") as fleet:
        pinned = pin_every_worker(fleet.instances, fleet.log_in().access_token)
        run = measure_once(fleet, pinned, fleet.instances[0], watch=1.5)
        for connection in pinned:
            connection.close()
    # The worker that served /revoke forgets at once; the three others hold the cached token past the watch.
    assert len(run.latencies) <= 1, run
