"""Request bodies on the MCP endpoint: malformed chunked framing and bodies over MCP_MAX_BODY_BYTES never reach the
downstream as a complete request; the client gets a JSON 400 or 413."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.proxy_fixtures import GunicornProxy, Login, log_in

LIMIT = 200_000


class RawDownstream:
    """A downstream that records the bytes of every connection and never answers: what arrived, exactly."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.connections: list[bytearray] = []
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/mcp"

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            received = bytearray()
            self.connections.append(received)
            threading.Thread(target=self._read, args=(connection, received), daemon=True).start()

    def _read(self, connection: socket.socket, received: bytearray) -> None:
        connection.settimeout(10)
        with connection:
            try:
                while data := connection.recv(65536):
                    received.extend(data)
            except OSError:
                pass

    def received(self) -> bytes:
        time.sleep(0.3)  # the proxy closes its side when it gives up; let the last bytes land
        return b"".join(bytes(data) for data in self.connections)

    def stop(self) -> None:
        self._stopped.set()
        self.listener.close()


@pytest.fixture(scope="module")
def raw_downstream_server() -> Iterator[RawDownstream]:
    server = RawDownstream()
    yield server
    server.stop()


@pytest.fixture
def raw_downstream(raw_downstream_server: RawDownstream) -> RawDownstream:
    raw_downstream_server.connections.clear()
    return raw_downstream_server


def send_raw_body(proxy_url: str, login: Login, headers: dict[str, str], body: bytes) -> tuple[int, dict, str]:
    """POST /mcp with the body bytes on the wire exactly as given (framing included)."""
    host, port = proxy_url.split("//", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        connection.putrequest("POST", "/mcp")
        for name, value in {**login.bearer, "Content-Type": "application/json", **headers}.items():
            connection.putheader(name, value)
        connection.endheaders()
        try:
            connection.send(body)
        except OSError:
            pass  # the proxy may answer and close before it has read everything
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
        return response.status, dict(response.getheaders()), text
    finally:
        connection.close()


@pytest.fixture(scope="module")
def proxy_and_login(
    start_gunicorn: Callable[..., GunicornProxy], raw_downstream_server: RawDownstream
) -> tuple[GunicornProxy, Login]:
    proxy = start_gunicorn(MCP_SERVER_URL=raw_downstream_server.url, MCP_MAX_BODY_BYTES=str(LIMIT))
    return proxy, log_in(proxy.url, proxy.url + "/mcp")


@pytest.mark.parametrize(
    "first_chunk",
    [
        b"0x2\r\nab\r\n",
        b"-1\r\nab\r\n",
        b"2;\x01bad\r\nab\r\n",
        b'2 ;x="\r\nab\r\n',
        b"zz\r\nab\r\n",
        b"2\r\nabcd\r\n",
        b"\r\nab\r\n",
    ],
)
def test_a_malformed_first_chunk_is_refused_before_the_downstream_is_contacted(
    proxy_and_login: tuple[GunicornProxy, Login], raw_downstream: RawDownstream, first_chunk: bytes
) -> None:
    proxy, login = proxy_and_login
    status, _, text = send_raw_body(proxy.url, login, {"Transfer-Encoding": "chunked"}, first_chunk + b"0\r\n\r\n")
    assert status == 400, text
    assert json.loads(text)["error"] == "invalid_request"
    assert raw_downstream.received() == b""  # not even the request head
    assert "Traceback" not in proxy.logs()


def test_a_malformed_later_chunk_aborts_the_downstream_request(
    proxy_and_login: tuple[GunicornProxy, Login], raw_downstream: RawDownstream
) -> None:
    proxy, login = proxy_and_login
    good = b"x" * 0x10000
    status, _, text = send_raw_body(
        proxy.url, login, {"Transfer-Encoding": "chunked"}, b"10000\r\n" + good + b"\r\n" + b"0x2\r\nab\r\n0\r\n\r\n"
    )
    assert status == 400, text
    assert json.loads(text)["error"] == "invalid_request"
    received = raw_downstream.received()
    assert received.startswith(b"POST /mcp HTTP/1.1\r\n")  # it had begun: the first chunk streamed through
    assert not received.endswith(b"0\r\n\r\n")  # but the downstream never saw the body end: no complete request
    assert "Traceback" not in proxy.logs()


@pytest.mark.parametrize("size", [LIMIT + 1, 10**12])
def test_a_declared_length_over_the_limit_gets_413_before_forwarding(
    proxy_and_login: tuple[GunicornProxy, Login], raw_downstream: RawDownstream, size: int
) -> None:
    proxy, login = proxy_and_login
    status, headers, text = send_raw_body(proxy.url, login, {"Content-Length": str(size)}, b"{" * 1000)
    assert status == 413, text
    assert headers["Content-Type"] == "application/json"
    assert json.loads(text) == {
        "error": "request_too_large",
        "error_description": f"the request body is larger than {LIMIT} bytes, this server's limit (MCP_MAX_BODY_BYTES)",
    }
    assert raw_downstream.received() == b""


def test_a_chunked_body_that_grows_past_the_limit_is_cut_off(
    proxy_and_login: tuple[GunicornProxy, Login], raw_downstream: RawDownstream
) -> None:
    proxy, login = proxy_and_login
    block = b"%x\r\n%s\r\n" % (50_000, b"y" * 50_000)
    status, _, text = send_raw_body(proxy.url, login, {"Transfer-Encoding": "chunked"}, block * 6 + b"0\r\n\r\n")
    assert status == 413, text
    assert json.loads(text)["error"] == "request_too_large"
    received = raw_downstream.received()
    assert received.startswith(b"POST /mcp HTTP/1.1\r\n")  # the first 64 KiB streamed before the limit was passed
    assert len(received) < LIMIT + 70_000 and not received.endswith(b"0\r\n\r\n")  # never a complete request


def test_a_chunked_body_over_the_limit_from_the_start_is_refused_unsent(
    start_gunicorn: Callable[..., GunicornProxy], raw_downstream: RawDownstream
) -> None:
    proxy = start_gunicorn(MCP_SERVER_URL=raw_downstream.url, MCP_MAX_BODY_BYTES="1024")
    login = log_in(proxy.url, proxy.url + "/mcp")
    status, _, text = send_raw_body(
        proxy.url, login, {"Transfer-Encoding": "chunked"}, b"800\r\n" + b"z" * 2048 + b"\r\n0\r\n\r\n"
    )
    assert status == 413, text
    assert raw_downstream.received() == b""


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("lots", "MCP_MAX_BODY_BYTES must be a number of bytes; got 'lots'"),
        ("10", "MCP_MAX_BODY_BYTES must be between 1024 and 1099511627776; got 10"),
    ],
)
def test_the_limit_setting_is_validated(value: str, problem: str) -> None:
    from oauthproxy.routes import load_proxy_settings

    problems: list[str] = []
    assert load_proxy_settings({}, "https://proxy.example", problems).max_body_bytes == 8 * 1024 * 1024 and not problems
    load_proxy_settings({"MCP_MAX_BODY_BYTES": value}, "https://proxy.example", problems)
    assert problems == [problem]
