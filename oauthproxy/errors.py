"""OAuth errors this server adds to Authlib's, and error descriptions limited to the characters RFC 6749 permits."""

from __future__ import annotations

import re

from authlib.oauth2.rfc6749.errors import OAuth2Error

# RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash, ASCII only).
_NOT_PERMITTED = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def safe_description(text: str, limit: int = 300) -> str:
    """`text` with every character RFC 6749 forbids in error_description replaced by `?`, and cut to `limit`."""
    return _NOT_PERMITTED.sub("?", text)[:limit]


class InvalidTargetError(OAuth2Error):
    """RFC 8707 §2: the requested resource is not one this server issues tokens for."""

    error = "invalid_target"


class InvalidRedirectURIError(OAuth2Error):
    """RFC 7591 §3.2.2: a redirect URI in a registration request is not acceptable."""

    error = "invalid_redirect_uri"
