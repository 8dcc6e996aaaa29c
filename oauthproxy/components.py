"""The services the application factory builds once per app, reached through one typed accessor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:
    from flask_limiter import Limiter

    from oauthproxy.authorization_server import AuthorizationServer
    from oauthproxy.client_metadata import ClientMetadataFetcher
    from oauthproxy.crypto import SecretBox
    from oauthproxy.identity_assertions import IdentityAssertions
    from oauthproxy.mcp_sessions import SessionBindings
    from oauthproxy.provider_tokens import KeyedLocks
    from oauthproxy.providers import OAuthProvider
    from oauthproxy.proxy import DownstreamProxy
    from oauthproxy.resource_server import TokenCache
    from oauthproxy.revocation_feed import RevocationFeed
    from oauthproxy.routes import Route
    from oauthproxy.signing_keys import SigningKeys

_KEY = "oauthproxy"


class Components:
    """What `configure_app` builds, in the order it builds them; an attribute read before it is set is a bug in the
    factory's order, and raises AttributeError rather than returning None. The settings stay where Flask keeps
    configuration, `app.config["SETTINGS"]`."""

    secret_box: SecretBox
    client_metadata_fetcher: ClientMetadataFetcher
    login_provider: OAuthProvider
    #: The downstream authorization servers of routes with credential `oauth`, by route name.
    connection_providers: dict[str, OAuthProvider]
    authorization_server: AuthorizationServer
    routes: dict[str, Route]
    token_cache: TokenCache
    #: Announces revocations to every worker of every instance, and listens for them in this one.
    revocation_feed: RevocationFeed
    refresh_locks: KeyedLocks
    mcp_sessions: SessionBindings
    downstream_proxy: DownstreamProxy
    rate_limiter: Limiter
    #: The keys that sign identity assertions, and the assertions signed and kept for reuse (identity_assertions.py).
    signing_keys: SigningKeys
    identity_assertions: IdentityAssertions
    # Filled on first use by operations._schema_revisions: (head revisions, every revision) of the shipped scripts.
    schema_revisions: tuple[set[str], set[str]] | None = None


def attach_components(app: Flask) -> Components:
    """Create the empty registry for `app`; configure_app fills it as it builds each service."""
    components = Components()
    app.extensions[_KEY] = components
    return components


def components(app: Flask | None = None) -> Components:
    """The services of `app`, or of the current application."""
    return (app or current_app).extensions[_KEY]


def current_application() -> Flask:
    """The application behind `current_app`'s proxy, for code that keeps it beyond the request or passes it on."""
    return current_app._get_current_object()  # type: ignore[attr-defined]  # werkzeug's LocalProxy is untyped here
