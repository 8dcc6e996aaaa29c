"""The reverse proxy to downstream MCP servers: streaming, transport, forwarding, request_body, disconnects."""

from oauthproxy.proxy.streaming import DownstreamProxy, end_open_streams
from oauthproxy.proxy.transport import DownstreamError

__all__ = ["DownstreamError", "DownstreamProxy", "end_open_streams"]
