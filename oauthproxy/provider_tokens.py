"""The login provider's tokens stored with each grant: the access token refreshed before use, one refresh at a time
per grant everywhere (the in-process locks and the database lease that serialise refreshes serve connections too)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from flask import Flask
from sqlalchemy import Table, or_, select, update

from oauthproxy.components import components
from oauthproxy.crypto import DecryptionError, UnknownKeyError
from oauthproxy.models import Grant, db, utcnow
from oauthproxy.providers import OAuthProvider, ProviderError

# The logger name operators know from before this module was renamed: log lines keep naming it.
log = logging.getLogger("oauthproxy.upstream_tokens")

GRANTS = cast(Table, Grant.__table__)


class LoginRequired(Exception):
    """The grant can no longer reach the provider (revoked, or the provider's refresh token is dead): sign in again."""


class UnreadableGrant(LoginRequired):
    """The grant's sealed provider token can never be opened (tampered, or moved from another row)."""


class ProviderUnavailable(Exception):
    """The provider could not refresh the token right now; the grant is kept and the client should retry."""

    def __init__(self, description: str, retry_after: int = 10):
        super().__init__(description)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ProviderAccess:
    access_token: str | None
    expires_at: datetime | None  # naive UTC; None when the provider gave no lifetime

    def needs_refresh(self, skew: int, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow()) + timedelta(seconds=skew)


class KeyedLocks:
    """One lock per key, created on demand and dropped when unused. Under gevent these locks are cooperative.

    Only the first caller for a grant goes on to claim the refresh in the database; the others wait here without
    holding a database connection, then find the token already refreshed.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: Hashable, timeout: float = -1) -> Iterator[None]:
        """Hold the key's lock; raises `TimeoutError` when it is not free within `timeout` seconds (-1: no bound)."""
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            if not lock.acquire(timeout=timeout):
                raise TimeoutError(f"lock {key} still held after {timeout} s")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


_POLL_SECONDS = 0.1


def lease_seconds(provider: OAuthProvider) -> float:
    """A refresh lease outlives any provider call (its HTTP timeout), so it lapses only when its holder died."""
    return 3 * provider.timeout


def wait_seconds(provider: OAuthProvider) -> float:
    """How long a request waits for someone else's refresh before answering 503: one provider call and some."""
    return provider.timeout + 5


@dataclass
class HeldLease:
    """A refresh lease this request holds, and the row as read under it; `finish` stores the new tokens."""

    lease: RefreshLease
    row_id: int
    claim: str
    row: dict = field(repr=False)
    given_back: bool = False

    def finish(self, **values: Any) -> bool:
        """Store `values` and end the lease in one short write; False when it lapsed (nothing was stored)."""
        self.given_back = True
        return self.lease.release(self.row_id, self.claim, **values)


class RefreshLease:
    """A lease on refreshing one row's tokens, kept in two columns of that row (who holds it, until when).

    Taken and given back in short transactions of their own, atomic on both databases, never held across the
    provider call; a lease whose holder died lapses by itself. Grants (the login provider's tokens) and downstream
    connections each have one."""

    def __init__(self, table: Table, claim_column: str, until_column: str):
        self.table = table
        self._id, self._claim, self._until = table.c.id, table.c[claim_column], table.c[until_column]

    def read(self, row_id: int) -> dict | None:
        with db.engine.connect() as connection:
            row = connection.execute(select(self.table).where(self._id == row_id)).mappings().first()
            return dict(row) if row is not None else None

    def claim(self, row_id: int, claim: str, seconds: float) -> bool:
        """Take the lease if nobody holds a live one."""
        now = utcnow()
        with db.engine.begin() as connection:
            taken = connection.execute(
                update(self.table)
                .where(self._id == row_id, or_(self._until.is_(None), self._until <= now))
                .values({self._claim: claim, self._until: now + timedelta(seconds=seconds)})
            )
            return taken.rowcount == 1

    def release(self, row_id: int, claim: str, **values: Any) -> bool:
        """Store `values` and end the lease in one short write, if the lease is still ours; False when it lapsed."""
        with db.engine.begin() as connection:
            done = connection.execute(
                update(self.table)
                .where(self._id == row_id, self._claim == claim)
                .values({self._claim: None, self._until: None, **{self.table.c[k]: v for k, v in values.items()}})
            )
            return done.rowcount == 1

    @contextmanager
    def held(
        self, row_id: int, settled: Callable[[dict | None], None], provider: OAuthProvider, busy: Exception
    ) -> Iterator[HeldLease]:
        """Wait until the row needs no refresh after all (`settled` raises) or the lease is ours, then yield it.

        `settled(row)` raises when the freshly read row needs no refresh (someone else did it while we waited) or
        can have none, and returns when it still needs one; it is asked again under the lease, since the holder
        before us may have just finished. Raises `busy` when the lease stays taken for `wait_seconds(provider)`.
        The lease is given back on the way out, whatever happens, unless `finish` already did."""
        claim = secrets.token_hex(16)
        deadline = time.monotonic() + wait_seconds(provider)
        while True:
            settled(self.read(row_id))
            if self.claim(row_id, claim, lease_seconds(provider)):
                break
            if time.monotonic() >= deadline:
                raise busy
            time.sleep(_POLL_SECONDS)  # gevent's sleep under the worker: the other greenlets run meanwhile
        held: HeldLease | None = None
        try:
            row = self.read(row_id)
            settled(row)
            assert row is not None  # settled raised otherwise
            held = HeldLease(self, row_id, claim, row)
            yield held
        finally:
            if held is None or not held.given_back:
                self.release(row_id, claim)


#: The login provider's refresh of each grant.
GRANT_LEASE = RefreshLease(GRANTS, "upstream_refresh_claim", "upstream_refresh_claimed_until")


def open_grant_secret(app: Flask, grant_id: int, column: str, sealed: str) -> str:
    """A grant's sealed provider token in clear; logs which grant when it cannot be opened (never the value).

    Raises `ProviderUnavailable` when the key that sealed it is not configured here: an operator's fix (a key
    dropped from ENCRYPTION_KEY, or an instance not yet given a new key during a rolling change); the grant is
    kept because another instance, or this one once fixed, can read it. Raises `UnreadableGrant` when no key
    can ever open it (tampered, or a ciphertext moved from another row): the caller revokes the grant so the
    client signs in again instead of failing on every request.
    """
    try:
        return components(app).secret_box.decrypt(sealed, f"grant:{grant_id}:{column}")
    except UnknownKeyError as error:
        log.error("grant %s: cannot decrypt its %s: %s", grant_id, column, error)
        raise ProviderUnavailable(
            "the server cannot read this sign-in's stored credentials right now (an "
            "encryption key is missing); retry later",
            retry_after=60,
        ) from None
    except DecryptionError as error:
        log.error("grant %s: its %s can never be decrypted (%s); the grant is revoked", grant_id, column, error)
        raise UnreadableGrant("this sign-in's stored credentials cannot be read") from None


def revoke_unreadable_grant(grant_id: int) -> None:
    """End a grant whose secrets cannot be read, so its refresh tokens fail too and the client signs in again."""
    from oauthproxy.authorization_server import revoke_grant

    revoke_grant(grant_id, "undecryptable")
    db.session.commit()


def _access_from_row(app: Flask, row: dict) -> ProviderAccess:
    sealed = row["upstream_access_token"]
    token = open_grant_secret(app, row["id"], "upstream_access_token", sealed) if sealed else None
    return ProviderAccess(token, row["upstream_expires_at"])


class _Done(Exception):
    """The row needs no refresh (or cannot have one); carries the answer."""

    def __init__(self, access: ProviderAccess | None = None, dead_reason: str | None = None):
        self.access, self.dead_reason = access, dead_reason


def _settled(app: Flask, row: dict | None, skew: int) -> None:
    """Raise `_Done` or `LoginRequired` when the freshly read row needs no refresh; return when it does."""
    if row is None or row["revoked_at"] is not None:
        raise LoginRequired("the sign-in was revoked")
    current = _access_from_row(app, row)
    if not current.needs_refresh(skew):
        raise _Done(current)  # another request, worker or instance refreshed it while we waited
    if not row["upstream_refresh_token"]:
        if current.expires_at is not None and current.expires_at > utcnow():
            raise _Done(current)  # still valid for a few seconds; nothing to refresh it with
        raise _Done(dead_reason="upstream_token_expired")


def refresh_provider_access(app: Flask, grant_id: int, skew: int) -> ProviderAccess:
    """Return a usable provider access token for the grant, refreshing it first when it expires within `skew`.

    Providers rotate refresh tokens: two concurrent refreshes with one refresh token would burn the grant. So
    an in-process lock per grant serialises this worker's requests, and a lease in the grant's row (taken and
    given back in short transactions) serialises workers and instances; whoever comes second waits for the
    lease to end and finds the work already done. No database lock or connection is held during the provider
    call: on SQLite a lock would stop every writer of every worker for as long as the provider takes.
    Raises `LoginRequired` (`UnreadableGrant`: the caller revokes the grant) or `ProviderUnavailable`.
    """
    locks: KeyedLocks = components(app).refresh_locks
    busy = ProviderUnavailable("another refresh of this sign-in is still running; retry shortly", retry_after=5)
    try:
        with locks.hold(grant_id, timeout=wait_seconds(components(app).login_provider)):
            return _refresh_under_lease(app, grant_id, skew, busy)
    except TimeoutError:
        raise busy from None
    except _Done as done:
        if done.access is not None:
            return done.access
        dead_reason = done.dead_reason
    # End the grant so the client's refresh fails too and it goes back to a full sign-in, instead of looping on
    # tokens whose provider side is dead.
    from oauthproxy.authorization_server import revoke_grant

    revoke_grant(grant_id, dead_reason or "upstream_invalid_grant")
    db.session.commit()
    raise LoginRequired("the sign-in at the identity provider has expired")


def _refresh_under_lease(app: Flask, grant_id: int, skew: int, busy: ProviderUnavailable) -> ProviderAccess:
    provider: OAuthProvider = components(app).login_provider
    box = components(app).secret_box
    with GRANT_LEASE.held(grant_id, lambda row: _settled(app, row, skew), provider, busy) as held:
        row = held.row
        refresh_token = open_grant_secret(app, grant_id, "upstream_refresh_token", row["upstream_refresh_token"])
        try:
            tokens = provider.refresh(refresh_token, provider.scopes_for((row["scope"] or "").split()))
        except ProviderError as error:
            if error.kind in ("invalid_grant", "access_denied"):
                log.info("upstream refresh for grant %s refused (%s): %s", grant_id, error.kind, error.description)
                raise _Done(dead_reason="upstream_invalid_grant") from None
            log.warning("upstream refresh for grant %s failed (%s): %s", grant_id, error.kind, error.description)
            raise ProviderUnavailable(
                "the identity provider could not refresh the sign-in; retry shortly",
                retry_after=10 if error.kind == "transient" else 60,
            ) from None
        values: dict = {
            "upstream_access_token": box.encrypt(tokens.access_token, f"grant:{grant_id}:upstream_access_token"),
            "upstream_expires_at": tokens.expires_at,
        }
        if tokens.refresh_token and tokens.refresh_token != refresh_token:
            values["upstream_refresh_token"] = box.encrypt(
                tokens.refresh_token, f"grant:{grant_id}:upstream_refresh_token"
            )
        if not held.finish(**values):
            log.warning(
                "the refresh lease of grant %s lapsed during the provider call; its new tokens were not stored",
                grant_id,
            )
        else:
            log.info("refreshed the upstream token of grant %s", grant_id)
    return ProviderAccess(tokens.access_token, tokens.expires_at)
