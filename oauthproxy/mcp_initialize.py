"""The MCP `initialize` request the proxy sends as a client of its own: to check a downstream, try a user's key, or
start discovery of a downstream's authorization."""

from __future__ import annotations

from typing import Any

#: The revision every current server still accepts.
DEFAULT_PROTOCOL_VERSION = "2025-06-18"


def initialize_request(client_name: str, protocol_version: str = DEFAULT_PROTOCOL_VERSION) -> dict[str, Any]:
    """What a client sends first, so a server answers it as it would a real client; `client_name` says which of the
    proxy's probes it is, in the server's logs."""
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": protocol_version,
            "capabilities": {},
            "clientInfo": {"name": client_name, "version": "1"},
        },
    }
