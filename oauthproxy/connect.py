"""The connect step: before an MCP client gets its code, the user connects the route's downstream (its sign-in, or a key).

A route with a per-user credential (`credential = "oauth"` or `"user_api_key"`) needs each user's own credential for
its downstream. When a login for such a route finds none, `connection_step` keeps the login sealed in a
`PendingConnection` and sends the browser to `/connect/<token>`; nothing is stored as a grant yet. The user then signs
in at the downstream's authorization server (`start_connection_hop`, then `finish_connection_hop` at
CONNECT_CALLBACK_PATH) or types their key (`submit_api_key`); only then are the connection, the grant and the client's
code written, exactly as a login without this step writes them. Every single-use value is claimed by one
DELETE ... RETURNING and bound to the browser that logged in (as the login's own `state` is: MCP authorization P-5).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import requests
from flask import current_app, redirect, session
from sqlalchemy import delete, select
from werkzeug.wrappers import Response as BaseResponse

from oauthproxy import audit
from oauthproxy.allowlists import grant_is_allowed, route_for_resource
from oauthproxy.clock import database_now
from oauthproxy.components import components
from oauthproxy.config import Settings
from oauthproxy.connection_providers import CONNECT_CALLBACK_PATH, ConnectionProvider, connection_provider
from oauthproxy.crypto import DecryptionError, hash_token, new_token
from oauthproxy.downstream_connections import live_connection, store_connection
from oauthproxy.downstream_credentials import IDENTITY_HEADERS, header_value
from oauthproxy.login import (
    EXCHANGE_ERRORS,
    AuthorizationPageError,
    AuthorizationRedirectError,
    ValidatedAuthorization,
    error_redirect_url,
    store_grant,
    validate_authorization_request,
)
from oauthproxy.logs import set_request_user
from oauthproxy.mcp_initialize import initialize_request
from oauthproxy.models import DownstreamConnection, PendingConnection, db
from oauthproxy.providers import ProviderError, ProviderIdentity, ProviderTokens, error_from_callback
from oauthproxy.routes import Route

log = logging.getLogger(__name__)

#: The page token and the hop's `state` are ours (43 characters) or the provider library's; anything else is unknown.
TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
#: The longest key accepted: real API keys are tens to a few hundred characters, and it travels in a header.
MAX_API_KEY_CHARACTERS = 4096
#: Trying a key: the downstream's `initialize` answer (its headers) within this many seconds.
VERIFY_READ_TIMEOUT = 10.0
#: The MCP `initialize` a key is tried with.
INITIALIZE_REQUEST = initialize_request("oauthproxy key check")

EXPIRED_TITLE = "This page has expired"
EXPIRED_MESSAGE = "This sign-in step has expired or was already used. Start again from your MCP client."


def _settings() -> Settings:
    return current_app.config["SETTINGS"]


def callback_url() -> str:
    """The connect hop's redirect URI: one for every route (connection_providers.CONNECT_CALLBACK_PATH)."""
    return _settings().public_url + CONNECT_CALLBACK_PATH


def known_connection(route: Route, user_id: str) -> DownstreamConnection | None:
    """The user's connection row for `route`, live or not (the page says when the last one was refused)."""
    return db.session.scalar(
        select(DownstreamConnection).where(
            DownstreamConnection.user_id == user_id, DownstreamConnection.route == route.name
        )
    )


@dataclass(frozen=True)
class PendingLogin:
    """A finished login kept sealed while the user connects: all `store_grant` needs, and the client's request."""

    request: dict[str, str]
    identity: ProviderIdentity
    tokens: ProviderTokens
    scopes: list[str]

    def to_json(self) -> str:
        return json.dumps(
            {
                "request": self.request,
                "identity": {
                    "id": self.identity.id,
                    "email": self.identity.email,
                    "name": self.identity.name,
                    "groups": sorted(self.identity.groups),
                },
                "tokens": {
                    "access_token": self.tokens.access_token,
                    "refresh_token": self.tokens.refresh_token,
                    "expires_at": self.tokens.expires_at.isoformat() if self.tokens.expires_at else None,
                },
                "scopes": self.scopes,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PendingLogin:
        data = json.loads(text)
        identity, tokens = data["identity"], data["tokens"]
        return cls(
            request=dict(data["request"]),
            identity=ProviderIdentity(
                id=identity["id"],
                email=identity["email"],
                name=identity["name"],
                # Sealed by this module only; an older pending login (before groups) has none.
                groups=frozenset(identity.get("groups", ())),
            ),
            tokens=ProviderTokens(
                access_token=tokens["access_token"],
                refresh_token=tokens["refresh_token"],
                expires_at=datetime.fromisoformat(tokens["expires_at"]) if tokens["expires_at"] else None,
            ),
            scopes=list(data["scopes"]),
        )


@dataclass(frozen=True)
class Pending:
    """A PendingConnection row as read (or claimed): plain values, usable after the row is gone."""

    state_hash: str
    browser_binding_hash: str
    route: str
    user_id: str
    client_id: str
    login: str
    secrets: str | None

    def open_login(self) -> PendingLogin:
        """The sealed login; a page when it cannot be opened (ENCRYPTION_KEY changed under it)."""
        try:
            return PendingLogin.from_json(
                components().secret_box.decrypt(self.login, f"pending-connection:{self.state_hash}:login")
            )
        except (DecryptionError, ValueError, KeyError, TypeError) as error:
            log.error("pending connection %s: its login cannot be opened: %s", self.state_hash[:12], error)
            raise AuthorizationPageError(
                400, "Sign-in failed", "This sign-in could not be completed. Start again from your MCP client."
            ) from None

    def open_secrets(self) -> dict[str, Any]:
        try:
            value = json.loads(
                components().secret_box.decrypt(self.secrets or "", f"pending-connection:{self.state_hash}:secrets")
            )
        except (DecryptionError, ValueError) as error:
            log.error("pending connection %s: its secrets cannot be opened: %s", self.state_hash[:12], error)
            return {}
        return value if isinstance(value, dict) else {}


_COLUMNS = (
    PendingConnection.state_hash,
    PendingConnection.browser_binding_hash,
    PendingConnection.route,
    PendingConnection.user_id,
    PendingConnection.client_id,
    PendingConnection.login,
    PendingConnection.secrets,
)


def _seal(value: str, state_hash: str, column: str) -> str:
    return components().secret_box.encrypt(value, f"pending-connection:{state_hash}:{column}")


def _store_pending(
    state_hash: str, browser_binding_hash: str, route: Route, login: PendingLogin, client_id: str, secrets: str | None
) -> None:
    """Add the row (the caller commits): the login sealed to its own state, alive PENDING_LOGIN_TTL from now."""
    db.session.add(
        PendingConnection(
            state_hash=state_hash,
            browser_binding_hash=browser_binding_hash,
            route=route.name,
            user_id=login.identity.id,
            client_id=client_id,
            login=_seal(login.to_json(), state_hash, "login"),
            secrets=_seal(secrets, state_hash, "secrets") if secrets is not None else None,
            expires_at=database_now(_settings().pending_login_ttl),
        )
    )


def _read_pending(value: str) -> Pending | None:
    """The unexpired row for a page token or state, without claiming it."""
    if not TOKEN_SHAPE.match(value):
        return None
    row = db.session.execute(
        select(*_COLUMNS).where(
            PendingConnection.state_hash == hash_token(value), PendingConnection.expires_at > database_now()
        )
    ).first()
    return Pending(*row) if row is not None else None


def _claim_pending(value: str) -> Pending | None:
    """Take the row exactly once: of two concurrent claims one DELETE returns it. Not committed: the caller commits."""
    if not TOKEN_SHAPE.match(value):
        return None
    row = db.session.execute(
        delete(PendingConnection)
        .where(PendingConnection.state_hash == hash_token(value), PendingConnection.expires_at > database_now())
        .returning(*_COLUMNS)
        .execution_options(synchronize_session=False)
    ).first()
    return Pending(*row) if row is not None else None


def _check_browser(pending: Pending, browser_id: str) -> None:
    # The step must be finished in the browser that logged in, or a link could hand someone else's login over.
    if hash_token(browser_id) != pending.browser_binding_hash:
        raise AuthorizationPageError(
            400,
            "Sign-in failed",
            "This sign-in was started in another browser. Start again from your MCP client in this browser.",
        )


def _route_of(pending: Pending) -> Route:
    route = components().routes.get(pending.route)
    if route is None or not route.credential.per_user:
        raise AuthorizationPageError(
            400,
            "Sign-in failed",
            "This MCP server's configuration changed during the sign-in. Start again from your MCP client.",
        )
    return route


def browser_id() -> str:
    """The random value in this browser's session cookie that pending sign-ins are bound to ("" when none)."""
    value = session.get("browser_id")
    return value if isinstance(value, str) else ""


# --- the login's side: begin the step --------------------------------------------------------------------------------


def connection_step(
    validated: ValidatedAuthorization, identity: ProviderIdentity, tokens: ProviderTokens, scopes: list[str]
) -> BaseResponse | None:
    """After the login's checks: the redirect to the connect page when the route needs a credential this user has
    not given yet, else None (the login goes on to its grant and code)."""
    route = route_for_resource(_settings(), validated.resource)
    if route is None or not route.credential.per_user or live_connection(route, identity.id) is not None:
        return None
    login = PendingLogin(request=validated.params, identity=identity, tokens=tokens, scopes=scopes)
    return redirect(begin_connection(route, login, validated.client.client_id, browser_id()))


def begin_connection(route: Route, login: PendingLogin, client_id: str, browser: str) -> str:
    """Keep the login sealed for the connect page; return that page's URL (its token is single-use)."""
    token = new_token()
    _store_pending(hash_token(token), hash_token(browser), route, login, client_id, None)
    db.session.commit()
    log.info("user %s must connect route %s before the client gets its code", login.identity.id, route.name)
    return f"{_settings().public_url}/connect/{token}"


# --- the page ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectPage:
    """What the connect page shows: the route, who is signing in, where, and whether a last credential was refused."""

    token: str
    route: Route
    login: PendingLogin
    provider_name: str
    refused: bool


def open_connect_page(token: str, browser: str) -> ConnectPage:
    """The page for `token`, checked (alive, this browser); a page error otherwise. Claims nothing."""
    pending = _read_pending(token)
    if pending is None:
        raise AuthorizationPageError(400, EXPIRED_TITLE, EXPIRED_MESSAGE)
    _check_browser(pending, browser)
    route = _route_of(pending)
    login = pending.open_login()
    previous = known_connection(route, login.identity.id)
    return ConnectPage(
        token=token,
        route=route,
        login=login,
        provider_name=provider_name(route),
        refused=previous is not None and previous.refused_at is not None,
    )


def provider_name(route: Route) -> str:
    """What the page calls the downstream's sign-in: its configured name, or its provider's, or the server's host."""
    if route.oauth is None:
        return route.name
    if route.oauth.display_name:
        return route.oauth.display_name
    try:
        return connection_provider(route).display_name or route.name
    except ProviderError:
        # Discovery can fail now and work at Continue; the page still has something to call it.
        return route.name


def cancel_connection(token: str, browser: str) -> str:
    """The user cancelled: end the sign-in and return the client's access_denied redirect (RFC 6749 §4.1.2.1)."""
    pending = _read_pending(token)
    if pending is None:
        raise AuthorizationPageError(400, EXPIRED_TITLE, EXPIRED_MESSAGE)
    _check_browser(pending, browser)
    claimed = _claim_pending(token)
    db.session.commit()
    if claimed is None:
        raise AuthorizationPageError(400, EXPIRED_TITLE, EXPIRED_MESSAGE)
    validated = validate_authorization_request(claimed.open_login().request)
    log.info("user %s cancelled connecting route %s", claimed.user_id, claimed.route)
    return error_redirect_url(
        validated.redirect_uri, "access_denied", "the user did not connect the MCP server's account", validated.state
    )


# --- credential "oauth": the hop to the downstream's authorization server -------------------------------------------


class ConnectRetry(Exception):
    """The step cannot go on now, but its page stays usable (nothing was claimed): shown again with this message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def start_connection_hop(token: str, browser: str) -> str:
    """Continue: the URL of the downstream's authorization server, with a new single-use `state` for this browser.

    The page's row is replaced by one keyed by that `state` (one transaction), with the PKCE verifier sealed in it."""
    pending = _read_pending(token)
    if pending is None:
        raise AuthorizationPageError(400, EXPIRED_TITLE, EXPIRED_MESSAGE)
    _check_browser(pending, browser)
    route = _route_of(pending)
    try:
        downstream = connection_provider(route)
        scopes = list(downstream.scopes)
        url, hop_secrets = downstream.provider.create_authorization_url(
            callback_url(), scopes, downstream.authorize_params
        )
        metadata = downstream.provider.load_metadata()
    except ProviderError as error:
        log.warning("route %s: cannot start the connect hop (%s): %s", route.name, error.kind, error.description)
        if error.kind == "transient":
            raise ConnectRetry(
                503, "The server's sign-in cannot be reached right now. Try again in a moment."
            ) from None
        raise ConnectRetry(
            502, "The server's sign-in is not set up correctly. Ask the operator of this MCP server, or cancel."
        ) from None
    claimed = _claim_pending(token)
    if claimed is None:
        db.session.rollback()
        raise AuthorizationPageError(400, EXPIRED_TITLE, EXPIRED_MESSAGE)
    login = claimed.open_login()
    _store_pending(
        hash_token(hop_secrets["state"]),
        claimed.browser_binding_hash,
        route,
        login,
        claimed.client_id,
        json.dumps(
            {
                **hop_secrets,
                "scopes": scopes,
                # Every route's server returns to the one /connect/callback: RFC 9207's `iss` says which one answered.
                "issuer": metadata.get("issuer"),
                "issuer_in_response": metadata.get("authorization_response_iss_parameter_supported") is True,
            }
        ),
    )
    db.session.commit()
    return url


def answered_by_another_server(args: dict[str, str], hop_secrets: dict) -> bool:
    """RFC 9207 §2.4: the `iss` of the answer must be the issuer the hop went to, and present where that server says
    it sends one. Without this, a route's authorization server could send the browser on to another route's server
    with its own state and PKCE challenge, and have the victim's code there redeemed to itself (a mix-up attack)."""
    issuer, required = hop_secrets.pop("issuer", None), hop_secrets.pop("issuer_in_response", False)
    answered = args.get("iss")
    if answered is None:
        return bool(required)
    return not isinstance(issuer, str) or answered != issuer


def finish_connection_hop(args: dict[str, str], browser: str) -> BaseResponse:
    """The downstream's authorization server sent the user back: claim the state once, redeem the code, store the
    connection, then the grant and the client's code."""
    state = args.get("state")
    if not state:
        raise AuthorizationPageError(
            400, "Sign-in failed", "The server's answer has no state. Start again from your MCP client."
        )
    claimed = _claim_pending(state)
    db.session.commit()
    if claimed is None:
        raise AuthorizationPageError(400, EXPIRED_TITLE, EXPIRED_MESSAGE)
    _check_browser(claimed, browser)
    login = claimed.open_login()
    validated = validate_authorization_request(login.request)
    set_request_user(login.identity.id)
    route = _route_of(claimed)

    def client_error(error: str, description: str) -> AuthorizationRedirectError:
        return AuthorizationRedirectError(validated.redirect_uri, error, description, validated.state)

    hop_secrets = claimed.open_secrets()
    scopes = hop_secrets.pop("scopes", [])
    if answered_by_another_server(args, hop_secrets):
        log.warning(
            "user %s: the connect hop for route %s was answered by another issuer", login.identity.id, route.name
        )
        raise client_error("server_error", "the answer came from another authorization server than the one asked")
    if args.get("error") or not args.get("code"):
        if not args.get("error"):
            raise client_error("server_error", "the MCP server's sign-in returned no code")
        refused = error_from_callback(args)
        kind = refused.kind if refused is not None else "access_denied"
        log.info("user %s: the connect hop for route %s ended with %s", login.identity.id, route.name, kind)
        error = {"access_denied": "access_denied", "transient": "temporarily_unavailable"}.get(kind, "server_error")
        raise client_error(error, "signing in to the MCP server's account failed")
    try:
        downstream = connection_provider(route)
        tokens, token_response = downstream.provider.redeem_code(
            args["code"], callback_url(), hop_secrets, downstream.token_params
        )
    except ProviderError as error:
        log.warning("route %s: connect code exchange failed (%s): %s", route.name, error.kind, error.description)
        raise client_error(
            EXCHANGE_ERRORS.get(error.kind, "server_error"), "signing in to the MCP server's account failed"
        ) from None
    granted = token_response.get("scope") if isinstance(token_response, dict) else None
    store_connection(
        route,
        login.identity.id,
        tokens=tokens,
        provider=_issuer(downstream),
        scope=granted if isinstance(granted, str) else " ".join(scopes),
    )
    log.info("user %s connected route %s", login.identity.id, route.name)
    return issue_code(validated, login)


def _issuer(downstream: ConnectionProvider) -> str:
    return downstream.issuer or downstream.provider.settings.oauth_authorize_url


# --- credential "user_api_key": the key form ------------------------------------------------------------------------


def api_key_problem(key: str) -> str | None:
    """Why `key` (as typed, surrounding blanks removed) cannot be used, in words for the person; None when it can."""
    if not key:
        return "Enter your API key."
    if len(key) > MAX_API_KEY_CHARACTERS:
        return f"This is longer than {MAX_API_KEY_CHARACTERS} characters: it is not an API key. Paste only the key."
    if any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in key):
        # A line break or control character would end the header it travels in (header injection).
        return "The key contains a line break or another control character. Paste only the key, on one line."
    return None


def verify_api_key(route: Route, key: str, identity: ProviderIdentity) -> None:
    """Try `key` with an MCP `initialize` at the downstream, as the proxy will send it; `ConnectRetry` when it fails.

    Only 401 and 403 mean the key was refused; any other answer means the key got past the server's auth."""
    settings = _settings()
    headers: dict[str, str | bytes] = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    if route.identity_headers:
        for name, value in zip(IDENTITY_HEADERS[:3], (identity.id, identity.email, identity.name), strict=True):
            if value:
                headers[name] = header_value(value)
    credential = route.credential.header_value(key)
    headers[route.credential.header] = credential if credential.isascii() else credential.encode()
    timeout = (settings.proxy.downstream_connect_timeout, VERIFY_READ_TIMEOUT)
    with requests.Session() as http:
        http.trust_env = False  # a loopback or internal downstream is reached directly, as the proxy reaches it
        http.verify = settings.ca_bundle or True
        try:
            with http.post(
                route.downstream_url,
                json=INITIALIZE_REQUEST,
                headers=headers,
                timeout=timeout,
                stream=True,
                allow_redirects=False,
            ) as answer:
                status, session_id = answer.status_code, answer.headers.get("Mcp-Session-Id")
        except requests.RequestException as error:
            log.warning("route %s: trying a user's key, the downstream was unreachable: %s", route.name, type(error))
            raise ConnectRetry(503, "Could not reach the server to check this key. Try again in a moment.") from None
        if session_id and status < 300:
            # The check opened an MCP session: end it (best effort) rather than leave it to the server's idle timer.
            try:
                http.delete(
                    route.downstream_url,
                    headers={**headers, "Mcp-Session-Id": session_id},
                    timeout=timeout,
                    allow_redirects=False,
                ).close()
            except requests.RequestException:
                pass
    if status in (401, 403):
        log.info("route %s: the downstream refused a user's key (%d)", route.name, status)
        raise ConnectRetry(
            400, "The server refused this key. Check that you copied the whole key, and that it is still valid."
        )
    if status >= 500:
        log.warning("route %s: trying a user's key, the downstream answered %d", route.name, status)
        raise ConnectRetry(503, f"The server could not check this key (it answered {status}). Try again in a moment.")


def submit_api_key(token: str, browser: str, typed: str) -> BaseResponse:
    """The key form was sent: check the key (and try it, when the route says so), then store the connection, the
    grant and the client's code. A refused key raises `ConnectRetry`: the same form, with a message."""
    page = open_connect_page(token, browser)
    key = typed.strip()
    problem = api_key_problem(key)
    if problem is not None:
        raise ConnectRetry(400, problem)
    if page.route.api_key is not None and page.route.api_key.verify:
        verify_api_key(page.route, key, page.login.identity)
    claimed = _claim_pending(token)
    db.session.commit()
    if claimed is None:
        raise AuthorizationPageError(400, EXPIRED_TITLE, EXPIRED_MESSAGE)
    validated = validate_authorization_request(page.login.request)
    set_request_user(page.login.identity.id)
    store_connection(page.route, page.login.identity.id, api_key=key)
    log.info("user %s gave a key for route %s", page.login.identity.id, page.route.name)
    return issue_code(validated, page.login)


# --- the end of both: the grant and the client's code ---------------------------------------------------------------


def issue_code(validated: ValidatedAuthorization, login: PendingLogin) -> BaseResponse:
    """Store the grant and answer the client with its code, as a login without the connect step does."""
    if not grant_is_allowed(_settings(), login.identity.email, login.identity.groups, validated.resource):
        # The allowlists as configured now: they may have changed while the user was connecting.
        audit.record(
            "sign_in",
            user=login.identity.id,
            email=login.identity.email,
            client=validated.client.client_id,
            resource=validated.resource,
            outcome="refused",
            reason="not_allowed",
        )
        raise AuthorizationRedirectError(
            validated.redirect_uri, "access_denied", "this account is not allowed to use this server", validated.state
        )
    family = store_grant(validated, login.identity, login.tokens, login.scopes)
    return components().authorization_server.create_authorization_response(
        request=validated.request, grant_user=family, grant=validated.grant
    )
