"""The browser's signed session cookie (Flask's own), opened only for the requests that carry it."""

from __future__ import annotations

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface


class SessionCookies(SecureCookieSessionInterface):
    """Flask's signed-cookie session, less its set-up on requests without the cookie.

    Flask builds itsdangerous' serializer (key list, salt, signer settings) before it looks for the cookie: 15 µs
    of every request. An MCP request carries a bearer token and no cookie, and is the hot path (bench/analysis.md);
    it gets the same empty session Flask would have given it, without the serializer.
    """

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not app.secret_key:
            return None  # as Flask: no secret, no session
        if not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)
