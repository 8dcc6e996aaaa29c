"""MCP authorization discovery of a downstream that does its own (route `oauth = "discover"`): not built yet."""

from __future__ import annotations

from oauthproxy.connection_providers import ConnectionProvider
from oauthproxy.providers import ProviderError
from oauthproxy.routes import Route


def discover_connection_provider(route: Route) -> ConnectionProvider:
    raise ProviderError("misconfigured", f'route {route.name}: oauth = "discover" is not supported yet')
