"""MCP session binding: which user opened each `Mcp-Session-Id` on each route, so that nobody else can use it."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import timedelta
from typing import cast

from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from oauthproxy.crypto import hash_token
from oauthproxy.models import McpSession, db, rows_affected, utcnow

log = logging.getLogger(__name__)

#: What the MCP SDK's server answers for a session it does not know (streamable HTTP transport): clients that get
#: it start a new session. Another user's session is, to this user, a session that does not exist.
SESSION_NOT_FOUND = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}
#: How often a worker tells the database that a session it serves is still in use, at most.
TOUCH_INTERVAL = 300.0
CACHE_ENTRIES = 10_000

# Built once, run with parameters: building a statement per call (ORM entity, `.values()`, its cache key) cost more
# than the database's own work, 159 → 63 µs of CPU per recorded session on SQLite (bench/analysis.md).
_SESSIONS = cast(Table, McpSession.__table__)
_RECORD = insert(_SESSIONS)
_OWNER = select(_SESSIONS.c.user_id, _SESSIONS.c.last_seen_at).where(_SESSIONS.c.key_hash == bindparam("key"))
_TOUCH = update(_SESSIONS).where(_SESSIONS.c.key_hash == bindparam("key")).values(last_seen_at=bindparam("seen"))
_FORGET = delete(_SESSIONS).where(_SESSIONS.c.key_hash == bindparam("key"))


def session_key(route_name: str, session_id: str) -> str:
    """The stored key: the id alone never reaches the database (it lets its holder act in the session)."""
    return hash_token(f"{route_name}\n{session_id}")


class SessionBindings:
    """Session owners, in the database (shared by every worker and instance) and in a bounded in-process cache.

    A session seen by this worker costs no query: its owner never changes, and the cache entry says when this worker
    last refreshed the row's `last_seen_at` (once per TOUCH_INTERVAL, an UPDATE that also notices a session ended
    elsewhere). An entry older than the idle timeout is read again, as its row may have been purged.
    """

    def __init__(self, idle_timeout: float, max_entries: int = CACHE_ENTRIES):
        self.idle_timeout, self.max_entries = idle_timeout, max_entries
        self.touch_interval = min(TOUCH_INTERVAL, idle_timeout / 4)
        # (route, session id) → (user id, when this worker last touched the row, monotonic). Keyed by the id itself:
        # memory of this process, and a hash on every request would cost more than the rest of the lookup.
        self._owners: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, key: tuple[str, str]) -> tuple[str, float] | None:
        with self._lock:
            entry = self._owners.get(key)
            if entry is not None:
                self._owners.move_to_end(key)
            return entry

    def _remember(self, key: tuple[str, str], user_id: str, touched: float) -> None:
        with self._lock:
            self._owners[key] = (user_id, touched)
            self._owners.move_to_end(key)
            while len(self._owners) > self.max_entries:
                self._owners.popitem(last=False)

    def _drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._owners.pop(key, None)

    def allows(self, route_name: str, session_id: str, user_id: str) -> bool:
        """Whether `user_id` may use this session on this route: it opened it, and it has not ended.

        An id the proxy never saw a downstream hand out (or one that ended) is refused like another user's: the
        binding holds only if every session in use is one whose opening we recorded.
        """
        key = (route_name, session_id)
        now = time.monotonic()
        entry = self._cached(key)
        if entry is not None and now - entry[1] > self.idle_timeout:
            self._drop(key)
            entry = None
        if entry is None:
            row = db.session.execute(_OWNER, {"key": session_key(route_name, session_id)}).first()
            db.session.rollback()  # end the read transaction now; a stream may outlive this request
            if row is None or row.last_seen_at <= utcnow() - timedelta(seconds=self.idle_timeout):
                return False
            entry = (row.user_id, now - max(0.0, (utcnow() - row.last_seen_at).total_seconds()))
            self._remember(key, *entry)
        if entry[0] != user_id:
            return False
        if now - entry[1] > self.touch_interval:
            touched = rows_affected(
                db.session.execute(_TOUCH, {"key": session_key(route_name, session_id), "seen": utcnow()})
            )
            db.session.commit()
            if not touched:  # ended on another instance (DELETE, a downstream 404) or purged
                self._drop(key)
                return False
            self._remember(key, user_id, now)
        return True

    def record(self, route_name: str, session_id: str, user_id: str) -> None:
        """A downstream handed out this session id in answer to `user_id`: it is theirs from now on."""
        key, key_hash = (route_name, session_id), session_key(route_name, session_id)
        now = utcnow()
        try:
            # One statement in a short transaction of its own, not the ORM session's unit of work (its flush and
            # commit bookkeeping cost more than the insert: bench/analysis.md); nothing else in the request is pending.
            with db.engine.begin() as connection:
                connection.execute(
                    _RECORD,
                    {
                        "key_hash": key_hash,
                        "route": route_name,
                        "user_id": user_id,
                        "created_at": now,
                        "last_seen_at": now,
                    },
                )
        except IntegrityError:
            # Already recorded: the same id answered twice, or a downstream that gives one id to several users.
            # The first owner keeps it; anyone else is refused when they use it.
            owner = db.session.scalar(_OWNER, {"key": key_hash})
            db.session.rollback()
            if owner is not None and owner != user_id:
                log.warning(
                    "downstream %s handed a session id already bound to another user; it stays theirs", route_name
                )
            if owner is not None:
                self._remember(key, owner, time.monotonic())
            return
        self._remember(key, user_id, time.monotonic())

    def forget(self, route_name: str, session_id: str) -> None:
        """The session ended (deleted, or the downstream no longer knows it)."""
        self._drop((route_name, session_id))
        with db.engine.begin() as connection:
            connection.execute(_FORGET, {"key": session_key(route_name, session_id)})

    def observe(
        self, route_name: str, method: str, sent: str | None, answered: str | None, status: int, user_id: str
    ) -> None:
        """After the downstream's answer: record a session it opened, forget one it ended."""
        if sent is not None and (status == 404 or (method == "DELETE" and 200 <= status < 300)):
            self.forget(route_name, sent)  # MCP transport: 404 means the session is gone; DELETE ends it
        elif answered is not None and answered != sent and status < 400:
            self.record(route_name, answered, user_id)
