"""Database maintenance: schema upgrades under a lock, purging expired rows, re-encrypting secrets under the current key."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from flask import Flask, current_app
from sqlalchemy import delete, or_, select

from oauthproxy.audit import purge_old_events
from oauthproxy.clock import database_now
from oauthproxy.components import components
from oauthproxy.crypto import DecryptionError, SecretBox, UnknownKeyError
from oauthproxy.models import (
    AuthorizationCode,
    DownstreamConnection,
    DownstreamRegistration,
    Grant,
    McpSession,
    OAuthClient,
    PendingAuthorization,
    PendingConnection,
    SigningKey,
    Token,
    db,
    rows_affected,
    utcnow,
)

log = logging.getLogger(__name__)

PURGE_INTERVAL_SECONDS = 3600.0

# Any fixed 64-bit number; every instance uses the same one so only one of them migrates at a time.
MIGRATION_LOCK_ID = 0x6F61757468707278


def upgrade_database(app: Flask) -> None:
    """Apply Alembic migrations; safe when several workers or instances start at once.

    On PostgreSQL, `migrations/env.py` holds an advisory lock for the duration of the upgrade, so the
    same holds for `oauthproxy db upgrade`. SQLite is single-host, and gunicorn runs this once, in its master.
    """
    from flask_migrate import upgrade

    from oauthproxy.database_faults import unbounded_waits

    with app.app_context(), unbounded_waits():
        db.engine.dispose()  # pooled connections carry the request bounds (statement_timeout): open fresh ones
        try:
            upgrade(directory=app.extensions["migrate"].directory)
        finally:
            db.engine.dispose()


def schema_is_current(app: Flask) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(
        app.extensions["migrate"].migrate.get_config(app.extensions["migrate"].directory)
    )
    with db.engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    return set(current) == set(script.get_heads())


@dataclass
class PurgeReport:
    pending_authorizations: int
    authorization_codes: int
    tokens: int
    grants: int
    clients: int
    mcp_sessions: int = 0
    pending_connections: int = 0
    audit_events: int = 0


def purge_expired() -> PurgeReport:
    """Delete what can no longer be used, so the database does not grow without bound."""
    settings = current_app.config["SETTINGS"]
    # Pending logins, codes and tokens are stamped with the database's clock, and so compared here: an instance
    # whose own clock runs ahead must not delete a rotated token still inside its grace window.
    pending = rows_affected(
        db.session.execute(delete(PendingAuthorization).where(PendingAuthorization.expires_at <= database_now()))
    )
    # Used codes are kept until expiry so that a replay is still recognised (and revokes its grant).
    codes = rows_affected(
        db.session.execute(delete(AuthorizationCode).where(AuthorizationCode.expires_at <= database_now()))
    )
    tokens = rows_affected(
        db.session.execute(
            delete(Token).where(
                Token.access_expires_at <= database_now(),
                or_(
                    Token.refresh_expires_at.is_(None),
                    Token.refresh_expires_at <= database_now(),
                    Token.revoked_at.is_not(None),
                    Token.rotated_at <= database_now(-settings.refresh_grace_seconds),
                ),
            )
        )
    )
    now = utcnow()
    live_grants = select(Token.grant_id).union(select(AuthorizationCode.grant_id))
    grants = rows_affected(
        db.session.execute(
            delete(Grant).where(
                Grant.id.not_in(live_grants),
                Grant.created_at <= now - timedelta(seconds=settings.authorization_code_ttl),
            )
        )
    )
    client_cutoff = now - timedelta(seconds=settings.unused_client_ttl)
    clients = rows_affected(
        db.session.execute(
            delete(OAuthClient).where(
                OAuthClient.last_used_at <= client_cutoff,
                OAuthClient.client_id.not_in(select(Grant.client_id)),
            )
        )
    )
    idle_cutoff = now - timedelta(seconds=settings.proxy.session_idle_timeout)
    sessions = rows_affected(db.session.execute(delete(McpSession).where(McpSession.last_seen_at <= idle_cutoff)))
    # Logins abandoned at the connect step (connect.py): they hold the login provider's tokens, sealed.
    connecting = rows_affected(
        db.session.execute(delete(PendingConnection).where(PendingConnection.expires_at <= database_now()))
    )
    audit_events = purge_old_events(settings.audit_retention_days)  # older than AUDIT_RETENTION_DAYS (audit.py)
    db.session.commit()
    return PurgeReport(pending, codes, tokens, grants, clients, sessions, connecting, audit_events)


_purge_lock = threading.Lock()
_last_purge = 0.0


def purge_if_due(interval: float = PURGE_INTERVAL_SECONDS) -> PurgeReport | None:
    """Purge at most once per `interval` per process, so no cron job is needed to bound the tables."""
    global _last_purge
    now = time.monotonic()
    if now - _last_purge < interval or not _purge_lock.acquire(blocking=False):
        return None
    try:
        _last_purge = now
        report = purge_expired()
        log.info("purged expired rows: %s", report)
        return report
    except Exception:
        db.session.rollback()
        log.exception("purge failed; will retry in %s s", interval)
        return None
    finally:
        _purge_lock.release()


class UnreadableSecrets(Exception):
    """rotate-key found stored values no configured key opens; `rows` names each (never its value)."""

    def __init__(self, rows: list[str], unknown_key: bool):
        super().__init__(f"{len(rows)} stored value(s) cannot be decrypted")
        self.rows = rows
        self.unknown_key = unknown_key  # at least one was sealed under a key not in ENCRYPTION_KEY


def rotate_encryption_key() -> int:
    """Re-encrypt every stored secret still in use under the first ENCRYPTION_KEY; returns how many changed.

    All or nothing: when any value cannot be decrypted, nothing is changed and `UnreadableSecrets` names
    every such row, so the operator fixes them all in one pass.
    """
    try:
        changed, unreadable, unknown_key = _re_encrypt_all(components().secret_box)
        if unreadable:
            raise UnreadableSecrets(unreadable, unknown_key)
    except Exception:
        db.session.rollback()  # a failed rotation leaves every value as it was
        raise
    db.session.commit()
    return changed


def _re_encrypt_all(box: SecretBox) -> tuple[int, list[str], bool]:
    """Revoked grants, expired pending logins and refused connections are skipped: they are never decrypted again
    (purge deletes the first two; a refused connection is replaced when the user connects again)."""
    changed = 0
    unreadable: list[str] = []
    unknown_key = False

    def rotate(value: str, associated_data: str, row: str) -> str:
        nonlocal changed, unknown_key
        if not box.needs_rotation(value):
            return value
        try:
            rotated = box.rotate(value, associated_data)
        except DecryptionError as error:
            unknown_key |= isinstance(error, UnknownKeyError)
            unreadable.append(f"{row}: {error}")
            return value
        changed += 1
        return rotated

    for client in db.session.scalars(select(OAuthClient).where(OAuthClient.client_secret_encrypted.is_not(None))):
        if client.client_secret_encrypted:  # never None here (the query); the test tells the type checker so
            client.client_secret_encrypted = rotate(
                client.client_secret_encrypted,
                f"client:{client.client_id}:secret",
                f"client {client.client_id} (client secret)",
            )
    for grant in db.session.scalars(select(Grant).where(Grant.revoked_at.is_(None))):
        for column in ("upstream_access_token", "upstream_refresh_token"):
            value = getattr(grant, column)
            if value:
                setattr(grant, column, rotate(value, f"grant:{grant.id}:{column}", f"grant {grant.id} ({column})"))
    for connection in db.session.scalars(select(DownstreamConnection).where(DownstreamConnection.refused_at.is_(None))):
        for column in ("access_token", "refresh_token"):
            value = getattr(connection, column)
            if value:
                where = f"downstream connection {connection.id} ({column})"
                setattr(connection, column, rotate(value, f"connection:{connection.id}:{column}", where))
    for pending in db.session.scalars(select(PendingAuthorization).where(PendingAuthorization.expires_at > utcnow())):
        pending.upstream_secrets = rotate(
            pending.upstream_secrets,
            f"pending:{pending.state_hash}:upstream_secrets",
            f"pending login {pending.state_hash[:12]} (expires {pending.expires_at:%H:%M} UTC)",
        )
    for connecting in db.session.scalars(select(PendingConnection).where(PendingConnection.expires_at > utcnow())):
        where = f"pending connection {connecting.state_hash[:12]} (expires {connecting.expires_at:%H:%M} UTC)"
        prefix = f"pending-connection:{connecting.state_hash}"
        connecting.login = rotate(connecting.login, f"{prefix}:login", where + " (login)")
        if connecting.secrets:
            connecting.secrets = rotate(connecting.secrets, f"{prefix}:secrets", where + " (secrets)")
    for registration in db.session.scalars(
        select(DownstreamRegistration).where(DownstreamRegistration.client_secret.is_not(None))
    ):
        if registration.client_secret:  # never None here (the query); the test tells the type checker so
            registration.client_secret = rotate(
                registration.client_secret,
                f"downstream-registration:{registration.key_hash}:client_secret",
                f"downstream registration of route {registration.route} at {registration.issuer} (client secret)",
            )
    # Removed keys have no private key left; the label is signing_keys.sealed_key_label's.
    for key in db.session.scalars(select(SigningKey).where(SigningKey.private_jwk.is_not(None))):
        if key.private_jwk:
            key.private_jwk = rotate(
                key.private_jwk, f"signing-key:{key.kid}:private_jwk", f"signing key {key.kid} ({key.state})"
            )
    return changed, unreadable, unknown_key
