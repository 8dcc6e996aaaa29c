"""The OAuth 2.1 authorization server: Authlib grants, token issuance and rotation, revocation, RFC 8414 metadata."""

from __future__ import annotations

import logging

from authlib.integrations.flask_oauth2 import AuthorizationServer as FlaskAuthorizationServer
from authlib.oauth2.rfc6749 import OAuth2Request, grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import IssuerParameter
from flask import Flask, current_app
from sqlalchemy import or_, select, update

from oauthproxy import audit, metrics
from oauthproxy.allowlists import grant_is_allowed, route_for_resource
from oauthproxy.clients import SUPPORTED_AUTH_METHODS, SUPPORTED_GRANT_TYPES, ClientRegistration, load_client
from oauthproxy.clock import database_now
from oauthproxy.components import components
from oauthproxy.config import Settings
from oauthproxy.crypto import hash_token, new_token
from oauthproxy.downstream_connections import live_connection
from oauthproxy.errors import InvalidTargetError, TemporarilyUnavailableError, safe_description
from oauthproxy.groups import groups_from_column, groups_matter
from oauthproxy.logs import set_request_client, set_request_user
from oauthproxy.models import AuthorizationCode, Grant, Token, db, rows_affected, utcnow
from oauthproxy.provider_tokens import (
    LoginRequired,
    ProviderUnavailable,
    UnreadableGrant,
    refresh_provider_access,
    revoke_unreadable_grant,
)
from oauthproxy.resource_server import forget_grant
from oauthproxy.revocation_feed import revoked_in_transaction
from oauthproxy.urls import canonical_resource

log = logging.getLogger(__name__)


class ParamsRequest(OAuth2Request):
    """An authorization request rebuilt from stored parameters (after consent, or at the upstream callback)."""

    def __init__(self, issuer: str, params: dict[str, str]):
        super().__init__("GET", issuer + "/authorize")
        self.payload = BasicOAuth2Payload(params)

    @property
    def args(self) -> dict[str, str]:
        return self.payload.data


class S256CodeChallenge(CodeChallenge):
    """PKCE with S256 only, and never optional (OAuth 2.1 §4.1.1, §7.5.2; MCP authorization).

    Authlib's `CodeChallenge(required=True)` lets a request without `code_challenge` through and accepts
    `plain`; since every code here carries a challenge, the verifier check at the token endpoint then
    always applies, whatever the client's authentication method.
    """

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant, redirect_uri):
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256 (plain is not allowed)")
        return super().validate_code_challenge(grant, redirect_uri)

    def get_authorization_code_challenge(self, authorization_code: AuthorizationCode) -> str:
        return authorization_code.code_challenge

    def get_authorization_code_challenge_method(self, authorization_code: AuthorizationCode) -> str:
        return authorization_code.code_challenge_method


def revoke_grant(grant_id: int, reason: str) -> None:
    """Revoke a whole family: the grant, its tokens and any code still unused. The caller commits."""
    now = utcnow()
    db.session.execute(
        update(Grant)
        .where(Grant.id == grant_id, Grant.revoked_at.is_(None))
        .values(revoked_at=now, revoked_reason=reason)
    )
    db.session.execute(
        update(Token).where(Token.grant_id == grant_id, Token.revoked_at.is_(None)).values(revoked_at=now)
    )
    db.session.execute(
        update(AuthorizationCode)
        .where(AuthorizationCode.grant_id == grant_id, AuthorizationCode.used_at.is_(None))
        .values(used_at=now)
    )
    metrics.GRANTS_REVOKED.labels(reason).inc()
    audit.record_revocation(grant_id, reason)
    # Announced to every worker of every instance when (if) the caller's transaction commits; gone from this
    # worker's cache now (and again after the commit, in case a request cached it meanwhile).
    revoked_in_transaction([grant_id])
    forget_grant(current_app, grant_id)
    log.info("revoked grant %s: %s", grant_id, reason)


def check_token_resource(grant: grants.BaseGrant, target: str) -> None:
    """RFC 8707 §2.2: a `resource` at the token endpoint must be the one the grant was issued for."""
    for resource in grant.request.payload.datalist.get("resource", []):
        if canonical_resource(resource) != canonical_resource(target):
            raise InvalidTargetError(
                safe_description(f"this grant is for {target}; resource {resource} was not authorized")
            )


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = list(SUPPORTED_AUTH_METHODS)

    def validate_token_request(self) -> None:
        super().validate_token_request()
        check_token_resource(self, self.request.authorization_code.resource)

    def save_authorization_code(self, code: str, request) -> AuthorizationCode:
        family: Grant = request.user
        settings: Settings = self.server.settings
        row = AuthorizationCode(
            code_hash=hash_token(code),
            grant_id=family.id,
            client_id=request.client.get_client_id(),
            redirect_uri=request.payload.redirect_uri or "",
            scope=family.scope,
            resource=family.resource,
            code_challenge=request.payload.data["code_challenge"],
            code_challenge_method=request.payload.data.get("code_challenge_method", "S256"),
            expires_at=database_now(settings.authorization_code_ttl),
        )
        db.session.add(row)
        db.session.commit()
        return row

    def query_authorization_code(self, code: str, client) -> AuthorizationCode | None:
        found = db.session.execute(
            select(AuthorizationCode, (AuthorizationCode.expires_at <= database_now()).label("expired")).where(
                AuthorizationCode.code_hash == hash_token(code)
            )
        ).first()
        if found is None or found.AuthorizationCode.client_id != client.get_client_id():
            return None
        row = found.AuthorizationCode
        if row.used_at is not None:
            # OAuth 2.1 §4.1.3: a second use must fail and should revoke what the first produced.
            revoke_grant(row.grant_id, "authorization_code_reuse")
            db.session.commit()
            return None
        if found.expired:
            return None
        return row

    def authenticate_user(self, authorization_code: AuthorizationCode) -> Grant:
        # Redeem atomically: of two concurrent redemptions exactly one updates the row.
        claimed = rows_affected(
            db.session.execute(
                update(AuthorizationCode)
                .where(AuthorizationCode.code_hash == authorization_code.code_hash, AuthorizationCode.used_at.is_(None))
                .values(used_at=utcnow())
            )
        )
        if claimed != 1:
            db.session.rollback()
            # A redemption that lost the race is a second use all the same (OAuth 2.1 §4.1.3): end what the
            # winner produced, as a later replay would (query_authorization_code).
            revoke_grant(authorization_code.grant_id, "authorization_code_reuse")
            db.session.commit()
            raise InvalidGrantError("the authorization code was already used")
        family = db.session.get(Grant, authorization_code.grant_id)
        if family is None or family.revoked_at is not None:
            db.session.rollback()
            raise InvalidGrantError("the authorization code was already used")
        return family

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        pass  # kept, marked used, so that a replay is recognised and revokes the family; `purge` deletes it


class RefreshTokenGrant(grants.RefreshTokenGrant):
    """Refresh with rotation; a replayed refresh token revokes its family, outside a short retry grace window.

    The grace rule: a rotated refresh token presented again within `REFRESH_GRACE_SECONDS` of its rotation,
    by the client it was issued to, is honoured once more with a fresh pair (its first response was lost,
    or two requests raced); any further presentation in the window is refused without revoking anything.
    Later than that, the replay is treated as theft and the whole grant is revoked.

    Both the rotation and the one grace retry are claimed by a conditional UPDATE (of concurrent requests
    exactly one changes the row, across workers and instances), and every time comparison runs in SQL on
    the database's clock, so instances with skewed clocks agree.
    """

    TOKEN_ENDPOINT_AUTH_METHODS = list(SUPPORTED_AUTH_METHODS)
    INCLUDE_NEW_REFRESH_TOKEN = True

    def validate_token_request(self) -> None:
        super().validate_token_request()
        check_token_resource(self, self.request.refresh_token.resource)

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        grace = self.server.settings.refresh_grace_seconds
        found = db.session.execute(
            select(
                Token,
                (Token.refresh_expires_at <= database_now()).label("expired"),
                (Token.rotated_at < database_now(-grace)).label("grace_over"),
            ).where(Token.refresh_token_hash == hash_token(refresh_token))
        ).first()
        if found is None:
            return None
        row = found.Token
        if row.revoked_at is not None or found.expired:
            return None
        family = db.session.get(Grant, row.grant_id)
        if family is None or family.revoked_at is not None:
            return None
        groups = groups_from_column(family.user_groups)
        if components().login_provider.reads_groups and groups_matter(self.server.settings, family.resource):
            groups = self._current_groups(family)
        if not grant_is_allowed(self.server.settings, family.user_email, groups, family.resource):
            # The allowlists as configured now hold for grants made before: a user taken off them is
            # logged out at the next refresh, not kept in by each refresh extending the last.
            log.info("user %s is no longer in the allowlist for %s", family.user_id, family.resource)
            revoke_grant(family.id, "user_not_allowed")
            db.session.commit()
            raise InvalidGrantError("this account is no longer allowed to use this server")
        if row.rotated_at is not None and found.grace_over:
            revoke_grant(row.grant_id, "refresh_token_reuse")
            db.session.commit()
            return None
        route = route_for_resource(self.server.settings, family.resource)
        if route is not None and route.credential.per_user and live_connection(route, family.user_id) is None:
            # The user's connection to the downstream ended (refused, disconnected, its provider said invalid_grant):
            # only the browser can make a new one. A refreshed token would get 401 at the MCP endpoint again, and
            # clients that refresh on 401 before they re-authorize would go round in circles.
            raise InvalidGrantError(
                "the connection to this MCP server's own sign-in has ended; authorize again to reconnect it"
            )
        return row

    def _current_groups(self, family: Grant) -> frozenset[str]:
        """The user's groups as the login provider states them now: its tokens refreshed for them (and stored), so
        the allowlists are rechecked with the groups of today, not those of the sign-in. A user the provider no
        longer vouches for (invalid_grant there, groups unreadable) ends the grant: invalid_grant here."""
        grant_id = family.id
        # End the read transaction before the provider call: none is held open across it, and SQLite (WAL) would
        # refuse this session's rotation write on a snapshot older than the lease's writes.
        db.session.commit()
        try:
            access = refresh_provider_access(current_app, grant_id, 0, regroup=True)
        except LoginRequired as error:
            if isinstance(error, UnreadableGrant):
                revoke_unreadable_grant(grant_id)
            raise InvalidGrantError(safe_description(f"{error}; sign in again")) from None
        except ProviderUnavailable as error:
            raise TemporarilyUnavailableError(safe_description(str(error)), error.retry_after) from None
        return access.groups if access.groups is not None else groups_from_column(family.user_groups)

    def authenticate_user(self, refresh_token: Token) -> Grant | None:
        """Claim this use of the refresh token: its rotation, else the grace window's one retry, else refuse.

        Runs after every check of the request, just before the new pair is issued, so a refused request
        (another client, a wrong scope or resource) uses nothing up."""
        live = (Token.id == refresh_token.id, Token.revoked_at.is_(None))
        rotated = rows_affected(
            db.session.execute(update(Token).where(*live, Token.rotated_at.is_(None)).values(rotated_at=database_now()))
        )
        if rotated != 1:
            grace = self.server.settings.refresh_grace_seconds
            retried = rows_affected(
                db.session.execute(
                    update(Token)
                    .where(*live, Token.grace_used_at.is_(None), Token.rotated_at >= database_now(-grace))
                    .values(grace_used_at=database_now())
                )
            )
            if retried != 1:
                db.session.rollback()
                log.info("refresh token of grant %s presented again after its grace retry", refresh_token.grant_id)
                raise InvalidGrantError("this refresh token was already used; use the one issued with it")
            metrics.REFRESH_GRACE.inc()
        # Not committed here: the claim commits with the new pair (store_token), so a database that refuses the
        # pair (disk full, gone) rolls the claim back too, and the client's retry finds its token unspent. Between
        # the two only Authlib's token generation runs (no network call), so the row lock is held briefly.
        return db.session.get(Grant, refresh_token.grant_id)

    def revoke_old_credential(self, refresh_token: Token) -> None:
        pass  # rotation was claimed in authenticate_user, before the new pair was issued


class Revocation(RevocationEndpoint):
    """RFC 7009. Revoking either token of a pair ends the whole grant: it is how a client logs out."""

    CLIENT_AUTH_METHODS = list(SUPPORTED_AUTH_METHODS)

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        digest = hash_token(token_string)
        return db.session.scalar(
            select(Token).where(or_(Token.access_token_hash == digest, Token.refresh_token_hash == digest))
        )

    def revoke_token(self, token: Token, request) -> None:
        revoke_grant(token.grant_id, "revoked_by_client")
        db.session.commit()


class IssuerIdentification(IssuerParameter):
    """RFC 9207 `iss` on authorization responses (the MCP Python SDK 2.x rejects a missing one)."""

    def __init__(self, issuer: str):
        self.issuer = issuer

    def get_issuer(self) -> str:
        return self.issuer


class AuthorizationServer(FlaskAuthorizationServer):
    """Authlib's Flask authorization server, wired to our models and settings."""

    def __init__(self, app: Flask, settings: Settings):
        self.settings = settings
        super().__init__(app, query_client=load_client, save_token=self.store_token)
        self.scopes_supported = list(app.config["OAUTH_SCOPES_SUPPORTED"])
        self.register_token_generator("default", self.generate_bearer_token)
        self.register_grant(AuthorizationCodeGrant, [S256CodeChallenge(required=True)])
        self.register_grant(RefreshTokenGrant)
        self.register_endpoint(Revocation)
        self.register_extension(IssuerIdentification(settings.issuer))
        self.register_endpoint(ClientRegistration)
        components(app).authorization_server = self

    def create_oauth2_request(self, request):
        if isinstance(request, OAuth2Request):
            return request
        return super().create_oauth2_request(request)

    def handle_error_response(self, request, error):
        if error.error == "invalid_client":
            error.status_code = 401  # RFC 6749 §5.2; Authlib answers 400 when no Authorization header was sent
        return super().handle_error_response(request, error)

    def generate_bearer_token(
        self, grant_type: str, client, user=None, scope=None, expires_in=None, include_refresh_token: bool = True
    ) -> dict:
        token = {"token_type": "Bearer", "access_token": new_token(), "expires_in": self.settings.access_token_ttl}
        if scope:
            token["scope"] = scope
        if include_refresh_token:
            token["refresh_token"] = new_token()
        return token

    def store_token(self, token: dict, request) -> Token:
        family: Grant = request.user
        row = Token(
            grant_id=family.id,
            client_id=request.client.get_client_id(),
            user_id=family.user_id,
            scope=token.get("scope", ""),
            resource=family.resource,
            access_token_hash=hash_token(token["access_token"]),
            refresh_token_hash=hash_token(token["refresh_token"]) if token.get("refresh_token") else None,
            # Stamped by the database's clock, which every instance compares against (see RefreshTokenGrant).
            issued_at=database_now(),
            access_expires_at=database_now(token["expires_in"]),
            refresh_expires_at=database_now(self.settings.refresh_token_ttl) if token.get("refresh_token") else None,
        )
        db.session.add(row)
        db.session.commit()
        metrics.TOKENS_ISSUED.labels(request.payload.grant_type or "unknown").inc()
        set_request_user(family.user_id)
        set_request_client(row.client_id)
        audit.record_for_grant(
            "token_refreshed" if request.payload.grant_type == "refresh_token" else "token_issued",
            family,
            "succeeded",
            token_id=row.id,
        )
        return row

    def metadata(self) -> dict:
        """RFC 8414 metadata; every URL derives from PUBLIC_URL, never from the request."""
        issuer = self.settings.issuer
        methods = list(SUPPORTED_AUTH_METHODS)
        return {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "registration_endpoint": f"{issuer}/register",
            "revocation_endpoint": f"{issuer}/revoke",
            "scopes_supported": self.scopes_supported,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(SUPPORTED_GRANT_TYPES),
            "token_endpoint_auth_methods_supported": methods,
            "revocation_endpoint_auth_methods_supported": methods,
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
            "client_id_metadata_document_supported": True,
            # RFC 8414 §2: the keys of what this issuer signs, the identity assertions routes send downstream.
            **(
                {"jwks_uri": f"{issuer}/.well-known/jwks.json"}
                if any(route.identity_assertion_header for route in self.settings.routes)
                else {}
            ),
        }
