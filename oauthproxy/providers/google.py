"""Google accounts (consumer and Workspace): OpenID Connect with Google's refresh-token and issuer quirks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oauthproxy.groups import group_names
from oauthproxy.providers.base import ProviderSettings
from oauthproxy.providers.identity import verified_email
from oauthproxy.providers.oidc import OpenIDConnectProvider

GOOGLE_HOSTS = frozenset({"accounts.google.com"})
GOOGLE_ISSUER = "https://accounts.google.com"
#: The group a Google Workspace account is in: its domain (`hd`), as `domain:example.com`.
WORKSPACE_DOMAIN_PREFIX = "domain:"


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

    def _groups_in(self, claims: Mapping[str, Any]) -> frozenset[str] | None:
        """The Workspace domain as `domain:<hd>`, when the claims vouch for the email: `hd` is Google's word that the
        account belongs to that Workspace (a consumer account has none; an address at that domain alone proves
        nothing). Google has no groups claim; GROUPS_CLAIM, when a provider in front adds one, is read as well."""
        groups = super()._groups_in(claims)
        hd = claims.get("hd")
        if not isinstance(hd, str) or not hd or verified_email(claims) is None:
            return groups
        domain = group_names([WORKSPACE_DOMAIN_PREFIX + hd.strip().lower()], "the hd claim")
        return domain | (groups or frozenset())
