"""GitHub and GitHub Enterprise Server: OAuth 2.0 without OpenID Connect, the user from the REST API."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from oauthproxy.allowlists import email_address
from oauthproxy.providers.base import ProviderSettings
from oauthproxy.providers.errors import ProviderError, response_error
from oauthproxy.providers.identity import ProviderIdentity, subject_claim, text_claim
from oauthproxy.providers.oauth2 import OAuth2Provider

# The logger name operators know from before the providers package: log lines keep naming it.
log = logging.getLogger("oauthproxy.upstream")

GITHUB_HOSTS = frozenset({"github.com", "www.github.com"})
GITHUB_AUTHORIZE_URL = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN_URL = "https://github.com/login/oauth/access_token"
GITHUB_API_URL = "https://api.github.com"
GITHUB_SCOPES = ("read:user", "user:email")
CLIENT_SECRET_POST = "client_secret_post"  # a token endpoint auth method name (RFC 7591 §2)


class GitHubProvider(OAuth2Provider):
    """GitHub OAuth apps and GitHub Apps: plain OAuth 2.0 (no OIDC for users), the user from the
    REST API.  The URLs are constructor arguments so tests can point it at a fake GitHub."""

    name = "github"
    brand = "GitHub"
    default_scopes = GITHUB_SCOPES

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        api_base_url: str | None = None,
        authorize_url: str | None = None,
        token_url: str | None = None,
        timeout: float,
        token_endpoint_auth_method: str = CLIENT_SECRET_POST,
    ):
        # GitHub documents client_id/client_secret as form parameters (client_secret_post).
        super().__init__(
            settings,
            authorize_url=authorize_url or GITHUB_AUTHORIZE_URL,
            token_url=token_url or GITHUB_TOKEN_URL,
            userinfo_url=None,
            timeout=timeout,
            token_endpoint_auth_method=token_endpoint_auth_method,
        )
        base = api_base_url or GITHUB_API_URL
        # Trailing slash: Authlib joins relative paths with urljoin, which drops a last segment
        # without one (GitHub Enterprise's https://ghe.example.com/api/v3).
        self.api_base_url = base.rstrip("/") + "/"

    def _api_base_url(self) -> str | None:
        return self.api_base_url

    def _discover(self) -> dict[str, Any]:
        # GitHub's token endpoint answers form-encoded unless asked for JSON; Authlib sends
        # `Accept: application/json` on token requests, which is what GitHub needs.
        return {
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "userinfo_endpoint": self.api_base_url + "user",
        }

    def _identity(self, token: Mapping[str, Any], secrets: Mapping[str, Any]) -> ProviderIdentity:
        user = self._github("user", token)
        if not isinstance(user, Mapping):
            raise ProviderError("misconfigured", "GitHub's /user did not answer a JSON object")
        subject = subject_claim(user.get("id"))
        if subject is None:
            raise ProviderError("misconfigured", "GitHub's /user has no numeric id")
        email = github_email(user, self._github_emails(token))
        name = text_claim(user.get("name")) or text_claim(user.get("login"))
        return ProviderIdentity(id=subject, email=email, name=name)

    def _github(self, path: str, token: Mapping[str, Any]) -> Any:
        url = self.api_base_url + path
        client = self._app()
        response = self._call(
            f"fetching GitHub {path}",
            url,
            lambda: client.get(
                url,
                token=dict(token),
                # GitHub's documented media type and API version for the REST API.
                headers={"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"},
            ),
        )
        if response.status_code != 200:
            raise response_error(response, f"fetching GitHub /{path}", url)
        try:
            return response.json()
        except ValueError:
            raise ProviderError("misconfigured", f"GitHub {url} did not answer JSON") from None

    def _github_emails(self, token: Mapping[str, Any]) -> list[Any] | None:
        """`GET /user/emails` (needs the user:email scope), or None when the token may not read it."""
        try:
            emails = self._github("user/emails", token)
        except ProviderError as exc:
            if exc.kind == "transient":
                raise
            # 403/404: the token lacks user:email (e.g. a GitHub App without the email permission).
            log.warning("GitHub /user/emails unavailable: %s", exc.description)
            return None
        return emails if isinstance(emails, list) else None


def github_email(user: Mapping[str, Any], emails: list[Any] | None) -> str | None:
    """The email of a GitHub user, only as `/user/emails` (user:email scope) lists it with `verified: true`:
    the public profile email (`/user`'s `email`) when it is one of those, else the primary verified one.

    Without `/user/emails` there is no email: `/user` says nothing about verification."""
    if emails is None:
        return None
    verified = [
        address
        for entry in emails
        if isinstance(entry, Mapping)
        and entry.get("verified") is True
        and (address := email_address(entry.get("email"))) is not None
    ]
    public = email_address(user.get("email"))
    if public and public in verified:
        return public
    for entry in emails:
        if isinstance(entry, Mapping) and entry.get("primary") is True and entry.get("verified") is True:
            return email_address(entry.get("email"))
    return None
