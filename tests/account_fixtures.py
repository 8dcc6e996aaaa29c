"""The account page's proxy, shared by its tests and the admin page's: three routes, one of each credential kind."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningProxy
from tests.proxy_fixtures import McpDownstream

CALENDAR_SECRET = "calendar-connector-secret"
#: Never contacted: the page only names the calendar's authorization server (its display name).
CALENDAR_ISSUER = "http://127.0.0.1:9/calendar-issuer"


def routes_toml(downstream_url: str, issuer: str) -> str:
    """notes: a plain route to a real MCP server; tickets: each user's own API key; calendar: each user's connection."""
    return f"""
[[routes]]
name = "notes"
path = "/mcp/notes"
url = "{downstream_url}"

[[routes]]
name = "tickets"
path = "/mcp/tickets"
url = "http://127.0.0.1:9/mcp"
credential = "user_api_key"
credential_header = "X-API-Key"
api_key_help_url = "https://tickets.example.test/settings/keys"

[[routes]]
name = "calendar"
path = "/mcp/calendar"
url = "http://127.0.0.1:9/mcp"
credential = "oauth"

[routes.oauth]
authorize_url = "{issuer}"
client_id = "calendar-connector"
client_secret_env = "CALENDAR_SECRET"
display_name = "Calendar Sign-in"
"""


@pytest.fixture
def start_account_proxy(
    start_proxy: Callable[..., RunningProxy], mcp_downstream: McpDownstream, tmp_path: Path
) -> Callable[..., RunningProxy]:
    """Factory: a proxy with routes_toml's routes (notes: a real MCP server; tickets: API keys; calendar: a
    connection), and extra settings."""

    def start(**env: str) -> RunningProxy:
        routes = tmp_path / f"routes-{secrets.token_hex(3)}.toml"
        routes.write_text(routes_toml(mcp_downstream.url, CALENDAR_ISSUER))
        return start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=str(routes), CALENDAR_SECRET=CALENDAR_SECRET, **env)

    return start
