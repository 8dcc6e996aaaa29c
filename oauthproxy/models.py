"""Models: registered clients, grants (a user's authorization of a client), codes, tokens, pending logins, signing keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import CursorResult, ForeignKey, Index, MetaData, Result, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


db = SQLAlchemy(model_class=Base)
# Flask-SQLAlchemy builds db.Model at run time from Base; type checkers see Base, which has every attribute we use.
if TYPE_CHECKING:
    Model = Base
else:
    Model = db.Model


def rows_affected(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE touched: conditional UPDATEs decide races (a code, a rotation) by it."""
    return cast(CursorResult[Any], result).rowcount


def utcnow() -> datetime:
    # Stored naive in UTC: SQLite keeps no zone, and one convention for both databases keeps comparisons simple.
    return datetime.now(UTC).replace(tzinfo=None)


class OAuthClient(Model):
    """A client registered through RFC 7591 dynamic registration."""

    __tablename__ = "oauth_clients"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    client_metadata_json: Mapped[str] = mapped_column(Text)
    # Identical re-registrations from one address reuse the row instead of piling up (clients.registration_fingerprint).
    metadata_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    @property
    def client_metadata(self) -> dict:
        return json.loads(self.client_metadata_json)


class Grant(Model):
    """One user's authorization of one client: the family every code and token of that login descends from."""

    __tablename__ = "grants"

    id: Mapped[int] = mapped_column(primary_key=True)
    client_id: Mapped[str] = mapped_column(String(2048), index=True)
    user_id: Mapped[str] = mapped_column(String(255), index=True)
    user_email: Mapped[str | None] = mapped_column(String(320))
    user_name: Mapped[str | None] = mapped_column(String(255))
    #: The user's groups as the login provider last stated them (groups.groups_column: a sorted JSON list; None for
    #: none), read at sign-in and again with each refresh of the provider's tokens.
    user_groups: Mapped[str | None] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(Text, default="")
    resource: Mapped[str] = mapped_column(String(2048))
    upstream_access_token: Mapped[str | None] = mapped_column(Text)
    upstream_refresh_token: Mapped[str | None] = mapped_column(Text)
    upstream_expires_at: Mapped[datetime | None] = mapped_column()
    # The scopes asked of the provider; Microsoft's v2.0 token endpoint wants them again on refresh.
    upstream_scope: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    revoked_reason: Mapped[str | None] = mapped_column(String(64))
    # A lease on refreshing the upstream token (provider_tokens.py): who holds it, and until when.
    upstream_refresh_claim: Mapped[str | None] = mapped_column(String(32))
    upstream_refresh_claimed_until: Mapped[datetime | None] = mapped_column()


class AuthorizationCode(Model):
    """A single-use code bound to client, redirect URI, PKCE challenge, resource and scope (OAuth 2.1 §4.1.3)."""

    __tablename__ = "authorization_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[str] = mapped_column(String(2048))
    redirect_uri: Mapped[str] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(Text, default="")
    resource: Mapped[str] = mapped_column(String(2048))
    code_challenge: Mapped[str] = mapped_column(String(128))
    code_challenge_method: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(index=True)
    used_at: Mapped[datetime | None] = mapped_column()

    # Authlib's AuthorizationCodeMixin
    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


class Token(Model):
    """An access token and its refresh token, stored as hashes; rotation marks the old row `rotated_at`."""

    __tablename__ = "tokens"
    __table_args__ = (Index("ix_tokens_refresh_expires_at", "refresh_expires_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[str] = mapped_column(String(2048))
    user_id: Mapped[str] = mapped_column(String(255))
    scope: Mapped[str] = mapped_column(Text, default="")
    resource: Mapped[str] = mapped_column(String(2048))
    access_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    refresh_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    access_expires_at: Mapped[datetime] = mapped_column()
    refresh_expires_at: Mapped[datetime | None] = mapped_column()
    rotated_at: Mapped[datetime | None] = mapped_column()
    # When the one retry the refresh grace window allows was taken (see RefreshTokenGrant).
    grace_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()

    # Authlib's TokenMixin
    def check_client(self, client) -> bool:
        return self.client_id == client.get_client_id()

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int((self.access_expires_at - utcnow()).total_seconds()))

    def is_expired(self) -> bool:
        return self.access_expires_at <= utcnow()

    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class PendingAuthorization(Model):
    """An approved authorization request waiting for the upstream login; keyed by the upstream `state`."""

    __tablename__ = "pending_authorizations"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Hash of a random value in the browser's session cookie: the callback must come back to the browser
    # that consented, or anyone could send a victim a pre-approved upstream link (confused deputy).
    browser_binding_hash: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str] = mapped_column(String(2048))
    request_json: Mapped[str] = mapped_column(Text)
    upstream_secrets: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    #: What the login is for: "authorize" (an MCP client's authorization) or "account" (the account page's sign-in).
    purpose: Mapped[str] = mapped_column(String(16), default="authorize", server_default="authorize")

    @property
    def request_params(self) -> dict:
        return json.loads(self.request_json)


class McpSession(Model):
    """An MCP session a downstream opened through a route, and the user it belongs to (MCP RS-5: sessions are bound
    to their user). Keyed by a hash of the route's name and the `Mcp-Session-Id`: the id itself is never stored."""

    __tablename__ = "mcp_sessions"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    route: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Refreshed at most every few minutes by each worker that serves the session; idle ones are purged.
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Revocation(Model):
    """A grant revoked in the last few minutes, for the workers that learn of revocations by polling
    (revocation_feed.py): each reads the rows past the last id it saw. Written in the revoking transaction;
    pruned after RETENTION_SECONDS. AUTOINCREMENT on SQLite: an id is never handed out twice, even after the
    newest row was pruned, so `id > last seen` never skips one."""

    __tablename__ = "revocations"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    grant_id: Mapped[int] = mapped_column()
    revoked_at: Mapped[datetime] = mapped_column(index=True)


class DownstreamConnection(Model):
    """One user's credential for one route's downstream (route credential `oauth` or `user_api_key`).

    The secrets are sealed (crypto.SecretBox) with the row id in their associated data: `connection:{id}:access_token`
    and `connection:{id}:refresh_token`. For `user_api_key` the key is the access token and nothing expires."""

    __tablename__ = "downstream_connections"
    __table_args__ = (UniqueConstraint("user_id", "route"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    route: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "oauth" | "user_api_key"
    access_token: Mapped[str | None] = mapped_column(Text)
    refresh_token: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column()
    scope: Mapped[str] = mapped_column(Text, default="")
    #: Who issued the tokens (the downstream's authorization server, by issuer or authorize URL): the account page.
    provider: Mapped[str] = mapped_column(String(2048), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The downstream refused this credential (401) or its provider answered invalid_grant: the next authorization
    #: through the route asks again (and says why).
    refused_at: Mapped[datetime | None] = mapped_column()
    #: A lease on refreshing the tokens, as on grants (provider_tokens.py): who holds it, and until when.
    refresh_claim: Mapped[str | None] = mapped_column(String(32))
    refresh_claimed_until: Mapped[datetime | None] = mapped_column()


class PendingConnection(Model):
    """A login that waits for the user to connect a route's downstream before the MCP client gets its code.

    Nothing of the login is stored as a grant until the connection is made: the sealed `login` holds the
    identity, the login provider's tokens and the client's authorization request, and the grant and its code are
    written together when the connect step completes (or never, when it is abandoned)."""

    __tablename__ = "pending_connections"

    #: Hash of the connect step's single-use value: the `state` sent to the downstream's provider, or the
    #: API-key form's token.
    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    browser_binding_hash: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(255))
    client_id: Mapped[str] = mapped_column(String(2048))
    #: Sealed as `pending-connection:{state_hash}:login`: request params, identity, provider tokens and scopes.
    login: Mapped[str] = mapped_column(Text)
    #: Sealed as `pending-connection:{state_hash}:secrets`: the PKCE verifier and nonce of the connect hop.
    secrets: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class DownstreamRegistration(Model):
    """What a discovered downstream authorization server knows the proxy as (route `oauth = "discover"`): the
    client id of a dynamic registration (RFC 7591), kept so that every worker and restart reuses it."""

    __tablename__ = "downstream_registrations"

    #: sha256 of route name and issuer: one registration per route and authorization server.
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    route: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(2048))
    client_id: Mapped[str] = mapped_column(String(2048))
    #: Sealed as `downstream-registration:{key_hash}:client_secret`; None for a public client.
    client_secret: Mapped[str | None] = mapped_column(Text)
    metadata_json: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SigningKey(Model):
    """One of the proxy's keys for signing identity assertions (signing_keys.py): `active` (exactly one signs),
    `retiring` (signs no more, still published until every assertion it signed has expired), `removed`.

    `kid` is the RFC 7638 thumbprint of the public key. The private key is sealed (crypto.SecretBox) as
    `signing-key:{kid}:private_jwk` and dropped when the key is removed. Times are the database's clock."""

    __tablename__ = "signing_keys"
    # At most one active key, whatever workers and instances race to create or rotate one.
    __table_args__ = (
        Index(
            "uq_signing_keys_one_active",
            "state",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    public_jwk: Mapped[str] = mapped_column(Text)
    private_jwk: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()
    retired_at: Mapped[datetime | None] = mapped_column()
    removed_at: Mapped[datetime | None] = mapped_column()


class AuditEvent(Model):
    """One audit event (audit.py): a sign-in, a consent, tokens issued, refreshed or revoked, a downstream connection
    made or removed, a tool call. Written in batches by each process's flusher; purged after AUDIT_RETENTION_DAYS."""

    __tablename__ = "audit_events"
    # Every tool call inserts a row, and on SQLite each index is the worker's own CPU (at 200,000 rows: 3 µs a row
    # with no index, 13 with these, 26 with client and tool indexed too). Searches by client, route or tool walk
    # the time index, newest first, to their limit.
    __table_args__ = (
        Index("ix_audit_events_user_id_time", "user_id", "time"),
        Index(
            "ix_audit_events_user_email",
            "user_email",
            sqlite_where=text("user_email IS NOT NULL"),
            postgresql_where=text("user_email IS NOT NULL"),
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[datetime] = mapped_column(index=True)
    event: Mapped[str] = mapped_column(String(40))
    user_id: Mapped[str | None] = mapped_column(String(255))
    user_email: Mapped[str | None] = mapped_column(String(320))
    client_id: Mapped[str | None] = mapped_column(String(512))
    route: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(String(200))
    tool: Mapped[str | None] = mapped_column(String(255))
    duration_ms: Mapped[float | None] = mapped_column()
    details: Mapped[str | None] = mapped_column(Text)

    def as_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "id": self.id,
            "time": self.time.isoformat(timespec="milliseconds") + "Z",
            "event": self.event,
            "user_id": self.user_id,
            "user_email": self.user_email,
            "client_id": self.client_id,
            "route": self.route,
            "request_id": self.request_id,
            "outcome": self.outcome,
            "reason": self.reason,
            "tool": self.tool,
            "duration_ms": self.duration_ms,
        }
        try:
            details = json.loads(self.details) if self.details else {}
        except ValueError:
            details = {"details": self.details}
        document["details"] = details if isinstance(details, dict) else {"details": details}
        return document
