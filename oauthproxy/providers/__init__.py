"""The identity providers people sign in with: one OAuth 2.0 / OpenID Connect flow, one module per provider.

The proxy delegates the user's login to the provider the operator registered (authorization code +
PKCE S256), keeps its tokens to refresh them behind the scenes, and learns who the user is (a
stable subject id, a *verified* email, a display name).  Not to be confused with oauth2-proxy's
"upstream": here that is the MCP server behind the proxy, the *downstream*.

* `base.OAuthProvider`: the flow every provider shares (authorization URL, code exchange, refresh, identity).
* `errors`: `ProviderError` and how provider answers and failures are classified.
* `discovery`: OpenID Connect Discovery / RFC 8414 metadata.
* `identity`: `ProviderIdentity` and the rules for verified emails.
* One module per provider, detected from `OAUTH_AUTHORIZE_URL` by `build_login_provider`:
  `google` (accounts.google.com), `microsoft` (login.microsoftonline.com and the national clouds,
  v2.0), `github` (github.com, or GitHub Enterprise Server with `GITHUB_API_URL`), `oidc` (anything
  else: OpenID Connect / RFC 8414 discovery) and `oauth2` (explicit endpoints when `OAUTH_TOKEN_URL`
  is set, no discovery).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import urlsplit

from oauthproxy.providers.base import OAuthProvider, ProviderSettings, ProviderTokens
from oauthproxy.providers.discovery import choose_token_auth_method, discovery_candidates
from oauthproxy.providers.errors import ErrorKind, ProviderError, classify_oauth_error, error_from_callback
from oauthproxy.providers.github import GITHUB_HOSTS, GitHubProvider, github_email
from oauthproxy.providers.google import GOOGLE_HOSTS, GoogleProvider
from oauthproxy.providers.identity import ProviderIdentity, is_affirmed, verified_email
from oauthproxy.providers.microsoft import MICROSOFT_HOSTS, MicrosoftProvider, microsoft_tenant
from oauthproxy.providers.oauth2 import OAuth2Provider
from oauthproxy.providers.oidc import OpenIDConnectProvider

if TYPE_CHECKING:
    from oauthproxy.routes import RouteOAuth


class LoginProviderSettings(ProviderSettings, Protocol):
    """The settings `build_login_provider` reads besides the provider's own."""

    @property
    def github_api_url(self) -> str | None: ...
    @property
    def provider_http_timeout(self) -> float: ...
    @property
    def reads_groups(self) -> bool: ...
    @property
    def groups_claim(self) -> str: ...


def detect_provider(authorize_url: str) -> Literal["google", "microsoft", "github", "generic"]:
    """Which provider `OAUTH_AUTHORIZE_URL` names, by its host."""
    host = (urlsplit(authorize_url.strip()).hostname or "").lower()
    if host in GOOGLE_HOSTS:
        return "google"
    if host in MICROSOFT_HOSTS:
        return "microsoft"
    if host in GITHUB_HOSTS:
        return "github"
    return "generic"


def build_login_provider(settings: LoginProviderSettings) -> OAuthProvider:
    """The provider `OAUTH_AUTHORIZE_URL` (and `OAUTH_TOKEN_URL`) designate, reading the users' groups when the
    settings say so.  No network."""
    provider = _login_provider(settings)
    provider.reads_groups = settings.reads_groups
    provider.groups_claim = settings.groups_claim
    return provider


def _login_provider(settings: LoginProviderSettings) -> OAuthProvider:
    url = settings.oauth_authorize_url
    timeout = settings.provider_http_timeout
    kind = detect_provider(url)
    if kind == "google":
        return GoogleProvider(settings, timeout=timeout)
    if kind == "microsoft":
        return MicrosoftProvider(settings, timeout=timeout)
    if kind == "github":
        # A full github.com authorize URL or just https://github.com: the endpoints are fixed.
        return GitHubProvider(
            settings, api_base_url=settings.github_api_url, token_url=settings.oauth_token_url or None, timeout=timeout
        )
    if settings.github_api_url:
        # GitHub Enterprise Server: GITHUB_API_URL (https://HOST/api/v3) says so. OAUTH_AUTHORIZE_URL is HOST or its
        # authorize URL; the token URL is GitHub's path on the same host unless OAUTH_TOKEN_URL names it.
        parts = urlsplit(url.strip())
        origin = f"{parts.scheme}://{parts.netloc}"
        authorize_url = url.strip() if parts.path.strip("/") else origin + "/login/oauth/authorize"
        return GitHubProvider(
            settings,
            api_base_url=settings.github_api_url,
            authorize_url=authorize_url,
            token_url=settings.oauth_token_url or origin + "/login/oauth/access_token",
            timeout=timeout,
        )
    if settings.oauth_token_url:
        if not settings.oauth_userinfo_url:
            raise ProviderError(
                "misconfigured",
                "OAUTH_USERINFO_URL is required with OAUTH_TOKEN_URL: without discovery the proxy needs the URL "
                "that returns the user's profile (id, email, name)",
            )
        return OAuth2Provider(settings, timeout=timeout)
    return OpenIDConnectProvider(settings, timeout=timeout)


@dataclass(frozen=True)
class ConnectionProviderSettings:
    """A route's `[routes.oauth]` table in the shape every provider reads (`LoginProviderSettings`)."""

    oauth_client_id: str
    oauth_client_secret: str
    oauth_authorize_url: str
    oauth_token_url: str | None
    oauth_userinfo_url: str | None
    upstream_scopes: tuple[str, ...]
    ca_bundle: str | None
    github_api_url: str | None
    provider_http_timeout: float
    #: No filter on what the connection asks for: the operator chose `scopes`, no MCP client passes any through.
    scopes_supported: tuple[str, ...] = ()
    #: A connection identifies nobody: no groups are read through it.
    reads_groups: bool = False
    groups_claim: str = "groups"


def build_connection_provider(
    route_name: str, oauth: RouteOAuth, *, ca_bundle: str | None, timeout: float
) -> OAuthProvider:
    """The provider of a route's configured downstream authorization server (not `discover`). No network.

    The same classes as the login provider (discovery, GitHub's and Microsoft's quirks, error classification,
    client authentication), registered with Authlib under a name of the route's own."""
    settings = ConnectionProviderSettings(
        oauth_client_id=oauth.client_id,
        oauth_client_secret=oauth.client_secret,
        oauth_authorize_url=oauth.authorize_url,
        oauth_token_url=oauth.token_url,
        oauth_userinfo_url=oauth.userinfo_url,
        upstream_scopes=oauth.scopes,
        ca_bundle=ca_bundle,
        github_api_url=oauth.github_api_url,
        provider_http_timeout=timeout,
    )
    provider: OAuthProvider
    if oauth.token_url and not oauth.github_api_url and detect_provider(oauth.authorize_url) == "generic":
        # Explicit endpoints; unlike a login, a connection needs no userinfo URL (nobody is identified by it).
        provider = OAuth2Provider(settings, timeout=timeout, token_endpoint_auth_method=_public_client(oauth))
    else:
        provider = build_login_provider(settings)
        if _public_client(oauth):
            provider._token_endpoint_auth_method = "none"
    provider.registration_name = f"connection_{route_name}"
    return provider


def _public_client(oauth: RouteOAuth) -> str | None:
    # RFC 6749 §2.1: a client without a secret authenticates with nothing but its id (and PKCE).
    return None if oauth.client_secret else "none"


__all__ = [
    "ConnectionProviderSettings",
    "ErrorKind",
    "GitHubProvider",
    "GoogleProvider",
    "LoginProviderSettings",
    "MicrosoftProvider",
    "OAuth2Provider",
    "OAuthProvider",
    "OpenIDConnectProvider",
    "ProviderError",
    "ProviderIdentity",
    "ProviderSettings",
    "ProviderTokens",
    "build_connection_provider",
    "build_login_provider",
    "choose_token_auth_method",
    "classify_oauth_error",
    "detect_provider",
    "discovery_candidates",
    "error_from_callback",
    "github_email",
    "is_affirmed",
    "microsoft_tenant",
    "verified_email",
]
