"""Fixtures for the MCP endpoint tests: downstream servers (a raw echo and a real MCP server), gunicorn, logins.

A pytest plugin, loaded for every test module by `pytest_plugins` in tests/conftest.py; each fixture is registered
under the name without `_fixture` (`echo_downstream`, `mcp_downstream`, `start_gunicorn`).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.flows import Browser, McpOAuthClient
from tests.provider_fixture import OidcProvider
from tests.support.ports import free_port
from tests.support.processes import (
    ROOT,
    ModuleServer,
    launch_module_server,
    stop_process,
    stop_processes,
    wait_until_answers,
)
from tests.support.servers import serving
from tests.support.settings import base_env

BIN = Path(sys.executable).parent


# -- a raw echo downstream: sees exact headers on the wire ----------------------------------------


@dataclass
class SeenRequest:
    method: str
    target: str  # the request target exactly as it arrived
    headers: list[tuple[str, str]]
    body: bytes
    at: float

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} arrived {len(values)} times: {values}"
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.seen: list[SeenRequest] = []
        self.disconnects: list[float] = []
        self.stream_events_sent: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def last(self) -> SeenRequest:
        assert self.seen, "the downstream received no request"
        return self.seen[-1]


class EchoHandler(BaseHTTPRequestHandler):
    """Echoes what arrived; `/sse` streams events with pauses, `/slow` delays its headers, `/status/N` fails."""

    protocol_version = "HTTP/1.1"
    request_body = b""
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall
    server: EchoServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
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

    def _handle(self) -> None:
        seen = SeenRequest(self.command, self.path, list(self.headers.raw_items()), self._read_body(), time.time())
        self.server.seen.append(seen)
        self.request_body = seen.body
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        if parts.path.endswith("/sse"):
            return self._stream(int(query.get("events", "5")), float(query.get("pause", "0.3")))
        if parts.path.endswith("/slow"):
            time.sleep(float(query.get("delay", "3")))
        if "/status/" in parts.path:
            status = int(parts.path.rsplit("/", 1)[1])
            return self._send(
                status,
                {"error": "downstream says no"},
                [("WWW-Authenticate", 'Bearer realm="downstream", error="invalid_token"')],
            )
        if parts.path.endswith("/redirect"):
            return self._send(302, {}, [("Location", f"{self.server.url}/mcp/elsewhere?x=1")])
        if parts.path.endswith("/set-cookie"):
            return self._send(200, {}, [("Set-Cookie", f"downstream-session={query.get('who', 'someone')}; Path=/")])
        self._send(
            200,
            {
                "method": seen.method,
                "target": seen.target,
                "headers": seen.headers,
                "body": seen.body.decode("utf-8", "replace"),
            },
        )

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = _handle

    def _send(self, status: int, document: Any, extra: list[tuple[str, str]] | None = None) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        # What an MCP server answers with; hop-by-hop ones must not reach the client.
        # The client's session, or a new one for `initialize`, as a (pre-2026) MCP server answers.
        session = self.headers.get("Mcp-Session-Id")
        if session is None and b'"initialize"' in self.request_body:
            session = f"downstream-{secrets.token_hex(8)}"
        if session is not None:
            self.send_header("Mcp-Session-Id", session)
        self.send_header("MCP-Protocol-Version", "2025-11-25")
        self.send_header("X-Downstream-Custom", "kept")
        self.send_header("Keep-Alive", "timeout=5")
        self.send_header("Connection", "keep-alive, X-Hop-Secret")
        self.send_header("X-Hop-Secret", "listed-in-connection")
        for name, value in extra or []:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _client_left(self, within: float) -> bool:
        readable, _, _ = select.select([self.connection], [], [], within)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _stream(self, events: int, pause: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-accel-buffering", "no")  # as the MCP SDK's servers send it
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for number in range(events):
                if self._client_left(pause):
                    self.server.disconnects.append(time.time())
                    self.close_connection = True
                    return
                data = f"id: {number}\ndata: event {number}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                self.server.stream_events_sent.append(time.time())
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.server.disconnects.append(time.time())
            self.close_connection = True


@pytest.fixture(name="echo_downstream")
def echo_downstream_fixture() -> Iterator[EchoServer]:
    with serving(EchoServer()) as server:
        yield server


# -- a real MCP server from the SDK, in a subprocess -----------------------------------------------


class McpDownstream(ModuleServer):
    """tests/mcp_downstream.py: a real MCP server from the SDK, which also lists the events it saw."""

    def events(self) -> list[dict]:
        return requests.get(f"http://127.0.0.1:{self.port}/test/events", timeout=5).json()


def launch_mcp_downstream(log_dir: Path, *extra: str) -> McpDownstream:
    return launch_module_server("tests.mcp_downstream", log_dir, *extra, kind=McpDownstream)


@pytest.fixture(name="mcp_downstream", scope="session")
def mcp_downstream_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpDownstream]:
    server = launch_mcp_downstream(tmp_path_factory.mktemp("mcp-downstream"))
    yield server
    server.stop()


# -- the proxy under real gunicorn with the gevent worker ------------------------------------------


@dataclass
class GunicornProxy:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, signal.SIGINT, grace=10)  # SIGINT: quick shutdown, open streams need not drain


@pytest.fixture(name="start_gunicorn", scope="session")
def start_gunicorn_fixture(
    oidc_provider: OidcProvider, database_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GunicornProxy]]:
    """Factory: `start_gunicorn(workers=1, **env)` runs `gunicorn -c gunicorn.conf.py wsgi:app` on loopback."""
    started: list[GunicornProxy] = []
    log_dir = tmp_path_factory.mktemp("gunicorn")

    def start(workers: int = 1, provider: OidcProvider | None = None, **overrides: str) -> GunicornProxy:
        provider = provider or oidc_provider
        port = free_port()
        env = {
            **os.environ,
            **base_env(port, provider, database_dsn, f"gunicorn-{port}"),
            "HOST": "127.0.0.1",
            "WEB_CONCURRENCY": str(workers),
            "OAUTHPROXY_ENV_FILE": os.devnull,
            **overrides,
        }
        provider.register_client(env["OAUTH_CLIENT_ID"], env["OAUTH_CLIENT_SECRET"], [f"{env['PUBLIC_URL']}/callback"])
        log_path = log_dir / f"gunicorn-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        proxy = GunicornProxy(env["PUBLIC_URL"], process, log_path, env)
        started.append(proxy)
        # RuntimeError, not a failed assertion: a test may expect gunicorn to refuse to start.
        wait_until_answers(
            proxy.url + "/.well-known/oauth-authorization-server", process, logs=proxy.logs, failure=RuntimeError
        )
        return proxy

    yield start
    stop_processes([proxy.process for proxy in started], signal.SIGINT, grace=10)


# -- helpers ---------------------------------------------------------------------------------------


@dataclass
class Login:
    client: McpOAuthClient
    access_token: str
    refresh_token: str
    scope: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def log_in(proxy_url: str, resource: str, login_hint: str = "alice", **extra: str) -> Login:
    """A real login: register a client, authorize through consent and the real provider, redeem the code."""
    client = McpOAuthClient.register(proxy_url)
    result = client.login(Browser(proxy_url, login_hint=login_hint), resource=resource, **extra)
    assert "code" in result, result
    response = client.exchange(result["code"])
    assert response.status_code == 200, response.text
    body = response.json()
    return Login(client, body["access_token"], body["refresh_token"], body.get("scope", ""))


def toml_value(value: Any) -> str:
    """A TOML value: JSON's spelling of strings, numbers, booleans and lists, and inline tables for dicts."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(value)


def write_routes(path: Path, routes: list[dict[str, Any]]) -> str:
    """Write a routes TOML file (`[[routes]]` tables) and return its path."""
    lines = []
    for route in routes:
        lines.append("[[routes]]")
        for key, value in route.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return str(path)


def sse_events(response: requests.Response) -> Iterator[tuple[float, str]]:
    """(arrival time, event text) for each SSE event of a streamed `requests` response, as it arrives."""
    buffer = b""
    for chunk in (
        response.raw.stream(1024, decode_content=False)
        if not response.raw.chunked
        else response.raw.read_chunked(decode_content=False)
    ):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield time.time(), event.decode()
