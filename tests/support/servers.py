"""HTTP servers the tests run in a thread: serving one for the length of a fixture, and a JSON document server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer
from typing import Any, TypeVar

Served = TypeVar("Served", bound=BaseServer)


@contextmanager
def serving(server: Served) -> Iterator[Served]:
    """`server` answering in a daemon thread; shut down and its socket closed afterwards."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class JsonDocumentServer(ThreadingHTTPServer):
    """Answers every GET with `document` as JSON (a client metadata document), counting the `hits`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _JsonDocumentHandler)
        self.document: dict[str, Any] = {}
        self.hits = 0


class _JsonDocumentHandler(BaseHTTPRequestHandler):
    server: JsonDocumentServer

    def do_GET(self) -> None:
        self.server.hits += 1
        body = json.dumps(self.server.document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass
