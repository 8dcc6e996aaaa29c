"""Database maintenance: schema upgrades under a lock, purging expired rows, re-encrypting secrets under the current key."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from flask import Flask, current_app
from sqlalchemy import delete, or_, select

from oauthproxy.models import AuthorizationCode, Grant, McpSession, OAuthClient, PendingAuthorization, Token, db, utcnow

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

    with app.app_context():
        upgrade(directory=app.extensions["migrate"].directory)


def schema_is_current(app: Flask) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(app.extensions["migrate"].migrate.get_config(app.extensions["migrate"].directory))
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


def purge_expired() -> PurgeReport:
    """Delete what can no longer be used, so the database does not grow without bound."""
    settings = current_app.config["SETTINGS"]
    now = utcnow()
    pending = db.session.execute(delete(PendingAuthorization).where(PendingAuthorization.expires_at <= now)).rowcount
    # Used codes are kept until expiry so that a replay is still recognised (and revokes its grant).
    codes = db.session.execute(delete(AuthorizationCode).where(AuthorizationCode.expires_at <= now)).rowcount
    tokens = db.session.execute(delete(Token).where(
        Token.access_expires_at <= now,
        or_(Token.refresh_expires_at.is_(None), Token.refresh_expires_at <= now, Token.revoked_at.is_not(None),
            Token.rotated_at <= now - timedelta(seconds=settings.refresh_grace_seconds)),
    )).rowcount
    live_grants = select(Token.grant_id).union(select(AuthorizationCode.grant_id))
    grants = db.session.execute(delete(Grant).where(
        Grant.id.not_in(live_grants), Grant.created_at <= now - timedelta(seconds=settings.authorization_code_ttl),
    )).rowcount
    client_cutoff = now - timedelta(seconds=settings.unused_client_ttl)
    clients = db.session.execute(delete(OAuthClient).where(
        OAuthClient.last_used_at <= client_cutoff,
        OAuthClient.client_id.not_in(select(Grant.client_id)),
    )).rowcount
    idle_cutoff = now - timedelta(seconds=settings.proxy.session_idle_timeout)
    sessions = db.session.execute(delete(McpSession).where(McpSession.last_seen_at <= idle_cutoff)).rowcount
    db.session.commit()
    return PurgeReport(pending, codes, tokens, grants, clients, sessions)


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


def rotate_encryption_key() -> int:
    """Re-encrypt every stored secret under the first ENCRYPTION_KEY; returns how many values changed."""
    try:
        changed = _re_encrypt_all(current_app.extensions["secret_box"])
    except Exception:
        db.session.rollback()  # all or nothing: a failed rotation leaves every value as it was
        raise
    db.session.commit()
    return changed


def _re_encrypt_all(box) -> int:
    changed = 0
    for client in db.session.scalars(select(OAuthClient).where(OAuthClient.client_secret_encrypted.is_not(None))):
        if box.needs_rotation(client.client_secret_encrypted):
            client.client_secret_encrypted = box.rotate(client.client_secret_encrypted, f"client:{client.client_id}:secret")
            changed += 1
    for grant in db.session.scalars(select(Grant)):
        for column in ("upstream_access_token", "upstream_refresh_token"):
            value = getattr(grant, column)
            if value and box.needs_rotation(value):
                setattr(grant, column, box.rotate(value, f"grant:{grant.id}:{column}"))
                changed += 1
    for pending in db.session.scalars(select(PendingAuthorization)):
        if box.needs_rotation(pending.upstream_secrets):
            pending.upstream_secrets = box.rotate(pending.upstream_secrets, f"pending:{pending.state_hash}:upstream_secrets")
            changed += 1
    return changed
