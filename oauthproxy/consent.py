"""Consent: the per-client approval cookie, CSRF tokens, and the signed authorization request the consent form carries."""

from __future__ import annotations

import secrets

from flask import Request, Response, current_app, session
from itsdangerous import BadSignature, URLSafeTimedSerializer

from oauthproxy.config import Settings
from oauthproxy.crypto import constant_time_equals

CONSENT_MAX_AGE = 365 * 24 * 3600
REQUEST_MAX_AGE = 600
MAX_REMEMBERED_CLIENTS = 50

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


def approved_client_ids(request: Request) -> list[str]:
    raw = request.cookies.get(consent_cookie_name(current_app.config["SETTINGS"]))
    if not raw:
        return []
    try:
        value = _serializer("consent").loads(raw, max_age=CONSENT_MAX_AGE)
    except BadSignature:
        return []
    return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []


def has_consented(request: Request, client_id: str) -> bool:
    return client_id in approved_client_ids(request)


def remember_consent(request: Request, response: Response, client_id: str) -> None:
    settings: Settings = current_app.config["SETTINGS"]
    clients = [c for c in approved_client_ids(request) if c != client_id] + [client_id]
    response.set_cookie(
        consent_cookie_name(settings),
        _serializer("consent").dumps(clients[-MAX_REMEMBERED_CLIENTS:]),
        max_age=CONSENT_MAX_AGE,
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
    """The request the consent page was shown for, if its signature holds and it is under 10 minutes old."""
    try:
        params = _serializer("authorization-request").loads(token, max_age=REQUEST_MAX_AGE)
    except BadSignature:
        return None
    return params if isinstance(params, dict) else None
