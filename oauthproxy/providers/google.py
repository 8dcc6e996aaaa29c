"""Google accounts (consumer and Workspace): OpenID Connect with Google's refresh-token and issuer quirks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oauthproxy.providers.base import ProviderSettings
from oauthproxy.providers.oidc import OpenIDConnectProvider

GOOGLE_HOSTS = frozenset({"accounts.google.com"})
GOOGLE_ISSUER = "https://accounts.google.com"


class GoogleProvider(OpenIDConnectProvider):
    """Google accounts (consumer and Workspace)."""

    name = "google"
    brand = "Google"
    metadata_location = "https://accounts.google.com/.well-known/openid-configuration"

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        timeout: float,
        token_endpoint_auth_method: str | None = None,
    ):
        super().__init__(
            settings, url=GOOGLE_ISSUER, timeout=timeout, token_endpoint_auth_method=token_endpoint_auth_method
        )

    def _discover(self) -> dict[str, Any]:
        return self._discover_at(self.metadata_location)

    def identity_scopes(self) -> list[str]:
        return list(self.default_scopes)  # fixed: no need to consult the discovery document

    def _use_offline_access(self) -> bool:
        return False  # Google uses access_type=offline; the offline_access scope is invalid there

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        # Google returns a refresh token only with access_type=offline, and only on the first
        # consent of a user to this client unless prompt=consent forces the consent screen again.
        # Every login starts a new proxy grant that needs its own refresh token, so ask each time.
        return {"access_type": "offline", "prompt": "consent"}

    def _issuer_option(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        # Google's ID tokens carry iss "https://accounts.google.com" or "accounts.google.com"
        # (documented: "Verify that the value of iss is equal to either").
        return {"essential": True, "values": [GOOGLE_ISSUER, "accounts.google.com"]}
