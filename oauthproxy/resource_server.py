"""The protected MCP endpoints: RFC 9728 metadata, Bearer validation with an in-process cache, challenges, Origin, CORS."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from flask import Flask, Response, current_app, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.routing import PathConverter
from werkzeug.wrappers import Response as BaseResponse

from oauthproxy.clock import database_now
from oauthproxy.components import components, current_application
from oauthproxy.config import Settings
from oauthproxy.consent import consent_cookie_name
from oauthproxy.crypto import hash_token
from oauthproxy.downstream_connections import (
    REFUSED,
    ConnectionAccess,
    ConnectionRequired,
    connection_from_row,
    fresh_connection,
    refuse_sent_credential,
    with_connection,
)
from oauthproxy.downstream_credentials import Caller
from oauthproxy.errors import json_error
from oauthproxy.groups import GROUPS_HEADER, MAX_GROUPS_HEADER_BYTES, groups_from_column, groups_header_fits
from oauthproxy.identity_assertions import caller_with_assertion, signing_unavailable
from oauthproxy.logs import set_request_client, set_request_user
from oauthproxy.mcp_sessions import SESSION_NOT_FOUND, SessionBindings
from oauthproxy.models import Grant, Token, db
from oauthproxy.provider_tokens import (
    KeyedLocks,
    LoginRequired,
    ProviderAccess,
    ProviderUnavailable,
    UnreadableGrant,
    open_grant_secret,
    refresh_provider_access,
    revoke_unreadable_grant,
)
from oauthproxy.proxy import DownstreamError, DownstreamProxy
from oauthproxy.routes import Route
from oauthproxy.signing_keys import SigningUnavailable
from oauthproxy.urls import canonical_resource

log = logging.getLogger(__name__)

METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]
#: Request headers a browser client may send (T-1); `Mcp-Param-*` (2026-07-28) are matched by prefix.
CORS_ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "accept",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
        "mcp-method",
        "mcp-name",
    }
)
#: T-6: a browser client must read the challenge and the session headers.
CORS_EXPOSED_HEADERS = "WWW-Authenticate, Mcp-Session-Id, MCP-Protocol-Version"
#: RFC 6750 §3: quoted-string values of the challenge may not contain `"` or `\`.
_UNQUOTABLE = re.compile(r'["\\\x00-\x1f\x7f]')
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)


@dataclass(frozen=True)
class ValidatedToken:
    """What one access token stands for; cached in memory for a few seconds after a database check."""

    token_id: int
    grant_id: int
    scopes: frozenset[str]
    resource: str  # canonical form (RFC 8707)
    expires_at: float  # epoch seconds
    caller: Caller
    upstream: ProviderAccess
    #: The user's own credential on a per-user route (downstream_connections.py), loaded with the token; else None.
    connection: ConnectionAccess | None = field(default=None, repr=False)
    client_id: str = ""  # the MCP client the token was issued to (the identity assertion's client_id)


class TokenCache:
    """A bounded LRU of recently validated tokens (keyed by hash), each answered for at most `ttl` seconds.

    This is what keeps a database round trip off every MCP request. A revoked grant leaves every worker's cache
    through the revocation feed (revocation_feed.py) within a second; while a worker's feed is down, its cached
    tokens are trusted for at most `ttl` seconds (default 30; `TOKEN_CACHE_TTL=0` turns caching off), the bound
    before the feed existed. An entry never outlives its token's own expiry.
    """

    def __init__(self, ttl: int, max_entries: int):
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: OrderedDict[str, tuple[float, ValidatedToken]] = OrderedDict()
        self._keys_of_grant: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        #: Bumped by every forget and flush: a token read from the database before a revocation arrived must not be
        #: cached after it (`put` compares it with the value read before the query).
        self.generation = 0

    def get(self, key: str) -> ValidatedToken | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            if item[0] <= time.monotonic():
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return item[1]

    def put(self, key: str, token: ValidatedToken, generation: int) -> None:
        """Cache `token`, read from the database when `self.generation` was `generation`: unless a revocation (or a
        flush) came in meanwhile, which the read may predate."""
        if self.ttl <= 0:
            return
        lifetime = min(self.ttl, token.expires_at - time.time())
        with self._lock:
            if generation != self.generation:
                return
            self._drop(key)
            self._entries[key] = (time.monotonic() + lifetime, token)
            self._keys_of_grant.setdefault(token.grant_id, set()).add(key)
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def update(self, key: str, token: ValidatedToken) -> None:
        """Replace a cached entry (a refreshed upstream token) without extending how long it is trusted; an entry
        forgotten meanwhile stays forgotten."""
        with self._lock:
            previous = self._entries.get(key)
            if previous is not None and previous[1].grant_id == token.grant_id:
                self._entries[key] = (previous[0], token)

    def forget_grants(self, grant_ids: Iterable[int]) -> None:
        with self._lock:
            self.generation += 1
            for grant_id in grant_ids:
                for key in self._keys_of_grant.get(grant_id, set()).copy():
                    self._drop(key)

    def forget_grant(self, grant_id: int) -> None:
        self.forget_grants((grant_id,))

    def clear(self) -> None:
        """Forget everything: after the revocation feed may have missed announcements."""
        with self._lock:
            self.generation += 1
            self._entries.clear()
            self._keys_of_grant.clear()

    def _drop(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            keys = self._keys_of_grant.get(item[1].grant_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._keys_of_grant[item[1].grant_id]

    def forget_user(self, user_id: str, resource: str) -> None:
        """Drop the user's tokens for one resource (canonical form): their connection to it changed."""
        with self._lock:
            self.generation += 1
            for key in [
                key
                for key, (_, token) in self._entries.items()
                if token.caller.user_id == user_id and token.resource == resource
            ]:
                self._drop(key)

    def __len__(self) -> int:
        return len(self._entries)


def forget_grant(app: Flask, grant_id: int) -> None:
    """Drop a grant's tokens from this worker's cache (for code that revokes a grant in this process)."""
    cache: TokenCache | None = getattr(components(app), "token_cache", None)
    if cache is not None:
        cache.forget_grant(grant_id)


class TokenRejected(Exception):
    def __init__(self, description: str):
        super().__init__(description)
        self.description = description


def _settings() -> Settings:
    return current_app.config["SETTINGS"]


def load_token(token: str, route: Route) -> tuple[str, ValidatedToken]:
    """Validate an access token: from the cache, else one database query joining the token and its grant."""
    key = hash_token(token)
    cache: TokenCache = components().token_cache
    validated = cache.get(key)
    if validated is None:
        components().revocation_feed.listen_on_first_use()
        generation = cache.generation  # before the query: a revocation arriving during it keeps the row out
        query = (
            select(
                Token.id,
                Token.grant_id,
                Token.client_id,
                Token.scope,
                Token.resource,
                Token.access_expires_at,
                Token.revoked_at,
                Grant.revoked_at.label("grant_revoked_at"),
                Grant.user_id,
                Grant.user_email,
                Grant.user_name,
                Grant.user_groups,
                Grant.upstream_access_token,
                Grant.upstream_expires_at,
                database_now().label("database_now"),
            )
            .join(Grant, Grant.id == Token.grant_id)
            .where(Token.access_token_hash == key)
        )
        if route.credential.per_user:
            query = with_connection(query, route)  # the user's credential for the route, in the same round trip
        row = db.session.execute(query).first()
        db.session.rollback()  # end the read transaction now; a stream may outlive this request's context
        if row is None:
            raise TokenRejected("the access token is not recognised")
        if row.revoked_at is not None or row.grant_revoked_at is not None:
            raise TokenRejected("the access token was revoked")
        groups = groups_from_column(row.user_groups)
        if not _settings().user_is_allowed(row.user_email, groups):  # the global allowlist as configured now
            raise TokenRejected("this account is no longer allowed to use this server")
        if canonical_resource(row.resource) != canonical_resource(route.resource):
            # Checked before caching, so a cached entry always belongs to its own route (and carries what
            # that route forwards).
            raise TokenRejected("the access token was issued for another resource")
        upstream_token = None
        if row.upstream_access_token and route.forwards_upstream_token:
            try:
                upstream_token = open_grant_secret(
                    current_application(), row.grant_id, "upstream_access_token", row.upstream_access_token
                )
            except UnreadableGrant as error:
                revoke_unreadable_grant(row.grant_id)
                raise TokenRejected(f"{error}; sign in again") from None
        connection = None
        if route.credential.per_user:
            try:
                connection = connection_from_row(current_application(), route, row.user_id, row)
            except ConnectionRequired as error:
                raise TokenRejected(str(error)) from None
        # Expiry as the time left on the database's clock, which stamped it (clock.py): a skewed instance clock
        # neither ends the token early nor stretches it.
        validated = ValidatedToken(
            token_id=row.id,
            grant_id=row.grant_id,
            scopes=frozenset((row.scope or "").split()),
            resource=canonical_resource(row.resource),
            expires_at=time.time() + (row.access_expires_at - row.database_now).total_seconds(),
            caller=Caller(
                row.user_id,
                row.user_email,
                row.user_name,
                upstream_token,
                connection.secret if connection is not None else None,
                groups,
            ),
            upstream=ProviderAccess(upstream_token, row.upstream_expires_at),
            connection=connection,
            client_id=row.client_id,
        )
        if validated.expires_at > time.time():
            cache.put(key, validated, generation)
    if validated.expires_at <= time.time():
        raise TokenRejected("the access token has expired")
    # RFC 8707 / MCP RS-3: the audience must be this resource; a token for another route is refused.
    if validated.resource != canonical_resource(route.resource):
        raise TokenRejected("the access token was issued for another resource")
    return key, validated


# -- responses ------------------------------------------------------------------------------------


def _quoted(value: str) -> str:
    return '"' + _UNQUOTABLE.sub("", value) + '"'


def challenge_scopes(route: Route) -> tuple[str, ...]:
    """What a client should ask for: the route's required scopes, else every scope the resource offers."""
    return route.required_scopes or resource_scopes()


def resource_scopes() -> tuple[str, ...]:
    # AS-15: offline_access is a refresh-token request to the AS, not a scope of the resource.
    return tuple(s for s in current_app.config["OAUTH_SCOPES_SUPPORTED"] if s != "offline_access")


def www_authenticate(
    route: Route, error: str | None = None, description: str | None = None, scopes: tuple[str, ...] | None = None
) -> str:
    """RFC 6750 §3 challenge with an absolute RFC 9728 `resource_metadata` URL (RS-2, RS-4)."""
    params = []
    if error:
        params.append(f"error={_quoted(error)}")
        if description:
            params.append(f"error_description={_quoted(description)}")
    scopes = challenge_scopes(route) if scopes is None else scopes
    if scopes:
        params.append(f"scope={_quoted(' '.join(scopes))}")
    params.append(f"resource_metadata={_quoted(_settings().public_url + route.metadata_path)}")
    return "Bearer " + ", ".join(params)


def _sessions() -> SessionBindings:
    return components().mcp_sessions


def _session_not_found() -> Response:
    response = jsonify(SESSION_NOT_FOUND)
    response.status_code = 404
    response.headers["Cache-Control"] = "no-store"
    return response


def _database_unavailable() -> Response:
    db.session.rollback()
    log.warning("MCP session binding: the database is unavailable")
    return json_error(
        503, "temporarily_unavailable", "the session store is unavailable; retry shortly", {"Retry-After": "5"}
    )


def unauthorized(route: Route, description: str | None = None, token_sent: bool = True) -> Response:
    """401: no token (no error code, RFC 6750 §3.1) or a token that is bad, expired, revoked or for elsewhere."""
    if not token_sent:
        return json_error(
            401,
            "unauthorized",
            "this MCP endpoint requires a Bearer access token",
            {"WWW-Authenticate": www_authenticate(route)},
        )
    description = description or "the access token is invalid"
    return json_error(
        401, "invalid_token", description, {"WWW-Authenticate": www_authenticate(route, "invalid_token", description)}
    )


def _cors_headers(origin: str | None) -> dict[str, str]:
    if not origin:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": CORS_EXPOSED_HEADERS,
        "Vary": "Origin",
    }


def _preflight(origin: str) -> Response:
    requested = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
    allowed = [h for h in requested if h.lower() in CORS_ALLOWED_HEADERS or h.lower().startswith("mcp-param-")]
    response = Response(status=204)
    response.headers.update(
        {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": ", ".join(allowed or sorted(CORS_ALLOWED_HEADERS)),
            "Access-Control-Max-Age": "86400",
            "Vary": "Origin",
        }
    )
    return response


# -- views ----------------------------------------------------------------------------------------


def protected_resource_metadata(route_name: str) -> Response:
    """RFC 9728 §2-3: what this resource is and which authorization server issues its tokens."""
    route = components().routes[route_name]
    settings = _settings()
    response = jsonify(
        {
            "resource": route.resource,
            "authorization_servers": [settings.issuer],  # byte-identical to the AS metadata's issuer (AS-1)
            "scopes_supported": list(resource_scopes()),
            "bearer_methods_supported": ["header"],
            "resource_name": route.name,
        }
    )
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


def mcp_endpoint(route_name: str, subpath: str = "") -> BaseResponse:
    """Every method on a route's path and below: check Origin and token, then stream the request through."""
    route: Route = components().routes[route_name]
    settings = _settings()
    origin = request.headers.get("Origin")
    if origin is not None and not settings.proxy.origin_is_allowed(origin):
        # RS-6 / T-5: a present Origin that is not allowed is refused (DNS-rebinding defence).
        return json_error(403, "forbidden_origin", "requests from this Origin are not allowed")
    cors = _cors_headers(origin)
    if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
        return _preflight(origin)  # browsers send no credentials on a preflight
    response = _authorize_and_forward(route, settings)
    response.headers.update(cors)
    return response


def _authorize_and_forward(route: Route, settings: Settings) -> BaseResponse:
    header = request.headers.get("Authorization", "")
    if not header:
        return unauthorized(route, token_sent=False)
    match = _BEARER.match(header)
    if match is None:
        return unauthorized(route, "send the access token as: Authorization: Bearer <token>")
    try:
        key, validated = load_token(match.group(1), route)
    except TokenRejected as rejected:
        return unauthorized(route, rejected.description)
    except ProviderUnavailable as error:  # the grant's secrets need a key this instance lacks
        return json_error(503, "temporarily_unavailable", str(error), {"Retry-After": str(error.retry_after)})
    set_request_user(validated.caller.user_id)  # the access log names who made the request
    set_request_client(validated.client_id)

    missing = [scope for scope in route.required_scopes if scope not in validated.scopes]
    if missing:
        # RS-4: name every scope needed; clients re-authorize with the union of old and new.
        description = f"this resource requires the scope(s): {' '.join(route.required_scopes)}"
        return json_error(
            403,
            "insufficient_scope",
            description,
            {"WWW-Authenticate": www_authenticate(route, "insufficient_scope", description, route.required_scopes)},
        )
    if not route.user_is_allowed(validated.caller.email, validated.caller.groups):
        return json_error(403, "access_denied", f"this account is not allowed to use {route.path}")
    if route.groups_header and not groups_header_fits(validated.caller.groups):
        # Never a cut list: the downstream may decide by a group it would not see.
        return json_error(
            403,
            "access_denied",
            f"this account is in too many groups to pass on to {route.path} ({GROUPS_HEADER} over "
            f"{MAX_GROUPS_HEADER_BYTES} bytes)",
        )

    # RS-5: a session belongs to the user who opened it. Stateless requests (no session id) skip this entirely.
    session_id = request.environ.get("HTTP_MCP_SESSION_ID")
    if session_id is not None:
        try:
            allowed = _sessions().allows(route.name, session_id, validated.caller.user_id)
        except SQLAlchemyError:
            return _database_unavailable()
        if not allowed:
            return _session_not_found()

    if route.forwards_upstream_token and validated.upstream.needs_refresh(settings.proxy.upstream_refresh_skew):
        try:
            upstream = refresh_provider_access(
                current_application(), validated.grant_id, settings.proxy.upstream_refresh_skew
            )
        except LoginRequired as error:
            if isinstance(error, UnreadableGrant):
                revoke_unreadable_grant(validated.grant_id)
            forget_grant(current_application(), validated.grant_id)
            return unauthorized(route, str(error) + "; sign in again")
        except ProviderUnavailable as error:
            return json_error(503, "temporarily_unavailable", str(error), {"Retry-After": str(error.retry_after)})
        validated = replace(
            validated, upstream=upstream, caller=replace(validated.caller, upstream_access_token=upstream.access_token)
        )
        components().token_cache.update(key, validated)

    if validated.connection is not None:
        try:
            connection = fresh_connection(
                current_application(),
                route,
                validated.caller.user_id,
                validated.connection,
                settings.proxy.upstream_refresh_skew,
            )
        except ConnectionRequired as error:
            forget_grant(current_application(), validated.grant_id)
            return unauthorized(route, str(error))
        except ProviderUnavailable as error:
            return json_error(503, "temporarily_unavailable", str(error), {"Retry-After": str(error.retry_after)})
        if connection is not validated.connection:
            validated = replace(
                validated, connection=connection, caller=replace(validated.caller, connection_secret=connection.secret)
            )
            components().token_cache.update(key, validated)

    caller = validated.caller
    if route.identity_assertion_header:  # identity_assertions.py: a signed JWT of who calls, reused per grant
        try:
            caller = caller_with_assertion(route, validated.grant_id, validated.client_id, caller)
        except SigningUnavailable as error:
            return signing_unavailable(error)
    proxy: DownstreamProxy = components().downstream_proxy
    try:
        response = proxy.forward(route, request.environ, request.stream, caller)
    except DownstreamError as error:
        headers = {"X-Downstream": route.name}
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return json_error(error.status, error.error, error.description, headers)
    answered = response.mcp_session_id
    if session_id is not None or answered is not None:
        try:
            _sessions().observe(
                route.name, request.method, session_id, answered, response.status_code, validated.caller.user_id
            )
        except SQLAlchemyError:
            response.close()  # a session we could not bind is not handed out
            return _database_unavailable()
    if response.status_code == 401 and validated.connection is not None:
        # The user's own credential was refused (revoked, expired, a changed API key): ask for it again. The client's
        # re-authorization runs the connect step, since the connection is no longer live.
        response.close()
        try:
            refuse_sent_credential(current_application(), route, validated.caller.user_id, validated.connection)
        except SQLAlchemyError:
            return _database_unavailable()
        forget_grant(current_application(), validated.grant_id)
        return unauthorized(route, REFUSED)
    if response.status_code == 401:
        # The downstream refused the credential we sent; its challenge would point the client at an
        # authorization server it has nothing to do with. Every 401 here carries our own (RS-2).
        response.headers["WWW-Authenticate"] = www_authenticate(
            route, "invalid_token", "the downstream MCP server refused the request's credentials"
        )
    elif response.status_code == 403:
        response.headers.pop("WWW-Authenticate", None)
    return response


class BelowRoute(PathConverter):
    """Whatever follows a route's path and `/`, empty segments too (Werkzeug's `path` refuses a leading `/`): so that
    `/mcp//x` reaches the route and gets its 400 for an empty segment (forwarding.confined_suffix), not a 404."""

    regex = ".+?"
    part_isolating = False  # else Werkzeug infers it from the regex, which names no `/`


def init_resource_server(app: Flask, settings: Settings) -> None:
    """Register a protected resource (metadata and endpoint) for every route."""
    routes = {route.name: route for route in settings.routes}
    services = components(app)
    services.routes = routes
    services.token_cache = TokenCache(settings.proxy.token_cache_ttl, settings.proxy.token_cache_size)
    services.refresh_locks = KeyedLocks()
    services.mcp_sessions = SessionBindings(settings.proxy.session_idle_timeout)
    services.downstream_proxy = DownstreamProxy(
        settings.proxy,
        settings.public_url,
        frozenset({app.config["SESSION_COOKIE_NAME"], consent_cookie_name(settings)}),
        settings.ca_bundle,
    )
    app.url_map.converters["below"] = BelowRoute
    for index, route in enumerate(settings.routes):
        defaults = {"route_name": route.name}
        app.add_url_rule(
            route.metadata_path,
            f"resource_metadata_{index}",
            protected_resource_metadata,
            defaults=defaults,
            methods=["GET"],
        )
        if index == 0 and route.path != "/":
            # RFC 9728 clients fall back to the root well-known URL; it describes the default resource.
            app.add_url_rule(
                "/.well-known/oauth-protected-resource",
                "resource_metadata_root",
                protected_resource_metadata,
                defaults=defaults,
                methods=["GET"],
            )
        endpoint = f"mcp_{index}"
        app.add_url_rule(
            route.path, endpoint, mcp_endpoint, defaults=defaults, methods=METHODS, provide_automatic_options=False
        )
        if route.path != "/":
            app.add_url_rule(
                route.path + "/",
                endpoint + "_slash",
                mcp_endpoint,
                defaults=defaults,
                methods=METHODS,
                provide_automatic_options=False,
            )
            app.add_url_rule(
                route.path + "/<below:subpath>",
                endpoint + "_sub",
                mcp_endpoint,
                defaults=defaults,
                methods=METHODS,
                provide_automatic_options=False,
            )
