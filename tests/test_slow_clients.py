"""Slow clients cannot hold a worker (issue 9), under real gunicorn with the proxy's gevent worker: a request head or
body that never arrives is cut off, and thousands of half-sent requests do not stop one worker from answering."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.proxy_fixtures import EchoServer, GunicornProxy, log_in
from tests.support.servers import serving
from tests.support.wire import content_length

HEAD_TIMEOUT = 2
BODY_TIMEOUT = 2
SLACK = 3  # seconds a loaded CI machine may add before a cut-off is seen


def address(proxy: GunicornProxy) -> tuple[str, int]:
    host, port = proxy.url.removeprefix("http://").split(":")
    return host, int(port)


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed; fails after `within` s."""
    started = time.monotonic()
    sock.settimeout(within)
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {within} s; received {answer[:200]!r}")
    return answer, time.monotonic() - started


def assert_no_traceback(proxy: GunicornProxy) -> None:
    assert "Traceback" not in proxy.logs(), proxy.logs()[-3000:]


@pytest.fixture(scope="module")
def module_echo() -> Iterator[EchoServer]:
    with serving(EchoServer()) as server:
        yield server


@pytest.fixture(scope="module")
def timed_proxy(start_gunicorn: Callable[..., GunicornProxy], module_echo: EchoServer) -> GunicornProxy:
    """One proxy for the deadline tests, with deadlines of 2 s so that they run quickly."""
    return start_gunicorn(
        MCP_SERVER_URL=module_echo.url + "/mcp",
        REQUEST_HEAD_TIMEOUT=str(HEAD_TIMEOUT),
        REQUEST_BODY_TIMEOUT=str(BODY_TIMEOUT),
    )


def test_a_head_that_never_ends_is_cut_off_with_408(timed_proxy: GunicornProxy) -> None:
    with socket.create_connection(address(timed_proxy)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        answer, took = read_until_closed(sock, HEAD_TIMEOUT + SLACK)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "invalid_request"
    assert took >= HEAD_TIMEOUT - 0.5, took
    assert_no_traceback(timed_proxy)


def test_a_dripping_head_is_cut_off_at_its_deadline(timed_proxy: GunicornProxy) -> None:
    """One byte every 0.3 s keeps each read short; the deadline is for the whole head."""
    with socket.create_connection(address(timed_proxy)) as sock:
        started = time.monotonic()
        sock.settimeout(0.3)
        answer = b""
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 100:
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer or time.monotonic() - started > HEAD_TIMEOUT + SLACK:
                break
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), (answer, took)
    assert took < HEAD_TIMEOUT + SLACK, took


def test_a_silent_new_connection_is_closed(timed_proxy: GunicornProxy) -> None:
    with socket.create_connection(address(timed_proxy)) as sock:
        answer, _ = read_until_closed(sock, HEAD_TIMEOUT + SLACK)
    assert answer == b"", answer


@pytest.mark.parametrize("path", ["/register", "/mcp"])
def test_a_body_that_never_arrives_is_cut_off(timed_proxy: GunicornProxy, module_echo: EchoServer, path: str) -> None:
    headers = ""
    if path == "/mcp":
        headers = f"Authorization: Bearer {log_in(timed_proxy.url, timed_proxy.url + '/mcp').access_token}\r\n"
    with socket.create_connection(address(timed_proxy)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
            'Content-Length: 1000\r\n\r\n{"client_name": '.encode()
        )
        answer, took = read_until_closed(sock, BODY_TIMEOUT + SLACK)
    assert took >= BODY_TIMEOUT - 0.5, took
    if answer:  # whoever answers says it is the client's fault
        assert answer.startswith(b"HTTP/1.1 4"), answer[:300]
    time.sleep(0.5)
    # Half a body is never passed on as if it were the whole.
    for seen in module_echo.seen:
        assert len(seen.body) == int(seen.header("Content-Length") or len(seen.body)), seen
    assert_no_traceback(timed_proxy)


def test_a_body_sent_slowly_but_steadily_is_served(timed_proxy: GunicornProxy) -> None:
    """The body limit is on each pause, not the total: pauses just under it, for twice as long, are fine."""
    body = json.dumps(
        {
            "client_name": "Slow but steady",
            "redirect_uris": ["http://127.0.0.1:33418/callback"],
            "token_endpoint_auth_method": "none",
        }
    ).encode()
    pieces = [body[:20], body[20:40], body[40:]]
    with socket.create_connection(address(timed_proxy)) as sock:
        sock.sendall(
            b"POST /register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for piece in pieces:
            time.sleep(BODY_TIMEOUT * 0.6)
            sock.sendall(piece)
        answer, _ = read_until_closed(sock, 10)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]


def test_an_idle_kept_alive_connection_outlives_the_head_timeout(timed_proxy: GunicornProxy) -> None:
    """Between requests the keep-alive timeout (75 s) applies, not the head timeout: one connection, two requests."""
    with socket.create_connection(address(timed_proxy), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < content_length(answer):
                data = sock.recv(65536)
                assert data, f"closed after {answer!r}"
                answer += data
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            time.sleep(HEAD_TIMEOUT + 1)
    assert_no_traceback(timed_proxy)


# -- capacity: half-sent requests on one worker ------------------------------------------------------------------------

WORKER_CONNECTIONS = 1000
HALF_SENT = 3000  # three times the worker's connections: what once filled every slot for the keep-alive's 75 s


@pytest.fixture
def half_sent() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def test_half_sent_requests_do_not_stop_the_worker(
    start_gunicorn: Callable[..., GunicornProxy], half_sent: list[socket.socket]
) -> None:
    # A head timeout far longer than the test: only the cap on waiting connections can keep the worker answering.
    proxy = start_gunicorn(WORKER_CONNECTIONS=str(WORKER_CONNECTIONS), REQUEST_HEAD_TIMEOUT="60")
    for _ in range(HALF_SENT):
        sock = socket.create_connection(address(proxy), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        half_sent.append(sock)
    time.sleep(0.5)  # let the worker accept what it will
    started = time.monotonic()
    health = requests.get(proxy.url + "/healthz", timeout=5)
    assert health.status_code == 200
    metadata = requests.get(proxy.url + "/.well-known/oauth-authorization-server", timeout=5)
    assert metadata.status_code == 200
    registered = requests.post(
        proxy.url + "/register",
        timeout=5,
        json={
            "client_name": "Real client",
            "redirect_uris": ["http://127.0.0.1:33418/callback"],
            "token_endpoint_auth_method": "none",
        },
    )
    assert registered.status_code == 201, registered.text
    took = time.monotonic() - started
    assert took < 5, took
    assert_no_traceback(proxy)


FLOOD_CONNECTIONS = 4
FLOOD_REQUESTS = 1500  # per connection, pipelined: the next one is always there when the worker looks
UNAUTHENTICATED = (
    b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)
STATUS_LINE = b"HTTP/1.1 401 "


def test_a_client_that_always_has_its_next_request_ready_does_not_starve_the_others(
    timed_proxy: GunicornProxy,
) -> None:
    """Requests the proxy answers itself (a 401 here, or a denied tool call) never wait on anything. Without giving way
    after each, a connection whose next request is always ready kept the worker to itself: 20 such connections kept
    another client's request waiting 0.2-3.2 s. Counted in answers, not seconds: how many of the flood's requests
    were answered while one other request waited for its turn."""
    answered = [0] * FLOOD_CONNECTIONS
    floods = [socket.create_connection(address(timed_proxy), timeout=30) for _ in range(FLOOD_CONNECTIONS)]

    def send(sock: socket.socket) -> None:
        sock.sendall(UNAUTHENTICATED * FLOOD_REQUESTS)

    def read(index: int, sock: socket.socket) -> None:
        tail = b""
        while answered[index] < FLOOD_REQUESTS and (data := sock.recv(65536)):
            seen = tail + data
            answered[index] += seen.count(STATUS_LINE)
            tail = seen[-(len(STATUS_LINE) - 1) :]  # a status line split across two reads is counted once

    threads = [threading.Thread(target=send, args=(sock,), daemon=True) for sock in floods]
    threads += [threading.Thread(target=read, args=(i, sock), daemon=True) for i, sock in enumerate(floods)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while sum(answered) < 200 and time.monotonic() < deadline:
            time.sleep(0.001)
        with socket.create_connection(address(timed_proxy), timeout=30) as probe:
            before = sum(answered)
            probe.sendall(UNAUTHENTICATED)
            status = b""
            while len(status) < len(STATUS_LINE) and (data := probe.recv(len(STATUS_LINE) - len(status))):
                status += data
            during = sum(answered) - before
        assert status == STATUS_LINE
        total = FLOOD_CONNECTIONS * FLOOD_REQUESTS
        assert before < total, "the flood had ended before the other request was sent: nothing was contested"
        # Served in turn, it waits for about one answer per flood connection; kept waiting, for the whole flood.
        assert during < 100, f"{during} of the flood's requests were answered while one other request waited"
        for thread in threads:
            thread.join(timeout=60)
        assert answered == [FLOOD_REQUESTS] * FLOOD_CONNECTIONS
    finally:
        for sock in floods:
            sock.close()
    assert_no_traceback(timed_proxy)
