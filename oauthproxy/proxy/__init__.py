"""The reverse proxy to downstream MCP servers: streaming.py forwards and streams, transport.py holds the tuned
connection pool, forwarding.py the URL and header rules, request_body.py the client's body on its way, and
disconnects.py notices a client that leaves."""

from oauthproxy.proxy.streaming import DownstreamProxy, end_open_streams
from oauthproxy.proxy.transport import DownstreamError

__all__ = ["DownstreamError", "DownstreamProxy", "end_open_streams"]
