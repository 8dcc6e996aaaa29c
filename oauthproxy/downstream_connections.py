"""Each user's own credential for a per-user route's downstream: stored sealed, loaded with the access token, refreshed
once everywhere, refused when the downstream or its provider says no, revoked when the user disconnects."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from flask import Flask
from sqlalchemy import Select, Table, and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from oauthproxy import audit
from oauthproxy.components import components, current_application
from oauthproxy.connection_providers import ConnectionProvider, connection_provider
from oauthproxy.crypto import DecryptionError, UnknownKeyError
from oauthproxy.models import DownstreamConnection, Grant, db, utcnow
from oauthproxy.provider_tokens import KeyedLocks, ProviderUnavailable, RefreshLease, wait_seconds
from oauthproxy.providers import ProviderError, ProviderTokens
from oauthproxy.revocation_feed import announce_revoked
from oauthproxy.routes import Route
from oauthproxy.urls import canonical_resource

log = logging.getLogger(__name__)

CONNECTIONS = cast(Table, DownstreamConnection.__table__)
#: One refresh of a connection at a time across workers and instances (as for grants: provider_tokens.py).
CONNECTION_LEASE = RefreshLease(CONNECTIONS, "refresh_claim", "refresh_claimed_until")

#: What the MCP client is told when the route needs a connection it does not have: its re-authorization runs the
#: connect step.
NOT_CONNECTED = "this MCP server needs your own account at the service behind it; authorize again to connect it"
REFUSED = "the service behind this MCP server refused your connection; authorize again to reconnect it"
EXPIRED = "your connection to the service behind this MCP server has expired; authorize again to reconnect it"


class ConnectionRequired(Exception):
    """The route's connection is missing, refused or dead: the client must authorize again (and connect)."""


def sealing_context(connection_id: int, column: str) -> str:
    """The associated data of a connection's sealed secret: it opens only in its own row and column."""
    return f"connection:{connection_id}:{column}"


@dataclass(frozen=True)
class ConnectionAccess:
    """The credential a validated access token carries to its per-user route (cached with it, never logged)."""

    connection_id: int
    secret: str = field(repr=False)  # the access token, or the API key
    expires_at: datetime | None  # naive UTC; None: it does not expire (an API key, or no lifetime given)
    refreshable: bool
    #: The row's version: a refusal applies only to the credential that was sent, not to one stored since.
    updated_at: datetime

    def needs_refresh(self, skew: int, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow()) + timedelta(seconds=skew)


def _kind(route: Route) -> str:
    if not route.credential.per_user:
        raise ValueError(f"route {route.name} has no per-user credential")
    return route.credential.kind


def _detached(rows: list[DownstreamConnection], session: Session) -> list[DownstreamConnection]:
    for row in rows:
        session.expunge(row)
    return rows


# -- the store (FLOW and ACCT use these) --------------------------------------------------------------------------


def live_connection(route: Route, user_id: str) -> DownstreamConnection | None:
    """The user's usable connection for the route, detached: not refused, of the route's kind, and (oauth) holding a
    refresh token or an unexpired access token. None means the connect step must run.

    Read on a connection of its own, so the caller's session and transaction are left as they were."""
    now = utcnow()
    with Session(db.engine) as session:
        row = session.scalar(
            select(DownstreamConnection).where(
                DownstreamConnection.user_id == user_id,
                DownstreamConnection.route == route.name,
                DownstreamConnection.kind == _kind(route),
                DownstreamConnection.refused_at.is_(None),
                DownstreamConnection.access_token.is_not(None),
            )
        )
        if row is None:
            return None
        if row.kind == "oauth" and not row.refresh_token and row.expires_at is not None and row.expires_at <= now:
            return None
        return _detached([row], session)[0]


def connections_of(user_id: str) -> list[DownstreamConnection]:
    """Every connection the user has, refused ones included (the account page says which), by route name."""
    with Session(db.engine) as session:
        rows = list(
            session.scalars(
                select(DownstreamConnection)
                .where(DownstreamConnection.user_id == user_id)
                .order_by(DownstreamConnection.route)
            )
        )
        return _detached(rows, session)


def store_connection(
    route: Route,
    user_id: str,
    *,
    tokens: ProviderTokens | None = None,
    api_key: str | None = None,
    provider: str = "",
    scope: str = "",
) -> None:
    """Create or replace the user's connection for the route (oauth: `tokens`; user_api_key: `api_key`), sealed,
    not refused, in one short transaction of its own (committed on return)."""
    kind = _kind(route)
    if kind == "oauth" and (tokens is None or api_key is not None):
        raise ValueError("an oauth connection stores the provider's tokens")
    if kind == "user_api_key" and (not api_key or tokens is not None):
        raise ValueError("a user_api_key connection stores the user's key")
    box = components().secret_box
    access_token = tokens.access_token if tokens is not None else cast(str, api_key)
    refresh_token = tokens.refresh_token if tokens is not None else None
    now = utcnow()
    for attempt in range(2):
        try:
            # Insert and seal in one transaction: the row id is in the associated data, and no reader may see the
            # row between the two.
            with db.engine.begin() as connection:
                connection_id = connection.scalar(
                    select(CONNECTIONS.c.id).where(CONNECTIONS.c.user_id == user_id, CONNECTIONS.c.route == route.name)
                )
                if connection_id is None:
                    connection_id = connection.scalar(
                        insert(CONNECTIONS)
                        .values(user_id=user_id, route=route.name, kind=kind, scope="", provider="", created_at=now)
                        .returning(CONNECTIONS.c.id)
                    )
                connection.execute(
                    update(CONNECTIONS)
                    .where(CONNECTIONS.c.id == connection_id)
                    .values(
                        kind=kind,
                        access_token=box.encrypt(access_token, sealing_context(connection_id, "access_token")),
                        refresh_token=(
                            box.encrypt(refresh_token, sealing_context(connection_id, "refresh_token"))
                            if refresh_token
                            else None
                        ),
                        expires_at=tokens.expires_at if tokens is not None else None,
                        scope=scope,
                        provider=provider[:2048],
                        updated_at=now,
                        refused_at=None,
                        # A refresh still running for the old credential must not store its tokens over these.
                        refresh_claim=None,
                        refresh_claimed_until=None,
                    )
                )
            break
        except IntegrityError:
            if attempt:
                raise
            # Another request inserted the row between our read and our insert: replace theirs.
    _forget_cached(current_application(), route, user_id)
    log.info("stored the %s connection of user %s to route %s", kind, user_id, route.name)
    audit.record("connection_made", user=user_id, route=route.name, outcome="succeeded", kind=kind)


def connection_refused(route: Route, user_id: str, reason: str) -> None:
    """The downstream (or its provider) refused the user's credential: the next authorization asks for it again."""
    _refuse(current_application(), route, user_id, reason)


def disconnect(route: Route, user_id: str) -> bool:
    """Delete the user's connection for the route; False when there was none.

    An oauth connection's tokens are then revoked at the downstream's authorization server (RFC 7009), when it has
    a revocation endpoint (the route's `revocation_url`, or its metadata's): best effort, each call bounded by the
    provider timeout, failures logged. Every worker of every instance drops the user's cached tokens for the route
    (through the revocation feed, as for a revoked grant), so the credential stops being sent within a second."""
    with db.engine.begin() as connection:
        row = (
            connection.execute(
                select(
                    CONNECTIONS.c.id, CONNECTIONS.c.kind, CONNECTIONS.c.access_token, CONNECTIONS.c.refresh_token
                ).where(CONNECTIONS.c.user_id == user_id, CONNECTIONS.c.route == route.name)
            )
            .mappings()
            .first()
        )
        if row is None:
            return False
        connection.execute(delete(CONNECTIONS).where(CONNECTIONS.c.id == row["id"]))
    forget_everywhere(route, user_id)
    log.info("deleted the connection of user %s to route %s", user_id, route.name)
    audit.record("connection_removed", user=user_id, route=route.name, outcome="succeeded", kind=row["kind"])
    if row["kind"] == "oauth" and route.oauth is not None:
        _revoke(route, row)
    return True


def forget_everywhere(route: Route, user_id: str) -> None:
    """Every worker of every instance drops the user's cached tokens for the route, which carry the credential that
    was just removed or replaced: through the revocation feed, as for a revoked grant. The grants stay valid (their
    next request reads the connection as it is now); the feed only ends what the workers cached."""
    with db.engine.connect() as connection:
        grant_ids = connection.scalars(
            select(Grant.id).where(
                Grant.user_id == user_id, Grant.resource == route.resource, Grant.revoked_at.is_(None)
            )
        ).all()
    _forget_cached(current_application(), route, user_id)
    announce_revoked(grant_ids)


def _revoke(route: Route, row: Any) -> None:
    """Revoke a deleted connection's tokens at its provider, refresh token first (RFC 7009 §2.1: that usually ends
    the access tokens of the grant too)."""
    try:
        provider = connection_provider(route).provider
    except ProviderError as error:
        log.warning("route %s: cannot revoke a disconnected token (%s): %s", route.name, error.kind, error.description)
        return
    endpoint = route.oauth.revocation_url if route.oauth is not None else None
    box = components().secret_box
    for column in ("refresh_token", "access_token"):
        if not row[column]:
            continue
        try:
            token = box.decrypt(row[column], sealing_context(row["id"], column))
        except DecryptionError as error:
            log.warning("connection %s: its %s cannot be read to revoke it: %s", row["id"], column, error)
            continue
        provider.revoke_token(token, column, endpoint=endpoint)


def _refuse(
    app: Flask,
    route: Route,
    user_id: str,
    reason: str,
    sent: ConnectionAccess | None = None,
) -> bool:
    """Mark the connection refused; with `sent`, only if it still holds that credential. True when it was marked."""
    condition = and_(CONNECTIONS.c.user_id == user_id, CONNECTIONS.c.route == route.name)
    if sent is not None:
        condition = and_(condition, CONNECTIONS.c.id == sent.connection_id, CONNECTIONS.c.updated_at == sent.updated_at)
    with db.engine.begin() as connection:
        marked = connection.execute(
            update(CONNECTIONS).where(condition, CONNECTIONS.c.refused_at.is_(None)).values(refused_at=utcnow())
        ).rowcount
    _forget_cached(app, route, user_id)
    if marked:
        log.info("the connection of user %s to route %s is refused: %s", user_id, route.name, reason)
        audit.record("connection_refused", user=user_id, route=route.name, outcome="refused", reason=reason)
    return bool(marked)


def refuse_sent_credential(app: Flask, route: Route, user_id: str, sent: ConnectionAccess) -> None:
    """The downstream answered 401 to the credential we sent (not to one stored or refreshed since)."""
    _refuse(app, route, user_id, "the downstream refused the credential", sent)


def _forget_cached(app: Flask, route: Route, user_id: str) -> None:
    """This worker's cached access tokens of the user on the route carry the old credential: drop them."""
    cache = getattr(components(app), "token_cache", None)
    if cache is not None:
        cache.forget_user(user_id, canonical_resource(route.resource))


# -- the proxy path ------------------------------------------------------------------------------------------------


def with_connection(query: Select, route: Route) -> Select:
    """Add the route's connection of the grant's user to the access token lookup: the same round trip (an outer
    join, so a missing connection is a row of NULLs rather than no row)."""
    return query.add_columns(
        CONNECTIONS.c.id.label("connection_id"),
        CONNECTIONS.c.kind.label("connection_kind"),
        CONNECTIONS.c.access_token.label("connection_access_token"),
        CONNECTIONS.c.refresh_token.is_not(None).label("connection_refreshable"),
        CONNECTIONS.c.expires_at.label("connection_expires_at"),
        CONNECTIONS.c.refused_at.label("connection_refused_at"),
        CONNECTIONS.c.updated_at.label("connection_updated_at"),
    ).outerjoin(CONNECTIONS, and_(CONNECTIONS.c.user_id == Grant.user_id, CONNECTIONS.c.route == route.name))


def connection_from_row(app: Flask, route: Route, user_id: str, row: Any) -> ConnectionAccess:
    """The connection a `with_connection` row carries, opened; raises `ConnectionRequired` when there is none to
    use, `ProviderUnavailable` when the key that sealed it is missing here (an operator's fix: the row is kept)."""
    if row.connection_id is None or row.connection_kind != route.credential.kind or not row.connection_access_token:
        raise ConnectionRequired(NOT_CONNECTED)
    if row.connection_refused_at is not None:
        raise ConnectionRequired(REFUSED)
    expires_at = row.connection_expires_at
    if not row.connection_refreshable and expires_at is not None and expires_at <= utcnow():
        raise ConnectionRequired(EXPIRED)
    secret = _open(app, route, user_id, row.connection_id, "access_token", row.connection_access_token)
    return ConnectionAccess(
        row.connection_id, secret, expires_at, bool(row.connection_refreshable), row.connection_updated_at
    )


def _open(app: Flask, route: Route, user_id: str, connection_id: int, column: str, sealed: str) -> str:
    try:
        return components(app).secret_box.decrypt(sealed, sealing_context(connection_id, column))
    except UnknownKeyError as error:
        log.error("connection %s: cannot decrypt its %s: %s", connection_id, column, error)
        raise ProviderUnavailable(
            "the server cannot read your stored connection right now (an encryption key is missing); retry later",
            retry_after=60,
        ) from None
    except DecryptionError as error:
        # Never readable again (tampered, or moved from another row): ask the user for it again.
        log.error("connection %s: its %s can never be decrypted (%s)", connection_id, column, error)
        _refuse(app, route, user_id, "its stored credential cannot be decrypted")
        raise ConnectionRequired(REFUSED) from None


class _Done(Exception):
    """The connection needs no refresh (or cannot have one); carries the answer."""

    def __init__(self, access: ConnectionAccess | None = None, dead_reason: str | None = None):
        self.access, self.dead_reason = access, dead_reason


def _settled(app: Flask, route: Route, user_id: str, row: dict | None, skew: int) -> None:
    """Raise `_Done` or `ConnectionRequired` when the freshly read row needs no refresh; return when it does."""
    if row is None:
        raise ConnectionRequired(NOT_CONNECTED)  # disconnected meanwhile
    if row["refused_at"] is not None:
        raise ConnectionRequired(REFUSED)
    secret = _open(app, route, user_id, row["id"], "access_token", row["access_token"])
    current = ConnectionAccess(row["id"], secret, row["expires_at"], bool(row["refresh_token"]), row["updated_at"])
    if not current.needs_refresh(skew):
        raise _Done(current)  # another request, worker or instance refreshed it while we waited
    if not row["refresh_token"]:
        if current.expires_at is not None and current.expires_at > utcnow():
            raise _Done(current)  # still valid for a few seconds; nothing to refresh it with
        raise _Done(dead_reason="its access token expired and there is no refresh token")


def fresh_connection(app: Flask, route: Route, user_id: str, access: ConnectionAccess, skew: int) -> ConnectionAccess:
    """`access`, or a refreshed one when its access token expires within `skew` seconds.

    As for the login provider's tokens (provider_tokens.refresh_provider_access): an in-process lock per connection
    serialises this worker's requests and the row's lease serialises workers and instances, so a provider that
    rotates refresh tokens never sees two refreshes; no lock, connection or transaction is held during the provider
    call. Raises `ConnectionRequired` (the provider refused the refresh token: the connection is marked refused) or
    `ProviderUnavailable` (transient: retry)."""
    if not access.needs_refresh(skew):
        return access
    try:
        downstream = connection_provider(route)
    except ProviderError as error:
        log.warning(
            "route %s: no authorization server to refresh with (%s): %s", route.name, error.kind, error.description
        )
        raise ProviderUnavailable(
            "the authorization server of the service behind this MCP server cannot be reached; retry shortly",
            retry_after=10 if error.kind == "transient" else 60,
        ) from None
    locks: KeyedLocks = components(app).refresh_locks
    busy = ProviderUnavailable("another refresh of your connection is still running; retry shortly", retry_after=5)
    try:
        # Keyed apart from the grants' locks, which share this registry.
        with locks.hold(("connection", access.connection_id), timeout=wait_seconds(downstream.provider)):
            return _refresh_under_lease(app, route, user_id, access.connection_id, downstream, skew, busy)
    except TimeoutError:
        raise busy from None
    except _Done as done:
        if done.access is not None:
            return done.access
        dead_reason = done.dead_reason or "the provider refused the refresh token"
    _refuse(app, route, user_id, dead_reason)
    raise ConnectionRequired(EXPIRED)


def _refresh_under_lease(
    app: Flask,
    route: Route,
    user_id: str,
    connection_id: int,
    downstream: ConnectionProvider,
    skew: int,
    busy: ProviderUnavailable,
) -> ConnectionAccess:
    provider = downstream.provider
    box = components(app).secret_box
    settled = lambda row: _settled(app, route, user_id, row, skew)  # noqa: E731
    with CONNECTION_LEASE.held(connection_id, settled, provider, busy) as held:
        row = held.row
        refresh_token = _open(app, route, user_id, connection_id, "refresh_token", row["refresh_token"])
        try:
            tokens = provider.refresh(
                refresh_token, (row["scope"] or "").split() or list(downstream.scopes), downstream.token_params
            )
        except ProviderError as error:
            if error.kind in ("invalid_grant", "access_denied"):
                log.info("refresh of connection %s refused (%s): %s", connection_id, error.kind, error.description)
                raise _Done(dead_reason=f"the provider refused the refresh token ({error.kind})") from None
            log.warning("refresh of connection %s failed (%s): %s", connection_id, error.kind, error.description)
            raise ProviderUnavailable(
                "the authorization server of the service behind this MCP server could not refresh your connection; "
                "retry shortly",
                retry_after=10 if error.kind == "transient" else 60,
            ) from None
        now = utcnow()
        values: dict[str, Any] = {
            "access_token": box.encrypt(tokens.access_token, sealing_context(connection_id, "access_token")),
            "expires_at": tokens.expires_at,
            "updated_at": now,
        }
        if tokens.refresh_token and tokens.refresh_token != refresh_token:
            values["refresh_token"] = box.encrypt(tokens.refresh_token, sealing_context(connection_id, "refresh_token"))
        if held.finish(**values):
            log.info("refreshed connection %s of route %s", connection_id, route.name)
        else:
            log.warning(
                "the refresh lease of connection %s lapsed during the provider call; its new tokens were not stored",
                connection_id,
            )
    return ConnectionAccess(connection_id, tokens.access_token, tokens.expires_at, True, now)
