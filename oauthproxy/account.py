"""The account page's logic: a person's own sign-in, the MCP clients and downstream connections they hold, and ending them."""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from flask import current_app, redirect, session
from sqlalchemy import func, select
from werkzeug.wrappers import Response as BaseResponse

from oauthproxy import audit
from oauthproxy.authorization_server import revoke_grant
from oauthproxy.client_metadata import is_metadata_document_client_id
from oauthproxy.clients import Client, load_client
from oauthproxy.components import components
from oauthproxy.config import Settings
from oauthproxy.crypto import DecryptionError, hash_token
from oauthproxy.downstream_connections import connections_of, disconnect, forget_everywhere, store_connection
from oauthproxy.logs import set_request_user
from oauthproxy.models import DownstreamConnection, Grant, OAuthClient, PendingAuthorization, Token, db
from oauthproxy.providers import OAuthProvider, ProviderError, ProviderIdentity
from oauthproxy.routes import Route
from oauthproxy.urls import canonical_resource

log = logging.getLogger(__name__)

#: Where the account page keeps its sign-in in Flask's signed session cookie: who, and when they signed in.
SESSION_KEY = "account"
#: `PendingAuthorization.purpose` of the account page's sign-in at the login provider.
PURPOSE = "account"
#: `Grant.revoked_reason` (and the metrics label) of a grant its user revoked on the account page.
REVOKED_REASON = "revoked_by_user"
#: An API key is sent as a header value: a few hundred characters in practice; the cap bounds what is sealed and sent.


class AccountPageError(Exception):
    """A page telling the person what went wrong on the account page and what to do; `retry_after` for a 503."""

    #: Where the error page's one button leads (an endpoint), and what it says.
    back_endpoint = "account.account_page"
    back_label = "Back to your account"

    def __init__(self, status: int, title: str, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.title, self.message, self.retry_after = status, title, message, retry_after


def _settings() -> Settings:
    return current_app.config["SETTINGS"]


def account_url() -> str:
    return _settings().public_url + "/account"


#: The pages that sign in through the account page's sign-in, and where the callback sends the person back to.
RETURN_PATHS = ("/account", "/admin")


# -- the account page's own sign-in -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountUser:
    """Who is signed in to the account page, as the login provider said at their sign-in."""

    user_id: str
    email: str | None
    name: str | None
    signed_in_at: int


def begin_account_login(return_to: str = "/account") -> BaseResponse:
    """Send the person to the login provider, at the proxy's one registered redirect URI (`/callback`).

    A pending login of purpose "account", bound to this browser like an MCP client's: the callback dispatches it to
    `complete_account_login`, which sends the person back to `return_to` (one of RETURN_PATHS: the admin page signs
    in the same way). Only the identity scopes are asked: the provider's tokens are not kept."""
    if return_to not in RETURN_PATHS:
        raise ValueError(f"not a page that signs in: {return_to!r}")
    settings = _settings()
    provider: OAuthProvider = components().login_provider
    try:
        scopes = provider.identity_scopes()
        url, upstream_secrets = provider.create_authorization_url(settings.callback_url, scopes)
    except ProviderError as error:
        log.warning("cannot start the account page's sign-in: %s", error.description)
        raise AccountPageError(
            503,
            "Sign-in is unavailable",
            f"{provider.display_name} cannot be reached right now. Try again in a minute.",
            retry_after=30,
        ) from None
    from oauthproxy.login import store_pending_login

    store_pending_login(upstream_secrets, "", {"return_to": return_to}, PURPOSE)
    return redirect(url)


def complete_account_login(pending: PendingAuthorization, args: dict[str, str]) -> BaseResponse:
    """The provider sent the person back from the account page's sign-in (`pending` is claimed): who are they?"""
    # Deferred: login imports this module for its callback hook.
    from oauthproxy.login import EXCHANGE_ERRORS, storable_identity

    again = "Open the account page and sign in again."
    if hash_token(session.get("browser_id", "")) != pending.browser_binding_hash:
        # The same confused-deputy guard as an MCP client's login: a sign-in link sent to someone else signs no one in.
        raise AccountPageError(
            400, "Sign-in failed", f"This sign-in was started in another browser. {again} in this browser."
        )
    provider: OAuthProvider = components().login_provider
    refused = provider.error_from_callback(args)
    if refused is not None:
        log.info("account page sign-in ended with %s", refused.kind)
        audit.record("sign_in", outcome="refused", reason=f"provider:{refused.kind}", purpose="account")
        raise AccountPageError(400, "Sign-in did not complete", f"{provider.display_name} did not sign you in. {again}")
    code = args.get("code")
    if not code:
        raise AccountPageError(400, "Sign-in failed", f"{provider.display_name} returned no code. {again}")
    try:
        upstream_secrets = json.loads(
            components().secret_box.decrypt(pending.upstream_secrets, f"pending:{pending.state_hash}:upstream_secrets")
        )
    except DecryptionError as error:
        log.error("pending account sign-in %s: its secrets cannot be decrypted: %s", pending.state_hash[:12], error)
        raise AccountPageError(400, "Sign-in failed", f"The sign-in could not be completed. {again}") from None
    try:
        # The provider's tokens are dropped here: the account page needs to know who signed in, nothing more.
        _, signed_in = provider.exchange_code(code, _settings().callback_url, upstream_secrets)
    except ProviderError as error:
        log.warning("account page code exchange failed (%s): %s", error.kind, error.description)
        if EXCHANGE_ERRORS.get(error.kind) == "temporarily_unavailable":
            raise AccountPageError(
                503, "Sign-in is unavailable", f"{provider.display_name} did not answer. {again}", retry_after=30
            ) from None
        raise AccountPageError(400, "Sign-in failed", f"Sign-in at {provider.display_name} failed. {again}") from None
    identity = storable_identity(signed_in)
    if identity is None:
        raise AccountPageError(
            400, "Sign-in failed", f"{provider.display_name} returned a user id this server cannot use."
        )
    set_request_user(identity.id)
    if not _settings().user_is_allowed(identity.email, identity.groups):
        log.info("user %s is not in the allowlist (account page)", identity.id)
        audit.record(
            "sign_in",
            user=identity.id,
            email=identity.email,
            outcome="refused",
            reason="not_allowed",
            purpose="account",
        )
        who = identity.email or "This account"
        raise AccountPageError(
            403, "Access denied", f"{who} is not allowed to use this server. Ask its operator to add you."
        )
    audit.record("sign_in", user=identity.id, email=identity.email, outcome="succeeded", purpose="account")
    session[SESSION_KEY] = {
        "user_id": identity.id,
        "email": identity.email,
        "name": identity.name,
        # Only the groups ALLOWED_GROUPS names (a cookie holds the session): enough to recheck the list on each
        # request; a group added to the list later counts from the next sign-in.
        "groups": sorted(identity.groups & _settings().allowed_groups),
        "signed_in_at": int(time.time()),
    }
    # A fresh CSRF token for the signed-in page: one a page read before the sign-in no longer acts for the account.
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("user %s signed in to the account page", identity.id)
    return redirect(_settings().public_url + _return_path(pending))


def _return_path(pending: PendingAuthorization) -> str:
    """Where the sign-in was started from: a fixed list, never a URL the request chose."""
    try:
        wanted = json.loads(pending.request_json).get("return_to")
    except (ValueError, AttributeError):
        wanted = None
    return wanted if wanted in RETURN_PATHS else "/account"


def signed_in_user() -> AccountUser | None:
    """The person signed in to the account page in this browser; None when nobody is, or their session is over
    (ACCOUNT_SESSION_TTL after the sign-in, or they are no longer on the allowlist)."""
    value = session.get(SESSION_KEY)
    if not isinstance(value, dict):
        return None
    user_id, email, name, at = (value.get(key) for key in ("user_id", "email", "name", "signed_in_at"))
    groups = value.get("groups", [])
    now = time.time()
    if (
        isinstance(user_id, str)
        and user_id
        and isinstance(at, int)
        and now - _settings().account_session_ttl < at <= now + 60
        and all(v is None or isinstance(v, str) for v in (email, name))
        and isinstance(groups, list)
        and all(isinstance(group, str) for group in groups)
        and _settings().user_is_allowed(email, frozenset(groups))
    ):
        set_request_user(user_id)
        return AccountUser(user_id, email, name, at)
    session.pop(SESSION_KEY, None)
    return None


def sign_out() -> None:
    session.pop(SESSION_KEY, None)


# -- what the page lists ----------------------------------------------------------------------------------------------


@dataclass
class ConnectedClient:
    """One MCP client holding live grants of the user, with what the page says about it."""

    client_id: str
    name: str
    #: The name comes from a client metadata document at `client_id` (an https URL), not from the client's own word.
    named_by_document: bool
    redirect_uris: list[str]
    routes: list[Route]
    since: datetime
    last_used: datetime | None


def describe_client(client_id: str) -> Client | None:
    """The client's metadata for display: a registered client's row (its secret is not needed, so not decrypted),
    or a URL client id's metadata document (fetched within its timeout, and cached)."""
    if is_metadata_document_client_id(client_id, _settings().allow_private_client_metadata_urls):
        return load_client(client_id)
    if len(client_id) > 64:
        return None
    row = db.session.get(OAuthClient, client_id)
    return None if row is None else Client.from_metadata(row.client_id, row.client_metadata)


def routes_of(resource: str) -> list[Route]:
    """The routes a grant's resource (RFC 8707 audience) reaches."""
    wanted = canonical_resource(resource)
    return [route for route in _settings().routes if canonical_resource(route.resource) == wanted]


def connected_clients(user_id: str) -> list[ConnectedClient]:
    """The user's live grants, one entry per client; the most recently used first."""
    grants = list(
        db.session.scalars(
            select(Grant).where(Grant.user_id == user_id, Grant.revoked_at.is_(None)).order_by(Grant.created_at)
        )
    )
    if not grants:
        return []
    last_issued = last_token_issued([grant.id for grant in grants])
    by_client: dict[str, ConnectedClient] = {}
    for grant in grants:
        entry = by_client.get(grant.client_id)
        if entry is None:
            client = describe_client(grant.client_id)
            entry = by_client[grant.client_id] = ConnectedClient(
                client_id=grant.client_id,
                name=client.client_name if client else grant.client_id,
                named_by_document=bool(client and client.from_metadata_document),
                redirect_uris=list(client.redirect_uris) if client else [],
                routes=[],
                since=grant.created_at,
                last_used=None,
            )
        entry.routes.extend(route for route in routes_of(grant.resource) if route not in entry.routes)
        used = last_issued.get(grant.id)
        if used is not None and (entry.last_used is None or used > entry.last_used):
            entry.last_used = used
    return sorted(by_client.values(), key=lambda entry: entry.last_used or entry.since, reverse=True)


@dataclass
class ConnectionEntry:
    """One downstream connection (or key) of the user, with its route when the route is still configured."""

    route_name: str
    route: Route | None
    kind: str
    provider: str
    since: datetime
    expires_at: datetime | None
    renews: bool
    refused: bool


def per_user_routes() -> list[Route]:
    return [route for route in _settings().routes if route.credential.per_user]


def per_user_route(name: str) -> Route | None:
    return next((route for route in per_user_routes() if route.name == name), None)


def _provider_label(route: Route | None, row: DownstreamConnection) -> str:
    if route is not None and route.oauth is not None and route.oauth.display_name:
        return route.oauth.display_name
    if row.kind == "user_api_key":
        return "your API key"
    return row.provider or "the server's own sign-in"


def connection_entries(user_id: str) -> list[ConnectionEntry]:
    entries = []
    for row in connections_of(user_id):
        route = per_user_route(row.route)
        entries.append(
            ConnectionEntry(
                route_name=row.route,
                route=route,
                kind=row.kind,
                provider=_provider_label(route, row),
                since=row.created_at,
                expires_at=row.expires_at,
                renews=row.refresh_token is not None,
                refused=row.refused_at is not None,
            )
        )
    return sorted(entries, key=lambda entry: entry.route_name)


def unconnected_key_routes(user_id: str, entries: list[ConnectionEntry]) -> list[Route]:
    """Routes that take the user's own API key and hold none of theirs: the page offers to add one."""
    connected = {entry.route_name for entry in entries}
    return [
        route for route in per_user_routes() if route.credential.kind == "user_api_key" and route.name not in connected
    ]


# -- what the page's forms do -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevokedClient:
    client_id: str
    grant_ids: list[int]
    #: The resources its grants were for: the consent cookie's approvals of them are dropped too.
    resources: list[str]


def revoke_client(user_id: str, client_id: str) -> RevokedClient | None:
    """End every live grant of this user through this client, as `/revoke` and `oauthproxy grants revoke` do
    (revoke_grant); None when the user holds none (another user's client, or one already revoked)."""
    grants = db.session.execute(
        select(Grant.id, Grant.resource).where(
            Grant.user_id == user_id, Grant.client_id == client_id, Grant.revoked_at.is_(None)
        )
    ).all()
    if not grants:
        return None
    for grant_id, _ in grants:
        revoke_grant(grant_id, REVOKED_REASON)
    db.session.commit()
    log.info("user %s revoked client %s on the account page (%d grant(s))", user_id, client_id, len(grants))
    return RevokedClient(client_id, [g.id for g in grants], sorted({g.resource for g in grants}))


def disconnect_route(user_id: str, route: Route) -> bool:
    """Delete the user's stored credential for the route (and revoke it at its provider when it can be)."""
    removed = disconnect(route, user_id)
    if removed:
        log.info("user %s disconnected route %s on the account page", user_id, route.name)
    return removed


def replace_api_key(user: AccountUser, route: Route, value: str) -> str | None:
    """Store the user's new key for a `user_api_key` route, checked and tried as the connect step does; the problem
    in words when it is refused."""
    from oauthproxy.connect import ConnectRetry, api_key_problem, verify_api_key

    user_id = user.user_id
    value = value.strip()  # a key pasted with the line's end or a space around it
    problem = api_key_problem(value)
    if problem is not None:
        return problem
    if route.api_key is not None and route.api_key.verify:
        try:
            verify_api_key(route, value, ProviderIdentity(id=user_id, email=user.email, name=user.name))
        except ConnectRetry as refused:
            return refused.message
    store_connection(route, user_id, api_key=value)
    forget_everywhere(route, user_id)  # no worker goes on sending the key it replaces
    log.info("user %s stored a new API key for route %s on the account page", user_id, route.name)
    return None


def last_token_issued(grant_ids: list[int]) -> dict[int, datetime]:
    """When each grant last got a token (its login or latest refresh): "last used" on the account and admin pages."""
    return dict(
        db.session.execute(
            select(Token.grant_id, func.max(Token.issued_at))
            .where(Token.grant_id.in_(grant_ids))
            .group_by(Token.grant_id)
        ).all()
    )
