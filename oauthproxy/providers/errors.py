"""What can go wrong talking to a provider, classified for the caller: `ProviderError` and its four kinds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import requests
from authlib.common.errors import AuthlibBaseError

ErrorKind = Literal["access_denied", "invalid_grant", "transient", "misconfigured"]

# OAuth error codes (RFC 6749 §4.1.2.1, §5.2, OIDC Core §3.1.2.6, and provider dialects) by meaning.
#: The grant (code or refresh token) is dead: the user must log in again.  GitHub answers
#: `bad_verification_code` / `bad_refresh_token` (with HTTP 200) instead of `invalid_grant`.
_INVALID_GRANT_ERRORS = frozenset({"invalid_grant", "bad_verification_code", "bad_refresh_token", "expired_token"})
#: Retrying later may work.
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})
#: The user (or the provider's policy about the user) said no.
_DENIED_ERRORS = frozenset(
    {"access_denied", "consent_required", "interaction_required", "login_required", "account_selection_required"}
)
#: Our registration or configuration is wrong; only the operator can fix it.
_MISCONFIGURED_ERRORS = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_request",
        "invalid_scope",
        "unsupported_grant_type",
        "unsupported_response_type",
        "redirect_uri_mismatch",
        "incorrect_client_credentials",
        "application_suspended",
        "invalid_request_uri",
        "invalid_request_object",
        "registration_not_supported",
    }
)


class ProviderError(Exception):
    """A failure talking to the provider, classified for the caller:

    * `access_denied`: the user (or the provider's policy) refused: tell the MCP client `access_denied`.
    * `invalid_grant`: the code / refresh token is dead or the result unacceptable: log in again.
    * `transient`: network error, timeout, 5xx, 429: retry later (503), keep the stored grant.
    * `misconfigured`: our client registration or settings are wrong: the operator must act.
    """

    def __init__(self, kind: ErrorKind, description: str, *, error: str | None = None):
        super().__init__(description)
        self.kind: ErrorKind = kind
        self.description = description
        self.error = error  # the provider's own error code, when it gave one

    def __repr__(self) -> str:
        return f"ProviderError({self.kind!r}, {self.description!r})"


def clip(text: str, limit: int = 300) -> str:
    """Provider-supplied text goes into logs and error pages: one line, bounded length."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def classify_oauth_error(error: str | None, description: str | None, action: str) -> ProviderError:
    """Turn an OAuth error code from the provider into a `ProviderError`.  Unknown codes at the
    token endpoint count as `misconfigured`: retrying the same request will not help."""
    code = (error or "").strip() or "unknown_error"
    text = f"{action}: the identity provider answered {code}"
    if description:
        text += f" ({clip(description)})"
    if code in _INVALID_GRANT_ERRORS:
        return ProviderError("invalid_grant", text, error=code)
    if code in _TRANSIENT_ERRORS:
        return ProviderError("transient", text, error=code)
    if code in _DENIED_ERRORS:
        return ProviderError("access_denied", text, error=code)
    return ProviderError("misconfigured", text, error=code)


def error_from_callback(args: Mapping[str, str]) -> ProviderError | None:
    """Read the provider's redirect to our callback (RFC 6749 §4.1.2): None when it carries a code
    and no error, else the classified error.  `error=access_denied` (the user clicked "Cancel")
    becomes kind `access_denied`; `server_error` / `temporarily_unavailable` become `transient`;
    errors that mean our request was wrong (`invalid_scope`, `unauthorized_client`, ...) become
    `misconfigured`; anything else the provider invents is treated as a refusal."""
    error = (args.get("error") or "").strip()
    if not error:
        if (args.get("code") or "").strip():
            return None
        return ProviderError("access_denied", "the identity provider redirected back with neither a code nor an error")
    description = args.get("error_description") or None
    if error in _MISCONFIGURED_ERRORS:
        return classify_oauth_error(error, description, "login at the identity provider failed")
    if error in _TRANSIENT_ERRORS:
        return classify_oauth_error(error, description, "login at the identity provider failed")
    text = f"the identity provider refused the login: {clip(error, 100)}"
    if description:
        text += f" ({clip(description)})"
    return ProviderError("access_denied", text, error=error)


def classify_exception(exc: Exception, action: str, url: str) -> ProviderError:
    """Classify an exception raised by Authlib / requests while talking to the provider."""
    if isinstance(exc, AuthlibBaseError):
        # An OAuth error response (RFC 6749 §5.2) read from the JSON body; GitHub sends these with 200.
        return classify_oauth_error(exc.error, exc.description, action)
    if isinstance(exc, requests.HTTPError):
        # Authlib raises these for 5xx and for non-JSON error bodies.
        if exc.response is None:
            return ProviderError("transient", f"{action}: {url} failed: {clip(str(exc))}")
        return response_error(exc.response, action, url)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return ProviderError(
            "transient", f"{action}: could not reach {url}: {clip(type(exc).__name__ + ': ' + str(exc))}"
        )
    if isinstance(exc, requests.RequestException):
        return ProviderError("transient", f"{action}: request to {url} failed: {clip(str(exc))}")
    # Authlib: "Token endpoint response is not a JSON object" (an HTML error page, a proxy, ...).
    return ProviderError("misconfigured", f"{action}: {url} answered something that is not JSON: {clip(str(exc))}")


def response_error(response: requests.Response, action: str, url: str) -> ProviderError:
    """An unexpected HTTP status: 5xx, 429 and GitHub's rate-limit 403 are worth retrying."""
    status = response.status_code
    if status >= 500 or status == 429 or (status == 403 and response.headers.get("X-RateLimit-Remaining") == "0"):
        return ProviderError("transient", f"{action}: {url} answered HTTP {status}")
    return ProviderError("misconfigured", f"{action}: {url} answered HTTP {status}: {clip(response.text, 200)}")
