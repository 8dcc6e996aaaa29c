"""Database trouble, bounded and answered: every wait on the database ends within DATABASE_TIMEOUT, then a JSON 503."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Self, TypeVar

from flask import Flask, Response, request
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError, InterfaceError, InternalError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from oauthproxy.errors import json_error

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that say the database is away, hung, full, read-only or locked: worth a retry later, not a bug.
#: (PostgreSQL's read-only transaction is an InternalError; SQLite's full disk and read-only file, OperationalErrors.)
UNAVAILABLE = (OperationalError, InterfaceError, InternalError, PoolTimeoutError, DisconnectionError)
RETRY_AFTER_SECONDS = 5
#: SQLite's primary result codes for "another connection holds the lock" (the low byte of extended codes).
_SQLITE_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
_LONGEST_PAUSE = 0.05

#: Set while migrations run: a schema change may legitimately take longer than a request may wait.
_unbounded: ContextVar[bool] = ContextVar("oauthproxy_database_unbounded", default=False)


@contextmanager
def unbounded_waits() -> Iterator[None]:
    """Connections opened inside have no statement timeout (for `db upgrade`: an index build may take minutes)."""
    token = _unbounded.set(True)
    try:
        yield
    finally:
        _unbounded.reset(token)


# -- SQLite: wait for the write lock cooperatively -------------------------------------------------


def _is_busy(error: sqlite3.OperationalError) -> bool:
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_BUSY_CODES


def _retry_while_busy(call: Callable[[], T], bound: float) -> T:
    """`call()`, again while SQLite says another connection holds the lock, for at most `bound` seconds.

    SQLite's own busy timeout waits inside a C call, which under gevent stops every greenlet of the worker (its
    streams, /healthz) for as long as it waits. Here the connection's busy timeout is 0 and the wait is
    `time.sleep`, which gevent's worker has patched: the other greenlets run meanwhile.
    """
    deadline = time.monotonic() + bound
    pause = 0.001
    while True:
        try:
            return call()
        except sqlite3.OperationalError as error:
            if not _is_busy(error) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, _LONGEST_PAUSE)


class CooperativeCursor(sqlite3.Cursor):
    """Retrying a statement that found the database locked is safe: it did nothing. With pysqlite's default
    (deferred) transactions, the first write of a transaction is where the write lock is taken, and reads before it
    ran outside the transaction, so no stale snapshot is kept across the wait."""

    connection: CooperativeConnection

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        return _retry_while_busy(lambda: sqlite3.Cursor.execute(self, sql, parameters), self.connection.lock_wait)

    def executemany(self, sql: str, parameters: Any, /) -> Self:
        rows = list(parameters)  # an iterator could not be replayed
        return _retry_while_busy(lambda: sqlite3.Cursor.executemany(self, sql, rows), self.connection.lock_wait)


class CooperativeConnection(sqlite3.Connection):
    lock_wait = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._use_write_ahead_log()

    def _use_write_ahead_log(self) -> None:
        """WAL with synchronous=NORMAL: a commit appends to the log and returns without an fsync (measured on this
        kind of disk: 10 ms per commit in the default rollback journal, 0.03 ms here), and readers never wait for
        the writer. Still atomic and consistent after a crash of the process or the machine; a power cut may lose
        the last commits, never corrupt. The mode is a property of the file, kept once set; an in-memory database
        has no log, and a file we may not write keeps the mode it has."""
        if self.execute("PRAGMA journal_mode").fetchone()[0] == "memory":
            return
        try:
            _retry_while_busy(lambda: self.execute("PRAGMA journal_mode=WAL"), self.lock_wait)
        except sqlite3.OperationalError as error:
            log.debug("SQLite stays in its journal mode: %s", error)
        self.execute("PRAGMA synchronous=NORMAL")

    def cursor(self, factory: Any = CooperativeCursor) -> Any:
        return super().cursor(factory)

    def commit(self) -> None:
        # In rollback-journal mode COMMIT waits for readers to finish; SQLite keeps the transaction open when it
        # answers BUSY, so the commit can be tried again.
        _retry_while_busy(super().commit, self.lock_wait)


def _sqlite_connection_class(bound: float) -> type[CooperativeConnection]:
    return type("CooperativeConnection", (CooperativeConnection,), {"lock_wait": float(bound)})


# -- PostgreSQL: a client-side bound too -----------------------------------------------------------


def _bounded_psycopg_class(bound: float) -> type[psycopg.Connection]:
    """A psycopg connection whose every wait for the server ends after `bound` seconds.

    statement_timeout is enforced by the server: a server that is frozen (SIGSTOP, a hung host whose kernel still
    acknowledges packets) never enforces it, and TCP keepalives and tcp_user_timeout see nothing wrong either. So
    the client gives up itself, and closes the connection, which is mid-protocol and cannot be used again.
    """
    import psycopg
    from psycopg import errors

    class BoundedConnection(psycopg.Connection):
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            try:
                return super().wait(gen, interval, timeout if timeout is not None else bound)
            except errors._WaitTimeout:
                self.pgconn.finish()  # never returned to the pool: SQLAlchemy sees it closed and discards it
                raise psycopg.OperationalError(f"the database did not answer within {bound:g} s") from None

    return BoundedConnection


def _in_memory_sqlite(dsn: str) -> bool:
    return dsn.rstrip("/") == "sqlite:" or ":memory:" in dsn or "mode=memory" in dsn


def engine_options(dsn: str, timeout: int) -> dict:
    """SQLAlchemy engine options that bound every wait on the database to about `timeout` seconds."""
    if dsn.startswith("sqlite:"):
        # timeout=0: SQLite's busy timeout would wait inside a C call; CooperativeConnection waits instead.
        options: dict = {
            "pool_pre_ping": True,
            "connect_args": {"timeout": 0, "factory": _sqlite_connection_class(timeout)},
        }
        if not _in_memory_sqlite(dsn):
            options["pool_timeout"] = timeout  # an in-memory database has a single-connection pool, no queue
        return options
    return {
        "pool_pre_ping": True,
        "pool_timeout": timeout,  # waiting for a free pooled connection
        "connect_args": {
            "connect_timeout": timeout,  # libpq: the whole connection set-up, client-side
            # A peer that vanished (host down, packets dropped): noticed on an idle pooled connection by keepalives,
            # and on a connection with unacknowledged data after tcp_user_timeout.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": timeout * 1000,
        },
    }


def install_database_bounds(app: Flask, timeout: int) -> None:
    """Per engine: PostgreSQL connections get server-side statement and lock timeouts and the client-side bound."""
    from oauthproxy.models import db

    with app.app_context():
        engine = db.engine
    if engine.dialect.name != "postgresql":
        return
    # The server cancels first (a clean error, the connection stays usable); the client's bound is the backstop.
    bounded = _bounded_psycopg_class(timeout + 1.0)

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, record: Any, cargs: tuple, cparams: dict) -> Any:
        if _unbounded.get():
            return None  # the default connect: no bounds for migrations
        milliseconds = timeout * 1000
        cparams["options"] = " ".join(
            filter(
                None,
                (
                    cparams.get("options"),
                    f"-c statement_timeout={milliseconds}",
                    f"-c lock_timeout={milliseconds}",
                    f"-c idle_in_transaction_session_timeout={milliseconds * 6}",
                ),
            )
        )
        return bounded.connect(*cargs, **cparams)


# -- the answer ------------------------------------------------------------------------------------


def database_unavailable(error: SQLAlchemyError) -> Response:
    """Any request that met database trouble: 503 with Retry-After, in OAuth's error format (RFC 6749 §4.1.2.1's
    temporarily_unavailable). MCP clients treat a failed refresh other than 503 as "sign in again"."""
    from oauthproxy.models import db

    try:
        db.session.rollback()
    except SQLAlchemyError:
        pass
    detail = str(getattr(error, "orig", None) or error).splitlines()[0][:200]  # the driver's message, no SQL or values
    log.warning("database unavailable during %s %s: %s: %s", request.method, request.path, type(error).__name__, detail)
    return json_error(
        503,
        "temporarily_unavailable",
        "the database is unavailable; retry after the Retry-After delay",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def init_database_faults(app: Flask, timeout: int) -> None:
    install_database_bounds(app, timeout)
    for error_class in UNAVAILABLE:
        app.register_error_handler(error_class, database_unavailable)
