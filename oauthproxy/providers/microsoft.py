"""Microsoft Entra ID and personal Microsoft accounts (v2.0 endpoints, national clouds): tenants, issuers, nOAuth."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from oauthproxy.providers.base import ProviderSettings
from oauthproxy.providers.errors import ProviderError
from oauthproxy.providers.oidc import OpenIDConnectProvider

#: Entra ID's public cloud and the national clouds all serve the same v2.0 endpoints.
MICROSOFT_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
    }
)
#: Path segments of an Entra ID URL that are not a tenant (…/oauth2/v2.0/authorize, …/v2.0).
_MICROSOFT_NON_TENANT_SEGMENTS = frozenset({"oauth2", "v2.0", ".well-known", "authorize", "token"})


def microsoft_tenant(url: str) -> str:
    """The Entra ID tenant in a login.microsoftonline.com URL (its first path segment: `common`,
    `organizations`, `consumers`, a tenant GUID or a verified domain); `common` when absent."""
    segments = [segment for segment in urlsplit(url.strip()).path.split("/") if segment]
    if not segments or segments[0].lower() in _MICROSOFT_NON_TENANT_SEGMENTS:
        return "common"
    tenant = segments[0]
    if not all(ch.isalnum() or ch in "-." for ch in tenant):
        raise ProviderError(
            "misconfigured", f"OAUTH_AUTHORIZE_URL names an invalid Microsoft tenant {tenant!r}: {url!r}"
        )
    return tenant


class MicrosoftProvider(OpenIDConnectProvider):
    """Microsoft Entra ID (work/school accounts) and personal Microsoft accounts, v2.0 endpoints.

    * `offline_access` is how Entra ID issues refresh tokens; `prompt=consent` is never sent:
      users without the right to consent would hit an "admin approval required" wall.
    * For the multi-tenant `common` / `organizations` authorities the discovery document's issuer
      is the template `https://login.microsoftonline.com/{tenantid}/v2.0`; each ID token's `iss`
      names the user's real tenant, so it is checked against the template filled with the token's
      `tid` claim.
    """

    name = "microsoft"
    brand = "Microsoft"
    wants_offline_access = True

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        tenant: str | None = None,
        authority_host: str | None = None,
        timeout: float,
        token_endpoint_auth_method: str | None = None,
    ):
        url = settings.oauth_authorize_url
        self.tenant = tenant or microsoft_tenant(url)
        self.authority_host = authority_host or (urlsplit(url).hostname or "login.microsoftonline.com").lower()
        super().__init__(
            settings,
            url=f"https://{self.authority_host}/{self.tenant}/v2.0",
            timeout=timeout,
            token_endpoint_auth_method=token_endpoint_auth_method,
        )

    def _discover(self) -> dict[str, Any]:
        # v2.0 endpoints whatever the configured URL said (a v1 /oauth2/authorize URL included):
        # v1 tokens have a different issuer and no offline_access scope.
        return self._discover_at(f"{self.url}/.well-known/openid-configuration")

    def identity_scopes(self) -> list[str]:
        return list(self.default_scopes)  # fixed: no need to consult the discovery document

    def _use_offline_access(self) -> bool:
        return True

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        return {}  # no prompt=consent, see the class docstring

    def _refresh_params(self, scopes: list[str] | None) -> dict[str, str]:
        # The v2.0 token endpoint documents `scope` as required on a refresh (golang/oauth2#540:
        # omitting it fails in practice); a subset of the original scopes is allowed.
        return {"scope": " ".join(scopes or self.scopes_for([]))}

    def _issuer_option(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        template = str(metadata["issuer"])

        def issuer_matches(claims: Mapping[str, Any], value: Any) -> bool:
            if "{tenantid}" not in template:
                return value == template
            tid = claims.get("tid")
            return isinstance(tid, str) and bool(tid) and value == template.replace("{tenantid}", tid)

        return {"essential": True, "validate": issuer_matches}

    # Entra ID's `email` comes from the user's mail attribute, which a tenant admin can set to any
    # address ("nOAuth"), and it never sends `email_verified`.  Only the optional claim `xms_edov`
    # (email domain owner verified: the tenant owns the address's domain) vouches for it; it must be
    # added to the app registration's ID token claims.  Graph's userinfo never carries it.
    email_verified_keys = ("xms_edov",)
