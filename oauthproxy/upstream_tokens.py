"""The user's upstream access token for a grant, refreshed before use, one refresh at a time per grant everywhere."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import Flask
from sqlalchemy import Connection, select, update

from oauthproxy.crypto import DecryptionError, UnknownKeyError
from oauthproxy.models import Grant, db, utcnow
from oauthproxy.upstream import UpstreamError, UpstreamProvider

log = logging.getLogger(__name__)

GRANTS = Grant.__table__


class LoginRequired(Exception):
    """The grant can no longer reach the provider (revoked, or the upstream refresh token is dead): sign in again."""


class UnreadableGrant(LoginRequired):
    """The grant's sealed upstream secret can never be opened (tampered, or moved from another row)."""


class UpstreamUnavailable(Exception):
    """The provider could not refresh the token right now; the grant is kept and the client should retry."""

    def __init__(self, description: str, retry_after: int = 10):
        super().__init__(description)
        self.retry_after = retry_after


@dataclass(frozen=True)
class UpstreamAccess:
    access_token: str | None
    expires_at: datetime | None  # naive UTC; None when the provider gave no lifetime

    def needs_refresh(self, skew: int, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow()) + timedelta(seconds=skew)


class KeyedLocks:
    """One lock per key, created on demand and dropped when unused. Under gevent these locks are cooperative.

    Only the first caller for a grant goes on to the database lock; the others wait here without holding a
    database connection, then find the token already refreshed.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: int) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


@contextmanager
def _grant_row_lock(grant_id: int) -> Iterator[tuple[Connection, dict | None]]:
    """A transaction holding the grant's row lock across workers and instances; yields the freshly read row.

    PostgreSQL: `SELECT ... FOR UPDATE` locks only this grant's row. SQLite has no row locks: `BEGIN IMMEDIATE`
    takes the database's write lock (readers are not blocked; other writers wait up to the busy timeout).
    """
    engine = db.engine
    with engine.connect() as connection:
        statement = select(GRANTS).where(GRANTS.c.id == grant_id)
        if engine.dialect.name == "sqlite":
            # pysqlite begins transactions lazily, and only as DEFERRED; ask for the write lock up front.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            statement = statement.with_for_update()
        try:
            row = connection.execute(statement).mappings().first()
            yield connection, dict(row) if row is not None else None
        except BaseException:
            connection.rollback()
            raise
        connection.commit()


def open_grant_secret(app: Flask, grant_id: int, column: str, sealed: str) -> str:
    """A grant's sealed upstream secret in clear; logs which grant when it cannot be opened (never the value).

    Raises `UpstreamUnavailable` when the key that sealed it is not configured here: an operator's fix (a key
    dropped from ENCRYPTION_KEY, or an instance not yet given a new key during a rolling change); the grant is
    kept because another instance, or this one once fixed, can read it. Raises `UnreadableGrant` when no key
    can ever open it (tampered, or a ciphertext moved from another row): the caller revokes the grant so the
    client signs in again instead of failing on every request.
    """
    try:
        return app.extensions["secret_box"].decrypt(sealed, f"grant:{grant_id}:{column}")
    except UnknownKeyError as error:
        log.error("grant %s: cannot decrypt its %s: %s", grant_id, column, error)
        raise UpstreamUnavailable("the server cannot read this sign-in's stored credentials right now (an "
                                  "encryption key is missing); retry later", retry_after=60) from None
    except DecryptionError as error:
        log.error("grant %s: its %s can never be decrypted (%s); the grant is revoked", grant_id, column, error)
        raise UnreadableGrant("this sign-in's stored credentials cannot be read") from None


def revoke_unreadable_grant(grant_id: int) -> None:
    """End a grant whose secrets cannot be read, so its refresh tokens fail too and the client signs in again."""
    from oauthproxy.authorization_server import revoke_grant

    revoke_grant(grant_id, "undecryptable")
    db.session.commit()


def _access_from_row(app: Flask, row: dict) -> UpstreamAccess:
    sealed = row["upstream_access_token"]
    token = open_grant_secret(app, row["id"], "upstream_access_token", sealed) if sealed else None
    return UpstreamAccess(token, row["upstream_expires_at"])


def refresh_upstream_access(app: Flask, grant_id: int, skew: int) -> UpstreamAccess:
    """Return a usable upstream access token for the grant, refreshing it first when it expires within `skew`.

    Providers rotate refresh tokens: two concurrent refreshes with one refresh token would burn the grant. So
    an in-process lock per grant serialises this worker's requests, the row lock serialises workers and
    instances, and whoever gets the lock second re-reads the row and finds the work already done.
    Raises `LoginRequired` (`UnreadableGrant`: the caller revokes the grant, outside the row lock) or
    `UpstreamUnavailable`.
    """
    locks: KeyedLocks = app.extensions["upstream_refresh_locks"]
    upstream: UpstreamProvider = app.extensions["upstream"]
    box = app.extensions["secret_box"]
    with locks.hold(grant_id):
        dead_reason: str | None = None
        with _grant_row_lock(grant_id) as (connection, row):
            if row is None or row["revoked_at"] is not None:
                raise LoginRequired("the sign-in was revoked")
            current = _access_from_row(app, row)
            if not current.needs_refresh(skew):
                return current  # another request, worker or instance refreshed it while we waited
            sealed_refresh = row["upstream_refresh_token"]
            if not sealed_refresh:
                if current.expires_at is not None and current.expires_at > utcnow():
                    return current  # still valid for a few seconds; nothing to refresh it with
                dead_reason = "upstream_token_expired"
            else:
                refresh_token = open_grant_secret(app, grant_id, "upstream_refresh_token", sealed_refresh)
                try:
                    tokens = upstream.refresh_upstream_token(refresh_token, upstream.upstream_scopes(
                        (row["scope"] or "").split()))
                except UpstreamError as error:
                    if error.kind in ("invalid_grant", "access_denied"):
                        log.info("upstream refresh for grant %s refused (%s): %s", grant_id, error.kind,
                                 error.description)
                        dead_reason = "upstream_invalid_grant"
                    else:
                        log.warning("upstream refresh for grant %s failed (%s): %s", grant_id, error.kind,
                                    error.description)
                        raise UpstreamUnavailable("the identity provider could not refresh the sign-in; retry "
                                                  "shortly", retry_after=10 if error.kind == "transient" else 60
                                                  ) from None
                else:
                    values: dict = {
                        "upstream_access_token": box.encrypt(tokens.access_token,
                                                             f"grant:{grant_id}:upstream_access_token"),
                        "upstream_expires_at": tokens.expires_at,
                    }
                    if tokens.refresh_token and tokens.refresh_token != refresh_token:
                        values["upstream_refresh_token"] = box.encrypt(tokens.refresh_token,
                                                                       f"grant:{grant_id}:upstream_refresh_token")
                    connection.execute(update(GRANTS).where(GRANTS.c.id == grant_id).values(**values))
                    log.info("refreshed the upstream token of grant %s", grant_id)
                    return UpstreamAccess(tokens.access_token, tokens.expires_at)
    # Outside the row lock (on SQLite it is the database write lock): end the grant so the client's refresh
    # fails too and it goes back to a full sign-in, instead of looping on tokens whose upstream side is dead.
    from oauthproxy.authorization_server import revoke_grant

    revoke_grant(grant_id, dead_reason or "upstream_invalid_grant")
    db.session.commit()
    raise LoginRequired("the sign-in at the identity provider has expired")
