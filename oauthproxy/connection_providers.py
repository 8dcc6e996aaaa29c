"""Which authorization server a route's downstream connection signs in at, and with which parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from oauthproxy.components import components
from oauthproxy.providers import OAuthProvider, ProviderError
from oauthproxy.routes import Route

#: Where every downstream authorization server sends the user back: one redirect URI for all routes, registered by
#: the operator at a configured provider and listed in the proxy's client metadata document for discovered ones.
CONNECT_CALLBACK_PATH = "/connect/callback"


@dataclass(frozen=True)
class ConnectionProvider:
    """A route's downstream authorization server, ready for the connect step and for refreshing its tokens."""

    provider: OAuthProvider
    #: What the connect hop asks for.
    scopes: tuple[str, ...]
    #: Added to the authorization request (and, for `resource`, to the token requests: RFC 8707 §2.1-2.2).
    authorize_params: dict[str, str] = field(default_factory=dict)
    token_params: dict[str, str] = field(default_factory=dict)
    #: What the connect page and the account page call it.
    display_name: str = ""
    #: Who issues the tokens (issuer or authorize URL), stored with each connection.
    issuer: str = ""


def connection_provider(route: Route) -> ConnectionProvider:
    """The route's downstream authorization server: configured at start-up, or found by MCP discovery on first use.

    Raises `ProviderError` (`misconfigured` or `transient`) when it cannot be reached or found."""
    oauth = route.oauth
    if oauth is None:
        raise ProviderError("misconfigured", f"route {route.name} has no downstream authorization server")
    if oauth.discover:
        from oauthproxy.downstream_discovery import discover_connection_provider

        return discover_connection_provider(route)
    provider = components().connection_providers[route.name]
    return ConnectionProvider(
        provider=provider,
        # The provider's identity scopes, offline_access where it needs that for a refresh token, then `scopes`.
        scopes=tuple(provider.scopes_for([])),
        authorize_params=dict(oauth.authorize_params),
        display_name=oauth.display_name or provider.display_name,
        issuer=oauth.authorize_url,
    )
