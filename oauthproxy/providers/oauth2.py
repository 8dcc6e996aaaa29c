"""A plain OAuth 2.0 provider with endpoints given in the settings (`OAUTH_TOKEN_URL` set): no discovery, no ID token."""

from __future__ import annotations

from typing import Any

from oauthproxy.providers.base import OAuthProvider, ProviderSettings
from oauthproxy.providers.errors import ProviderError


class OAuth2Provider(OAuthProvider):
    """A plain OAuth 2.0 provider configured with explicit endpoints (`OAUTH_TOKEN_URL` set): no
    discovery, no ID token; the user comes from `OAUTH_USERINFO_URL`.  It requests only
    `UPSTREAM_SCOPES` (no default identity scopes: many such providers refuse `openid`)."""

    name = "oauth2"
    default_scopes: tuple[str, ...] = ()

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        authorize_url: str | None = None,
        token_url: str | None = None,
        userinfo_url: str | None = None,
        timeout: float,
        token_endpoint_auth_method: str | None = None,
    ):
        super().__init__(settings, timeout=timeout, token_endpoint_auth_method=token_endpoint_auth_method)
        self.authorize_url = authorize_url or settings.oauth_authorize_url
        self.token_url = token_url or settings.oauth_token_url
        self.userinfo_url = userinfo_url or settings.oauth_userinfo_url

    def _discover(self) -> dict[str, Any]:
        if not self.token_url:
            raise ProviderError("misconfigured", "OAUTH_TOKEN_URL is required for this provider")
        metadata: dict[str, Any] = {"authorization_endpoint": self.authorize_url, "token_endpoint": self.token_url}
        if self.userinfo_url:
            metadata["userinfo_endpoint"] = self.userinfo_url
        return metadata
