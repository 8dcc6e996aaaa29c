"""The revocation feed: a grant revoked anywhere leaves every worker's token cache, on every instance, within a second.

Announcing: whatever revokes a grant calls `revoked_in_transaction(grant_ids)` before its commit (`revoke_grant`
does), or `announce_revoked(grant_ids)` after it. At the commit, in the same transaction, each grant gets a row in
the `revocations` table and, on PostgreSQL, a `NOTIFY`: both take effect with the revocation or not at all. After
the commit this worker forgets the grants at once and, with the "redis" feed, publishes them.

Listening: one listener per worker process (a thread; a greenlet under gunicorn's gevent worker), started after the
fork (gunicorn.conf.py's post_worker_init, or the first token validated in a process started through wsgi.py).
It forgets each announced grant in this worker's `TokenCache`, so the per-request path stays a dict lookup:
- "notify" (PostgreSQL's default): `LISTEN` on a connection of its own; notifications arrive as the revoking
  transaction commits.
- "poll" (SQLite's default, and anywhere LISTEN cannot work, e.g. behind a transaction-pooling PgBouncer): reads
  the rows past the last id it saw every 250 ms, one indexed query.
- "redis": Redis pub/sub (`REVOCATION_REDIS_URL`).
While a listener is disconnected its worker falls back to the bound there was before: a cached token is trusted
for at most TOKEN_CACHE_TTL seconds (logged, and `oauthproxy_revocation_feed_connected` is 0). When it connects
again it flushes the whole cache, since announcements may have passed unheard.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app
from sqlalchemy import Engine, delete, event, func, insert, or_, select
from sqlalchemy.orm import Session

from oauthproxy import metrics
from oauthproxy.clock import database_now
from oauthproxy.components import components
from oauthproxy.models import Revocation, db

if TYPE_CHECKING:
    import redis

    from oauthproxy.resource_server import TokenCache

log = logging.getLogger(__name__)

#: PostgreSQL's channel; channels are per database, so no other deployment hears it.
CHANNEL = "oauthproxy_revocations"
POLL_INTERVAL = 0.25
#: A listener that heard nothing for this long proves its connection alive (a vanished peer says nothing).
HEARTBEAT_SECONDS = 5.0
#: Rows older than this are deleted by the next announcement: pollers read them within a poll or two, and a
#: poller that cannot read for longer flushes its cache when it can again.
RETENTION_SECONDS = 600
#: PostgreSQL hands out ids when rows are inserted, and transactions commit in any order: id 7 may become visible
#: after 8. A poller looks for a skipped id again for this long (more than any revoking transaction lasts; a
#: rolled-back insert leaves its id unused for ever).
GAP_WAIT_SECONDS = 30.0
#: More gaps than this and the poller treats the feed as missed: it flushes its cache and starts afresh.
MAX_GAPS = 200
#: Rows read per poll; more wait for the next one.
BATCH_ROWS = 1000
#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
NOTIFY_PAYLOAD_BYTES = 7000
BACKOFF_FIRST, BACKOFF_MOST = 0.25, 10.0
#: Redis waits: connecting, and each command of the publisher (after the commit: the request waits that long).
REDIS_TIMEOUT = 2.0
_PENDING = "oauthproxy.revoked_grants"


# -- announcing -----------------------------------------------------------------------------------


def revoked_in_transaction(grant_ids: Iterable[int]) -> None:
    """Announce these grants as revoked when the current transaction commits (nothing if it rolls back)."""
    db.session.connection()  # begins the transaction if none is open: its end, either way, settles the announcement
    pending: set[int] = db.session.info.setdefault(_PENDING, set())
    pending.update(int(grant_id) for grant_id in grant_ids)


def announce_revoked(grant_ids: Iterable[int]) -> None:
    """Tell every worker of every instance that these grants are revoked: for code that revoked them in a
    transaction it has committed. Commits a short transaction of its own (the announcement's rows)."""
    revoked_in_transaction(grant_ids)
    db.session.commit()


def notify_payloads(grant_ids: Sequence[int], limit: int = NOTIFY_PAYLOAD_BYTES) -> list[str]:
    """The grant ids as comma-separated text, in as few payloads of at most `limit` bytes as they fit."""
    payloads: list[str] = []
    current = ""
    for grant_id in grant_ids:
        item = str(grant_id)
        if current and len(current) + 1 + len(item) > limit:
            payloads.append(current)
            current = ""
        current = f"{current},{item}" if current else item
    if current:
        payloads.append(current)
    return payloads


def parse_payload(payload: str | bytes) -> list[int]:
    """Grant ids from a payload; anything that is not a positive id is ignored (never trusted further)."""
    if isinstance(payload, bytes):
        payload = payload.decode("ascii", "replace")
    return [int(part) for part in payload.split(",") if part.isascii() and part.isdigit() and len(part) <= 18]


@event.listens_for(db.session, "before_commit")
def _write_announcements(session: Session) -> None:
    grant_ids = sorted(session.info.get(_PENDING, ()))
    if not grant_ids:
        return
    # Rows written as they are (not objects of the session), stamped by the database's clock.
    session.execute(insert(Revocation).values(revoked_at=database_now()), [{"grant_id": i} for i in grant_ids])
    session.execute(delete(Revocation).where(Revocation.revoked_at < database_now(-RETENTION_SECONDS)))
    if session.get_bind().dialect.name == "postgresql":
        for payload in notify_payloads(grant_ids):
            session.execute(select(func.pg_notify(CHANNEL, payload)))  # delivered when (if) this commits


@event.listens_for(db.session, "after_commit")
def _announced(session: Session) -> None:
    grant_ids = session.info.pop(_PENDING, None)
    if grant_ids:
        feed: RevocationFeed | None = getattr(components(current_app), "revocation_feed", None)
        if feed is not None:
            feed.committed(grant_ids)


@event.listens_for(db.session, "after_transaction_end")
def _discard_announcements(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the outermost transaction ended without a commit (or after it)
        session.info.pop(_PENDING, None)


# -- what a poller has seen -----------------------------------------------------------------------


class MissedAnnouncements(Exception):
    """The feed cannot tell what it missed: the listener reconnects, which flushes the cache."""


class RevocationCursor:
    """Which rows of the `revocations` table a poller has applied: every id up to `last_seen` except the `gaps`,
    ids skipped so far (an insert not yet committed, or rolled back), each looked for until its deadline."""

    def __init__(self, last_seen: int):
        self.last_seen = last_seen
        self.gaps: dict[int, float] = {}

    def advance(self, rows: Iterable[tuple[int, int]], now: float) -> list[int]:
        """Take the rows `(id, grant_id)` of one poll, in id order; return the grant ids not applied before."""
        fresh: list[int] = []
        for row_id, grant_id in rows:
            if row_id > self.last_seen:
                if row_id - self.last_seen - 1 + len(self.gaps) > MAX_GAPS:
                    raise MissedAnnouncements(f"{row_id - self.last_seen - 1} revocation ids skipped at once")
                for missing in range(self.last_seen + 1, row_id):
                    self.gaps[missing] = now + GAP_WAIT_SECONDS
                self.last_seen = row_id
                fresh.append(grant_id)
            elif self.gaps.pop(row_id, None) is not None:
                fresh.append(grant_id)
        for row_id, deadline in list(self.gaps.items()):
            if deadline <= now:
                del self.gaps[row_id]
        return fresh


# -- listening ------------------------------------------------------------------------------------


Subscription = Callable[[threading.Event], Generator[list[int], None, None]]


def _poll(engine: Engine) -> Subscription:
    def subscribe(stopped: threading.Event) -> Generator[list[int], None, None]:
        with engine.connect() as connection:
            cursor = RevocationCursor(connection.scalar(select(func.max(Revocation.id))) or 0)
        yield []
        while not stopped.wait(POLL_INTERVAL):
            query = (
                select(Revocation.id, Revocation.grant_id)
                .where(or_(Revocation.id > cursor.last_seen, Revocation.id.in_(sorted(cursor.gaps))))
                .order_by(Revocation.id)
                .limit(BATCH_ROWS)
            )
            with engine.connect() as connection:
                rows = connection.execute(query).all()
            yield cursor.advance([(row.id, row.grant_id) for row in rows], time.monotonic())

    return subscribe


def _listener_connection(engine: Engine, timeout: int) -> Any:
    """A PostgreSQL connection of its own, with the engine's address and TCP settings: it listens as long as the
    worker lives. Every wait but a listen ends within `timeout` + 1 s, closing the connection, as the pool's do
    (database_faults): a frozen server never enforces statement_timeout."""
    import psycopg
    from psycopg import errors

    bound = timeout + 1.0

    class ListenerConnection(psycopg.Connection):
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            if timeout is not None:  # notifies(): how long to listen; running out is its normal end
                return super().wait(gen, interval, timeout)
            try:
                return super().wait(gen, interval, bound)
            except errors._WaitTimeout:
                self.pgconn.finish()
                raise psycopg.OperationalError(f"the database did not answer within {bound:g} s") from None

    from oauthproxy.database_faults import engine_options

    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    cparams.pop("context", None)
    cparams.update(engine_options("postgresql:", timeout)["connect_args"])
    return ListenerConnection.connect(*cargs, autocommit=True, **cparams)


def _notify(engine: Engine, timeout: int) -> Subscription:
    def subscribe(stopped: threading.Event) -> Generator[list[int], None, None]:
        connection = _listener_connection(engine, timeout)
        try:
            connection.execute(f"LISTEN {CHANNEL}")
            yield []
            quiet_since = time.monotonic()
            while not stopped.is_set():
                heard = False
                for notification in connection.notifies(timeout=1.0):
                    heard = True
                    yield parse_payload(notification.payload)
                if heard:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= HEARTBEAT_SECONDS:
                    connection.execute("SELECT 1")  # a server that went away answers nothing, or an error
                    quiet_since = time.monotonic()
                yield []
        finally:
            connection.close()

    return subscribe


def _redis(url: str, channel: str) -> Subscription:
    def subscribe(stopped: threading.Event) -> Generator[list[int], None, None]:
        import redis

        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=HEARTBEAT_SECONDS * 2,
            health_check_interval=HEARTBEAT_SECONDS,  # a PING on the idle subscription, answered or it fails
        )
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(channel)
            confirmed = pubsub.get_message(timeout=REDIS_TIMEOUT)
            if not confirmed or confirmed.get("type") != "subscribe":
                raise MissedAnnouncements("Redis did not confirm the subscription")
            yield []
            while not stopped.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message and message.get("type") == "message":
                    yield parse_payload(message["data"])
                else:
                    yield []
        finally:
            pubsub.close()
            client.close()

    return subscribe


def redis_channel(issuer: str) -> str:
    """One channel per deployment (instances share PUBLIC_URL), so deployments sharing a Redis do not mix."""
    return "oauthproxy:revocations:" + hashlib.sha256(issuer.encode()).hexdigest()[:16]


def _describe(error: BaseException) -> str:
    """The error's first line, short: driver messages name hosts and ports, never passwords."""
    text = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class RevocationFeed:
    """This application's feed: what it announces after a commit, and this process's listener."""

    def __init__(
        self, mode: str, cache: TokenCache, subscription: Subscription | None, redis_url: str | None, channel: str
    ):
        self.mode, self.cache, self.channel = mode, cache, channel
        self._subscription, self._redis_url = subscription, redis_url
        self._publisher: redis.Redis | None = None
        self._start_lock = threading.Lock()
        self._pid: int | None = None  # the process whose listener runs (a forked child starts its own)
        self._stopped = threading.Event()
        #: Set by wsgi.py: the first token validated in a process starts its listener (servers other than gunicorn).
        self.autostart = False
        self.connected = False
        self._outage_since: float | None = None

    # -- announcing

    def committed(self, grant_ids: set[int]) -> None:
        """After a commit that revoked these grants: this worker forgets them now (its own listener will hear of
        them too, a little later), and the "redis" feed publishes them."""
        self.cache.forget_grants(grant_ids)
        if self._redis_url is None:
            return
        try:
            publisher = self._redis_publisher()
            for payload in notify_payloads(sorted(grant_ids)):
                publisher.publish(self.channel, payload)
        except Exception as error:  # redis.RedisError, OSError: never fail the request that revoked
            metrics.REVOCATION_PUBLISH_FAILURES.inc()
            log.warning(
                "could not publish the revocation of grant(s) %s to Redis (%s): other workers refuse their tokens "
                "within TOKEN_CACHE_TTL instead",
                ", ".join(map(str, sorted(grant_ids))),
                _describe(error),
            )

    def _redis_publisher(self) -> redis.Redis:
        if self._publisher is None:
            import redis

            assert self._redis_url is not None
            self._publisher = redis.Redis.from_url(
                self._redis_url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
            )
        return self._publisher

    # -- listening

    def listen(self) -> None:
        """Start this process's listener, unless it runs already (idempotent; a forked child starts its own)."""
        if self._subscription is None or self.cache.ttl <= 0 or self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stopped = threading.Event()
            self.connected = False
            threading.Thread(target=self._run, args=(self._stopped,), name="revocation-feed", daemon=True).start()

    def listen_on_first_use(self) -> None:
        """On a cache miss: start the listener when wsgi.py asked for it and it is not running in this process."""
        if self.autostart and self._pid != os.getpid():
            self.listen()

    def stop(self) -> None:
        """End this process's listener (within about a second)."""
        self._stopped.set()
        self._pid = None

    def probe(self) -> str | None:
        """Subscribe once and leave (for `oauthproxy check`): None when it works, else what went wrong."""
        if self._subscription is None:
            return None
        subscription = self._subscription(threading.Event())
        try:
            next(subscription)
        except Exception as error:
            return _describe(error)
        finally:
            subscription.close()
        return None

    def _run(self, stopped: threading.Event) -> None:
        assert self._subscription is not None
        delay = BACKOFF_FIRST
        while not stopped.is_set():
            subscription = self._subscription(stopped)
            try:
                for grant_ids in subscription:
                    if not self.connected:
                        self._connected()
                        delay = BACKOFF_FIRST
                    if grant_ids:
                        self.cache.forget_grants(grant_ids)
                    if stopped.is_set():
                        break
            except Exception as error:  # the database or Redis went away, or answered oddly: reconnect
                self._lost(error)
            else:
                if not stopped.is_set():
                    self._lost(MissedAnnouncements("the subscription ended"))
            finally:
                with contextlib.suppress(Exception):  # a connection already broken may complain as it closes
                    subscription.close()  # its connection, now rather than when collected
            stopped.wait(delay * random.uniform(0.8, 1.2))  # noqa: S311 (jitter, not a secret)
            delay = min(delay * 2, BACKOFF_MOST)
        self._disconnected()

    def _connected(self) -> None:
        # Announcements made before this moment went unheard here: whatever was cached may have been revoked since.
        self.cache.clear()
        self.connected = True
        metrics.REVOCATION_FEED_CONNECTED.set(1)
        if self._outage_since is None:
            log.info("revocation feed (%s) listening in process %s", self.mode, os.getpid())
        else:
            log.warning(
                "revocation feed (%s) back after %.1f s; token cache flushed",
                self.mode,
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None

    def _lost(self, error: BaseException) -> None:
        was_connected = self._disconnected()
        if was_connected or self._outage_since is None:
            metrics.REVOCATION_FEED_OUTAGES.inc()
            log.warning(
                "revocation feed (%s) %s: %s; until it is back, a token revoked elsewhere keeps working in this "
                "worker for up to TOKEN_CACHE_TTL (%s s)",
                self.mode,
                "lost" if was_connected else "cannot connect",
                _describe(error),
                self.cache.ttl,
            )
            self._outage_since = time.monotonic()
        else:
            log.debug("revocation feed (%s) still down: %s", self.mode, _describe(error))

    def _disconnected(self) -> bool:
        was_connected, self.connected = self.connected, False
        if was_connected:
            metrics.REVOCATION_FEED_CONNECTED.set(0)
        return was_connected


def init_revocation_feed(app: Flask) -> RevocationFeed:
    """Build the application's feed (its listener starts later, in each worker process)."""
    settings = app.config["SETTINGS"]
    services = components(app)
    with app.app_context():
        engine = db.engine
    subscription: Subscription | None = None
    if settings.revocation_feed == "notify":
        subscription = _notify(engine, settings.database_timeout)
    elif settings.revocation_feed == "poll":
        subscription = _poll(engine)
    elif settings.revocation_feed == "redis":
        subscription = _redis(settings.revocation_redis_url, redis_channel(settings.issuer))
    services.revocation_feed = RevocationFeed(
        settings.revocation_feed,
        services.token_cache,
        subscription,
        settings.revocation_redis_url,
        redis_channel(settings.issuer),
    )
    return services.revocation_feed


def listen(app: Any) -> None:
    """Start this worker's listener (gunicorn.conf.py, after the fork); anything but our application is left alone."""
    if isinstance(app, Flask) and "oauthproxy" in app.extensions:
        feed: RevocationFeed | None = getattr(components(app), "revocation_feed", None)
        if feed is not None:
            feed.listen()


def listen_when_serving(app: Flask) -> None:
    """wsgi.py: in whichever process serves requests, the first token validated starts the listener (flask run,
    any WSGI server; gunicorn.conf.py starts it before the first request)."""
    components(app).revocation_feed.autostart = True
