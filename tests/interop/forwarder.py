"""A test-only forwarder: adds `Authorization: Bearer <token>` to every request and streams the answer back.

The conformance suite's server mode sends no token. Put this on loopback in front of the proxy's MCP endpoint and
point the suite at it: every request then reaches the proxy as an authenticated client's would, and every answer
(SSE included) comes back event by event, unbuffered. It forwards exactly what it receives otherwise, so what the
suite checks is the proxy's behaviour, not this file's.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

#: RFC 9110 §7.6.1 connection-specific fields, never forwarded; Host and Authorization are set here.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
        "content-length",
    }
)


@dataclass
class Forwarded:
    method: str
    path: str
    status: int


class TokenForwarder(ThreadingHTTPServer):
    """Listens on 127.0.0.1 (a free port); forwards to `target` (an origin such as http://127.0.0.1:8080)."""

    daemon_threads = True

    def __init__(self, target: str, token: str):
        super().__init__(("127.0.0.1", 0), _ForwardHandler)
        parts = urlsplit(target)
        assert parts.hostname in ("127.0.0.1", "localhost"), "tests send traffic to loopback only"
        self.target_host, self.target_port = parts.hostname, parts.port or 80
        self.token = token
        self.forwarded: list[Forwarded] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def start(self) -> TokenForwarder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _ForwardHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TokenForwarder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        headers["Authorization"] = f"Bearer {self.server.token}"
        # Each request gets its own connection: SSE answers hold theirs open for as long as they stream.
        upstream = http.client.HTTPConnection(self.server.target_host, self.server.target_port, timeout=120)
        try:
            upstream.request(
                self.command, self.path, body=body if body or self.command == "POST" else None, headers=headers
            )
            response = upstream.getresponse()
            self.server.forwarded.append(Forwarded(self.command, self.path, response.status))
            self.send_response_only(response.status, response.reason)
            length = response.getheader("Content-Length")
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            if length is not None:
                self.send_header("Content-Length", length)
            else:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            while True:
                piece = response.read1(65536)  # what has arrived, without waiting for more: events stay events
                if not piece:
                    break
                if length is None:
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                else:
                    self.wfile.write(piece)
                self.wfile.flush()
            if length is None:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left: closing upstream below ends the proxied request
        finally:
            upstream.close()

    do_GET = do_POST = do_DELETE = _forward
