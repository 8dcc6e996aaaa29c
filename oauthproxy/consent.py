"""Consent: the per-client-and-resource approval cookie, CSRF tokens, and the signed authorization request the consent form carries."""

from __future__ import annotations

import hashlib
import secrets

from flask import Request, current_app, session
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.wrappers import Response

from oauthproxy.config import Settings
from oauthproxy.crypto import constant_time_equals

MAX_REMEMBERED_CLIENTS = 50
#: v2: approvals per client and resource. A cookie of the old per-client form no longer verifies, so those
#: approvals are asked again once rather than read as covering every resource.
CONSENT_SALT = "consent-v2"

# Framing is refused twice over: old browsers read X-Frame-Options, new ones CSP (MCP security guidance).
CONSENT_PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def consent_cookie_name(settings: Settings) -> str:
    # `__Host-` pins the cookie to this host, path / and Secure; browsers refuse it on plain http.
    return "__Host-oauthproxy-consent" if settings.secure_cookies else "oauthproxy-consent"


def _serializer(salt: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SETTINGS"].secret_key, salt=salt)


def consent_key(client_id: str, resource: str) -> str:
    """What one approval is for: this client at this MCP resource (RFC 8707), as a short opaque cookie key.

    Approving a client for /mcp/mail must not let it into /mcp/files silently; hashed, so the cookie stays
    small (50 approvals fit in 4 KB) and does not list the servers a person uses."""
    return hashlib.sha256(f"{client_id}\n{resource}".encode()).hexdigest()[:32]


def approved_scopes(request: Request) -> dict[str, list[str]]:
    """What this browser approved: for each client and resource (`consent_key`), the scopes."""
    raw = request.cookies.get(consent_cookie_name(current_app.config["SETTINGS"]))
    if not raw:
        return {}
    try:
        value = _serializer(CONSENT_SALT).loads(raw, max_age=current_app.config["SETTINGS"].consent_ttl)
    except BadSignature:
        return {}
    if not isinstance(value, dict):
        return {}
    return {
        key: scopes
        for key, scopes in value.items()
        if isinstance(key, str) and isinstance(scopes, list) and all(isinstance(s, str) for s in scopes)
    }


def has_consented(request: Request, client_id: str, resource: str, scope: str) -> bool:
    """Approved before for this client and resource, for at least these scopes: a wider request (step-up) or
    another resource is shown to the person again."""
    approved = approved_scopes(request).get(consent_key(client_id, resource))
    return approved is not None and set(scope.split()) <= set(approved)


def remember_consent(request: Request, response: Response, client_id: str, resource: str, scope: str) -> None:
    approved = approved_scopes(request)
    key = consent_key(client_id, resource)
    scopes = sorted(set(approved.pop(key, [])) | set(scope.split()))
    approved[key] = scopes  # re-inserted last: the most recent approvals survive the cap
    _set_consent_cookie(response, dict(list(approved.items())[-MAX_REMEMBERED_CLIENTS:]))


def forget_consent(request: Request, response: Response, client_id: str, resources: list[str]) -> None:
    """Drop this browser's approvals of a client for these resources: a client the person revoked on the account
    page must show the consent page again, not sign back in unseen through a remembered approval."""
    approved = approved_scopes(request)
    forgotten = {consent_key(client_id, resource) for resource in resources}
    if forgotten & set(approved):
        _set_consent_cookie(response, {key: scopes for key, scopes in approved.items() if key not in forgotten})


def _set_consent_cookie(response: Response, kept: dict[str, list[str]]) -> None:
    settings: Settings = current_app.config["SETTINGS"]
    response.set_cookie(
        consent_cookie_name(settings),
        _serializer(CONSENT_SALT).dumps(kept),
        max_age=settings.consent_ttl,
        path="/",
        secure=settings.secure_cookies,
        httponly=True,
        samesite="Lax",
    )


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_is_valid(value: str | None) -> bool:
    expected = session.get("csrf")
    return bool(expected and value and constant_time_equals(expected, value))


def sign_authorization_request(params: dict[str, str]) -> str:
    return _serializer("authorization-request").dumps(params)


def load_authorization_request(token: str) -> dict[str, str] | None:
    """The request the consent page was shown for, if its signature holds and it is younger than CONSENT_PAGE_TTL."""
    try:
        params = _serializer("authorization-request").loads(
            token, max_age=current_app.config["SETTINGS"].consent_page_ttl
        )
    except BadSignature:
        return None
    return params if isinstance(params, dict) else None
