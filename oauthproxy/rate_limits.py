"""Rate limits: per-client-address limits on the endpoints anyone can call without a token, and their counters."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from urllib.parse import unquote, urlsplit

from flask import Flask, Response, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits.storage import Storage

from oauthproxy.config import Settings

log = logging.getLogger(__name__)


class SqliteCounterStorage(Storage):
    """Fixed-window counters in a small SQLite file (`sqlite:///path`), shared by every process that opens it.

    This is how the gevent workers of one instance share one budget without Redis: gunicorn's master names a
    fresh file for them (gunicorn.conf.py). Each count is one atomic UPSERT in autocommit (no transaction is
    held), the file is separate from the application's database, and durability is not wanted (counters
    are disposable), so a write costs tens of microseconds. A lock wait longer than `BUSY_TIMEOUT_MS` is an
    error: Flask-Limiter then counts in this process's memory until the file answers again.
    """

    STORAGE_SCHEME = ["sqlite"]
    BUSY_TIMEOUT_MS = 250
    #: Expired counters are deleted every this many increments (per process).
    PURGE_EVERY = 1000

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: float | str | bool):
        # As SQLAlchemy spells SQLite URLs: sqlite:////absolute/path, sqlite:///relative/path.
        path = unquote(urlsplit(uri or "").path)[1:]
        if not path or path.endswith("/"):
            raise ValueError(
                f"a sqlite rate-limit storage URI names a file, e.g. sqlite:////run/oauthproxy/rl.db; got {uri!r}"
            )
        self.path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._increments = 0
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    def _db(self) -> sqlite3.Connection:
        # One connection per process: a connection must not cross a fork (the master may have made one).
        if self._connection is None or self._pid != os.getpid():
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self.BUSY_TIMEOUT_MS / 1000
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=OFF")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS counters "
                "(key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires_at REAL NOT NULL)"
            )
            self._connection, self._pid = connection, os.getpid()
        return self._connection

    def _execute(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self._lock:  # one statement at a time on this process's connection (greenlets, threads)
            return self._db().execute(sql, parameters).fetchall()

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        # A window that has ended starts again at `amount`; otherwise add to it. One statement: atomic.
        rows = self._execute(
            "INSERT INTO counters (key, count, expires_at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
            "count = CASE WHEN counters.expires_at <= ? THEN excluded.count ELSE counters.count + excluded.count END, "
            "expires_at = CASE WHEN counters.expires_at <= ? THEN excluded.expires_at ELSE counters.expires_at END "
            "RETURNING count",
            (key, amount, now + expiry, now, now),
        )
        self._increments += 1
        if self._increments % self.PURGE_EVERY == 0:
            self._execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
        return int(rows[0][0])

    def get(self, key: str) -> int:
        rows = self._execute("SELECT count FROM counters WHERE key = ? AND expires_at > ?", (key, time.time()))
        return int(rows[0][0]) if rows else 0

    def get_expiry(self, key: str) -> float:
        rows = self._execute("SELECT expires_at FROM counters WHERE key = ? AND expires_at > ?", (key, time.time()))
        return float(rows[0][0]) if rows else time.time()

    def check(self) -> bool:
        try:
            self._execute("SELECT 1")
        except sqlite3.Error:
            return False
        return True

    def reset(self) -> int | None:
        return len(self._execute("DELETE FROM counters RETURNING key"))

    def clear(self, key: str) -> None:
        self._execute("DELETE FROM counters WHERE key = ?", (key,))


def is_preflight() -> bool:
    return request.method == "OPTIONS"


def init_rate_limits(app: Flask, settings: Settings) -> Limiter:
    """One limiter per application, so storage (memory, a file shared by one instance's workers, or Redis shared
    by instances) is never shared by accident.

    Keyed on the peer address as Werkzeug sees it: X-Forwarded-For counts only through ProxyFix with a
    configured hop count, so a client cannot choose its own key by sending the header.
    """
    # Flask-Limiter's own headers are off: it sends Retry-After on every response of a limited endpoint,
    # successes and 500s included. `rate_limit_headers` below sends them as they are meant.
    # When the shared counters fail (the file, Redis), the limits keep holding per process in memory: one warning,
    # then a check of the storage now and then until it recovers; not a traceback per request, not no limit at all.
    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=settings.rate_limit_storage_uri,
        headers_enabled=False,
        default_limits=[],
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    limits = (
        ("authorization.register", settings.register_rate_limit),
        ("authorization.authorize", settings.authorize_rate_limit),
        ("authorization.submit_consent", settings.authorize_rate_limit),
        ("account.sign_in", settings.authorize_rate_limit),  # each one stores a pending login
        ("connect.connect_page", settings.authorize_rate_limit),  # its key form may try the key at the downstream
        ("authorization.token", settings.token_rate_limit),
        ("authorization.revoke", settings.token_rate_limit),
    )
    for endpoint, limit in limits:
        # Flask-Limiter 4 checks inside the wrapper it returns, so the view must be replaced by it.
        limited_view = limiter.limit(limit, exempt_when=is_preflight)(app.view_functions[endpoint])
        app.view_functions[endpoint] = limited_view  # type: ignore[assignment]  # typed as possibly async; ours is not
    limited = frozenset(endpoint for endpoint, _ in limits)
    # Every other request (each proxied MCP request among them) has no limit: spare it the limiter's bookkeeping
    # (measured in bench/analysis.md, "What changed in the product", item 5).
    limiter.request_filter(lambda: request.endpoint not in limited)
    # The limiter's before_request pass applies default and application-wide limits, of which there are none; the
    # limited views are checked inside their wrappers. Even filtered out, that pass still evaluated an empty list of
    # limits (meta limits, exemption scopes): about 30 µs of every MCP request (bench/analysis.md, 30 November, 17:00).
    app.before_request_funcs[None].remove(limiter._check_request_limit)

    @app.after_request
    def rate_limit_headers(response: Response) -> Response:
        """X-RateLimit-* on the responses of limited endpoints only; Retry-After only with the 429 itself."""
        if request.endpoint not in limited:
            return response  # the MCP hot path: one set lookup
        current = limiter.current_limit
        if current is None:
            return response
        reset_at = int(current.reset_at)
        response.headers["X-RateLimit-Limit"] = str(current.limit.amount)
        response.headers["X-RateLimit-Remaining"] = str(current.remaining)
        response.headers["X-RateLimit-Reset"] = str(reset_at)
        if response.status_code == 429:
            response.headers["Retry-After"] = str(max(1, reset_at - int(time.time())))
        return response

    return limiter
