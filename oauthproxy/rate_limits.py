"""Rate limits: per-client-address limits on the endpoints anyone can call without a token."""

from __future__ import annotations

from flask import Flask, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from oauthproxy.config import Settings


def is_preflight() -> bool:
    return request.method == "OPTIONS"


def init_rate_limits(app: Flask, settings: Settings) -> Limiter:
    """One limiter per application, so storage (memory, or Redis shared by instances) is never shared by accident.

    Keyed on the peer address as Werkzeug sees it: X-Forwarded-For counts only through ProxyFix with a
    configured hop count, so a client cannot choose its own key by sending the header.
    """
    limiter = Limiter(get_remote_address, app=app, storage_uri=settings.rate_limit_storage_uri,
                      headers_enabled=True, default_limits=[])
    limits = (("authorization.register", settings.register_rate_limit),
              ("authorization.authorize", settings.authorize_rate_limit),
              ("authorization.submit_consent", settings.authorize_rate_limit),
              ("authorization.token", settings.token_rate_limit),
              ("authorization.revoke", settings.token_rate_limit))
    for endpoint, limit in limits:
        # Flask-Limiter 4 checks inside the wrapper it returns, so the view must be replaced by it.
        app.view_functions[endpoint] = limiter.limit(limit, exempt_when=is_preflight)(app.view_functions[endpoint])
    limited = frozenset(endpoint for endpoint, _ in limits)
    # Every other request (each proxied MCP request among them) has no limit: spare it the limiter's bookkeeping,
    # ~20 µs of CPU per request (docs/benchmarks.md).
    limiter.request_filter(lambda: request.endpoint not in limited)
    return limiter
