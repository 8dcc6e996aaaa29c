"""The interactive authorization flow: validate the request, hand the user to the identity provider, finish at the callback."""

from __future__ import annotations

import json
import logging
import secrets
import unicodedata
from dataclasses import dataclass, replace

from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749.errors import OAuth2Error
from flask import current_app, redirect, session
from sqlalchemy import delete
from werkzeug.wrappers import Response as BaseResponse

from oauthproxy import audit
from oauthproxy.account import complete_account_login
from oauthproxy.allowlists import grant_is_allowed, route_for_resource
from oauthproxy.authorization_server import AuthorizationServer, ParamsRequest
from oauthproxy.clients import Client, metadata_document_error
from oauthproxy.clock import database_now
from oauthproxy.components import components
from oauthproxy.config import Settings
from oauthproxy.crypto import DecryptionError, hash_token
from oauthproxy.errors import safe_description
from oauthproxy.grant_replacement import replace_previous_grants
from oauthproxy.groups import groups_column, groups_matter
from oauthproxy.logs import set_request_user
from oauthproxy.models import Grant, PendingAuthorization, db, rows_affected
from oauthproxy.providers import OAuthProvider, ProviderError, ProviderIdentity, ProviderTokens
from oauthproxy.urls import canonical_resource

log = logging.getLogger(__name__)

#: The client's error for a failed code exchange: a provider refused, hung or answering 5xx is worth a retry
#: (RFC 6749 §4.1.2.1 `temporarily_unavailable`, as when login cannot start); the rest is not.
EXCHANGE_ERRORS = {"access_denied": "access_denied", "transient": "temporarily_unavailable"}
SINGLE_VALUED = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
)


class AuthorizationPageError(Exception):
    """An error shown to the person as a page: the client or redirect URI is not validated (OAuth 2.1 §7.12.2)."""

    def __init__(
        self, status: int, title: str, message: str, continue_url: str | None = None, *, error: str = "invalid_request"
    ):
        super().__init__(message)
        self.status, self.title, self.message, self.continue_url = status, title, message, continue_url
        self.error = error  # the OAuth error code, for a client that asks for JSON instead of the page


class AuthorizationRedirectError(Exception):
    """An error returned to the client at its validated redirect URI."""

    def __init__(self, redirect_uri: str, error: str, description: str | None, state: str | None):
        super().__init__(description or error)
        self.redirect_uri, self.error, self.description, self.state = redirect_uri, error, description, state


@dataclass
class ValidatedAuthorization:
    client: Client
    grant: object  # Authlib's AuthorizationCodeGrant bound to `request`
    request: ParamsRequest
    params: dict[str, str]
    redirect_uri: str
    scope: str
    resource: str

    @property
    def state(self) -> str | None:
        return self.params.get("state")


def _server() -> AuthorizationServer:
    return components().authorization_server


def _settings() -> Settings:
    return current_app.config["SETTINGS"]


def error_redirect_url(redirect_uri: str, error: str, description: str | None, state: str | None) -> str:
    """An authorization error response, with `iss` as RFC 9207 requires on errors too."""
    params = [("error", error)]
    if description:
        params.append(("error_description", safe_description(description)))
    if state:
        params.append(("state", state))
    params.append(("iss", _settings().issuer))
    return add_params_to_uri(redirect_uri, params)


def served_resources() -> list[str]:
    """Every route's protected resource (RFC 8707 audiences); the first is the default when `resource` is omitted."""
    settings = _settings()
    return [route.resource for route in settings.routes] or [settings.mcp_resource]


def validate_authorization_request(params: dict[str, str], repeated: list[str] | None = None) -> ValidatedAuthorization:
    """Check an authorization request exactly as /authorize receives it; raise a page or a redirect error."""
    if repeated:
        raise AuthorizationPageError(400, "Invalid request", f"The parameter {repeated[0]!r} was sent more than once.")
    client_id = params.get("client_id")
    if not client_id:
        raise AuthorizationPageError(
            400, "Invalid request", "The request has no client_id. Start again from your MCP client."
        )
    params = dict(params)
    redirect_uri = params.get("redirect_uri")
    if redirect_uri and safe_description(redirect_uri, len(redirect_uri)) != redirect_uri:
        # Authlib quotes the redirect URI in its error and, for a character RFC 6749 §5.2 forbids in an error
        # description, raises ValueError (a 500). No registered URI has one (urls.redirect_uri_problem).
        raise AuthorizationPageError(
            400,
            "This sign-in request cannot continue",
            "The redirect_uri is not one this client registered: it contains spaces, "
            "quotes, backslashes, control or non-ASCII characters.",
        )
    if "response_type" in params:
        # Likewise quoted by Authlib: with such characters replaced it is just as unsupported, and answered so.
        params["response_type"] = safe_description(params["response_type"], len(params["response_type"]))
    if "scope" in params:
        # offline_access is how some clients ask for a refresh token; refresh tokens are issued anyway.
        params["scope"] = " ".join(s for s in params["scope"].split() if s != "offline_access")
    request = ParamsRequest(_settings().issuer, params)
    try:
        grant = _server().get_consent_grant(request)
    except OAuth2Error as error:
        if error.redirect_uri:
            raise AuthorizationRedirectError(
                error.redirect_uri, error.error, error.description, params.get("state")
            ) from None
        reason = metadata_document_error(client_id) if error.error == "invalid_client" else None
        message = reason or error.description or error.error
        if error.error == "invalid_client" and not reason:
            message = (
                f"The client {client_id!r} is not registered here. If it was registered before, its "
                "registration may have expired: remove the server in your MCP client and add it again."
            )
        raise AuthorizationPageError(
            400, "This sign-in request cannot continue", message, error=error.error or "invalid_request"
        ) from None
    redirect_uri = params.get("redirect_uri") or grant.request.client.get_default_redirect_uri()
    state = params.get("state")

    resource = params.get("resource")
    if resource:
        matches = [r for r in served_resources() if canonical_resource(r) == canonical_resource(resource)]
        if not matches:
            raise AuthorizationRedirectError(
                redirect_uri, "invalid_target", f"{resource} is not a resource served here", state
            )
        resource = matches[0]
    else:
        # The TypeScript SDK omits `resource` when it found no resource metadata (RFC 8707 makes it optional).
        resource = served_resources()[0]
    return ValidatedAuthorization(
        client=grant.request.client,
        grant=grant,
        request=request,
        params=params,
        redirect_uri=redirect_uri,
        scope=grant.request.scope or "",
        resource=resource,
    )


def begin_provider_login(validated: ValidatedAuthorization) -> BaseResponse:
    """After consent: create the single-use `state` for the provider, store it server-side, and send the user there."""
    provider: OAuthProvider = components().login_provider
    settings = _settings()
    try:
        # Both may run discovery, so both are inside the try: an unreachable provider must reach the
        # client as an OAuth error, or it waits for a redirect that never comes.
        scopes = provider.scopes_for(validated.scope.split())
        url, upstream_secrets = provider.create_authorization_url(settings.callback_url, scopes)
    except ProviderError as error:
        log.warning("cannot start upstream login: %s", error.description)
        return redirect(
            error_redirect_url(
                validated.redirect_uri,
                "temporarily_unavailable",
                "the identity provider cannot be reached",
                validated.state,
            )
        )
    store_pending_login({**upstream_secrets, "scopes": scopes}, validated.client.client_id, validated.params)
    return redirect(url)


def store_pending_login(provider_secrets: dict, client_id: str, request: dict, purpose: str = "authorize") -> None:
    """Keep a login started at the provider until its callback: keyed by the hash of its `state`, bound to this
    browser (a random value in the session cookie), its secrets sealed to the row. Commits."""
    if "browser_id" not in session:
        session["browser_id"] = secrets.token_urlsafe(32)
    state_hash = hash_token(provider_secrets["state"])
    db.session.add(
        PendingAuthorization(
            state_hash=state_hash,
            browser_binding_hash=hash_token(session["browser_id"]),
            client_id=client_id,
            request_json=json.dumps(request),
            purpose=purpose,
            upstream_secrets=components().secret_box.encrypt(
                json.dumps(provider_secrets), f"pending:{state_hash}:upstream_secrets"
            ),
            expires_at=database_now(_settings().pending_login_ttl),
        )
    )
    db.session.commit()


def _claim_pending(state: str) -> PendingAuthorization | None:
    """Take the pending login for `state` exactly once: the delete that returns it is the claim."""
    state_hash = hash_token(state)
    row = db.session.get(PendingAuthorization, state_hash)
    if row is None:
        return None
    claimed = rows_affected(
        db.session.execute(
            delete(PendingAuthorization).where(
                PendingAuthorization.state_hash == state_hash, PendingAuthorization.expires_at > database_now()
            )
        )
    )
    db.session.commit()
    return row if claimed == 1 else None


def complete_provider_login(args: dict[str, str]) -> BaseResponse:
    """The provider sent the user back: check state, exchange the code, store the grant, answer the client."""
    settings = _settings()
    state = args.get("state")
    if not state:
        raise AuthorizationPageError(
            400, "Sign-in failed", "The identity provider's answer has no state. Start again from your MCP client."
        )
    pending = _claim_pending(state)
    if pending is None:
        raise AuthorizationPageError(
            400,
            "Sign-in link expired",
            "This sign-in has expired or was already used. Start again from your MCP client.",
        )
    if pending.purpose == "account":  # the account page's own sign-in: no client, no grant (account.py)
        return complete_account_login(pending, args)
    if hash_token(session.get("browser_id", "")) != pending.browser_binding_hash:
        raise AuthorizationPageError(
            400,
            "Sign-in failed",
            "This sign-in was started in another browser. Start again from your MCP client in this browser.",
        )
    validated = validate_authorization_request(pending.request_params)
    provider: OAuthProvider = components().login_provider

    provider_error = provider.error_from_callback(args)
    if provider_error is not None:
        log.info("upstream login ended with %s", provider_error.kind)
        audit.record(
            "sign_in",
            client=validated.client.client_id,
            resource=validated.resource,
            outcome="refused",
            reason=f"provider:{provider_error.kind}",
        )
        error = "access_denied" if provider_error.kind == "access_denied" else "server_error"
        raise AuthorizationRedirectError(validated.redirect_uri, error, provider_error.description, validated.state)
    code = args.get("code")
    if not code:
        raise AuthorizationRedirectError(
            validated.redirect_uri, "server_error", "the identity provider returned no code", validated.state
        )
    try:
        upstream_secrets = json.loads(
            components().secret_box.decrypt(pending.upstream_secrets, f"pending:{pending.state_hash}:upstream_secrets")
        )
    except DecryptionError as error:
        log.error("pending login %s: its secrets cannot be decrypted: %s", pending.state_hash[:12], error)
        raise AuthorizationRedirectError(
            validated.redirect_uri,
            "temporarily_unavailable",
            "the sign-in could not be completed; start again",
            validated.state,
        ) from None
    scopes = upstream_secrets.pop("scopes", [])
    try:
        tokens, signed_in = provider.exchange_code(code, settings.callback_url, upstream_secrets)
    except ProviderError as error:
        log.warning("upstream code exchange failed (%s): %s", error.kind, error.description)
        audit.record(
            "sign_in",
            client=validated.client.client_id,
            resource=validated.resource,
            outcome="refused",
            reason=f"exchange_failed:{error.kind}",
        )
        raise AuthorizationRedirectError(
            validated.redirect_uri,
            EXCHANGE_ERRORS.get(error.kind, "server_error"),
            "sign-in at the identity provider failed",
            validated.state,
        ) from None

    identity = storable_identity(signed_in)
    if identity is None:
        raise AuthorizationRedirectError(
            validated.redirect_uri,
            "server_error",
            "the identity provider returned a "
            "user id this server cannot use (over 255 characters, or control "
            "characters)",
            validated.state,
        )
    set_request_user(identity.id)
    if identity.groups_problem is not None and groups_matter(settings, validated.resource):
        # Fail closed: a list read in part could pass someone an allow rule was not meant for, or miss the group a
        # deny rule names; the operator learns why from the log.
        log.warning(
            "user %s: the provider's groups cannot be read, sign-in refused: %s", identity.id, identity.groups_problem
        )
        raise AuthorizationPageError(
            403,
            "Access denied",
            "Your identity provider's list of groups for this account could not be read, and this server decides "
            "access by group. Ask its operator to check the proxy's log.",
            error_redirect_url(
                validated.redirect_uri, "access_denied", "this account's groups could not be read", validated.state
            ),
        )
    # The global allowlist and the route's: a user the route would refuse is told now, before any connect step,
    # rather than signed in to get 403 at every request.
    if not grant_is_allowed(settings, identity.email, identity.groups, validated.resource):
        log.info("user %s is not in the allowlist", identity.id)
        audit.record(
            "sign_in",
            user=identity.id,
            email=identity.email,
            client=validated.client.client_id,
            resource=validated.resource,
            outcome="refused",
            reason="not_allowed",
        )
        denied = error_redirect_url(
            validated.redirect_uri, "access_denied", "this account is not allowed to use this server", validated.state
        )
        who = identity.email or "This account"
        # Which groups would do is the operator's to say: the page names none.
        route = route_for_resource(settings, validated.resource)
        by_group = settings.allowed_groups or (route is not None and route.allowed_groups)
        why = " (it is in none of the groups this server admits)" if by_group else ""
        raise AuthorizationPageError(
            403,
            "Access denied",
            f"{who} is not allowed to use this server{why}. Ask its operator to add you, or sign in with another "
            "account.",
            denied,
        )

    # Issue 13: a route that takes each user's own credential asks for it first; the grant waits for it.
    from oauthproxy.connect import connection_step  # deferred: connect builds on this module

    connecting = connection_step(validated, identity, tokens, scopes)
    if connecting is not None:
        return connecting
    family = store_grant(validated, identity, tokens, scopes)
    response = _server().create_authorization_response(
        request=validated.request, grant_user=family, grant=validated.grant
    )
    return response


# Column sizes of Grant.user_id / user_email / user_name (PostgreSQL enforces them; SQLite does not).
MAX_SUBJECT, MAX_EMAIL, MAX_NAME = 255, 320, 255


def _has_control_characters(text: str) -> bool:
    # Cc (NUL, CR, LF, ...) and Cs (lone surrogates, which no database encoding accepts).
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def storable_identity(identity: ProviderIdentity) -> ProviderIdentity | None:
    """The identity as it can be stored and forwarded on both databases, or None when the subject cannot be.

    The display name is cleaned (control characters dropped, cut to 255 characters): it only labels the user.
    The subject and the email decide who the user is and what they may reach, so they are never altered: a
    subject that does not fit (OIDC Core §2 caps `sub` at 255 ASCII characters) ends the sign-in, and an
    unusable email is dropped (a cut email could end in another domain and match an allowlist).
    """
    if len(identity.id) > MAX_SUBJECT or _has_control_characters(identity.id):
        log.info("the provider's subject is unusable (%d characters, or control characters)", len(identity.id))
        return None
    email = identity.email
    if email is not None and (len(email) > MAX_EMAIL or _has_control_characters(email)):
        log.info(
            "user %s: the provider's email is unusable (%d characters, or control characters); ignored",
            identity.id,
            len(email),
        )
        email = None
    name = identity.name
    if name is not None:
        name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cs")).strip()[:MAX_NAME].strip()
    return replace(identity, email=email, name=name or None)


def store_grant(
    validated: ValidatedAuthorization, identity: ProviderIdentity, tokens: ProviderTokens, upstream_scopes: list[str]
) -> Grant:
    """A new grant for this login, with the upstream tokens sealed to its row; the caller commits."""
    box = components().secret_box
    family = Grant(
        client_id=validated.client.client_id,
        user_id=identity.id,
        user_email=identity.email,
        user_name=identity.name,
        user_groups=groups_column(identity.groups),
        scope=validated.scope,
        resource=validated.resource,
        upstream_expires_at=tokens.expires_at,
        upstream_scope=" ".join(upstream_scopes),
    )
    db.session.add(family)
    db.session.flush()
    audit.record_for_grant("sign_in", family, "succeeded", scope=family.scope)
    replace_previous_grants(family)  # one live grant per user, client and resource (grant_replacement.py)
    family.upstream_access_token = box.encrypt(tokens.access_token, f"grant:{family.id}:upstream_access_token")
    if tokens.refresh_token:
        family.upstream_refresh_token = box.encrypt(tokens.refresh_token, f"grant:{family.id}:upstream_refresh_token")
    # Not committed here: the grant commits with its authorization code (save_authorization_code), so a database
    # that refuses the code (disk full, gone) leaves no grant without a code, holding the user's provider tokens.
    return family
