"""The proxy's settings in the tests: a loopback instance signing in at the test OpenID provider."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.provider_fixture import OidcProvider

TEST_KEY = base64.b64encode(b"k" * 32).decode()


def base_env(port: int, provider: OidcProvider, database_dsn: str, client_id: str) -> dict[str, str]:
    return {
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "PORT": str(port),
        "OAUTH_CLIENT_ID": client_id,
        "OAUTH_CLIENT_SECRET": "upstream-secret-" + client_id,
        "OAUTH_AUTHORIZE_URL": provider.issuer,
        "SCOPES_SUPPORTED": "openid,email,profile",
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "DATABASE_DSN": database_dsn,
        "ENCRYPTION_KEY": TEST_KEY,
        "REGISTER_RATE_LIMIT": "1000 per minute",
    }
