"""OAuth errors this server adds to Authlib's, their JSON answer, and descriptions limited to RFC 6749's characters."""

from __future__ import annotations

import re

from authlib.oauth2.rfc6749.errors import OAuth2Error
from flask import Response, jsonify

# RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash, ASCII only).
_NOT_PERMITTED = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def safe_description(text: str, limit: int = 300) -> str:
    """`text` with every character RFC 6749 forbids in error_description replaced by `?`, and cut to `limit`."""
    return _NOT_PERMITTED.sub("?", text)[:limit]


def json_error(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> Response:
    """Every JSON error this server writes itself: RFC 6749 §5.2's shape, never cached (RFC 6749 §5.1)."""
    response = jsonify(error=error, error_description=description)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    if headers:
        response.headers.update(headers)
    return response


class InvalidTargetError(OAuth2Error):
    """RFC 8707 §2: the requested resource is not one this server issues tokens for."""

    error = "invalid_target"


class InvalidRedirectURIError(OAuth2Error):
    """RFC 7591 §3.2.2: a redirect URI in a registration request is not acceptable."""

    error = "invalid_redirect_uri"


class TemporarilyUnavailableError(OAuth2Error):
    """503 at the token endpoint: a provider the request depends on cannot answer now; the client retries after
    `Retry-After` seconds and keeps its refresh token (nothing was spent)."""

    error = "temporarily_unavailable"
    status_code = 503

    def __init__(self, description: str, retry_after: int):
        super().__init__(description)
        self.retry_after = retry_after

    def get_headers(self) -> list[tuple[str, str]]:
        return [*super().get_headers(), ("Retry-After", str(self.retry_after))]
