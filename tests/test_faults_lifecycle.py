"""SIGTERM under real gunicorn with gevent workers: the listening socket stops accepting at once, requests in flight
finish, and a stream still open gets a clear end before GRACEFUL_TIMEOUT instead of a killed connection."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import requests

from tests.proxy_fixtures import EchoServer, GunicornProxy, log_in
from tests.support.databases import SQLITE_ONLY

pytestmark = SQLITE_ONLY


def test_sigterm_stops_accepting_at_once_finishes_requests_and_ends_streams(
    start_gunicorn: Callable[..., GunicornProxy], echo_downstream: EchoServer
) -> None:
    # Two workers: each used to notice SIGTERM only at its own once-a-second check, accepting until then.
    proxy = start_gunicorn(workers=2, MCP_SERVER_URL=echo_downstream.url + "/mcp", GRACEFUL_TIMEOUT="4")
    login = log_in(proxy.url, proxy.url + "/mcp")
    outcome: dict[str, object] = {}

    def stream() -> None:
        response = requests.get(
            proxy.url + "/mcp/sse?events=1000&pause=0.2", headers=login.bearer, stream=True, timeout=30
        )
        try:
            outcome["events"] = sum(chunk.count(b"data: event") for chunk in response.iter_content(None))
            outcome["stream"] = "ended"
        except requests.exceptions.ChunkedEncodingError:
            outcome["stream"] = "cut"
        outcome["stream_ended_at"] = time.monotonic()

    def slow_request() -> None:
        outcome["slow"] = requests.post(proxy.url + "/mcp/slow?delay=2", headers=login.bearer, timeout=30).status_code

    threads = [threading.Thread(target=stream), threading.Thread(target=slow_request)]
    for thread in threads:
        thread.start()
    time.sleep(0.8)  # both in flight
    proxy.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "Handling signal: term" not in proxy.logs():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    accepted = []
    for _ in range(3):
        try:
            accepted.append(requests.get(proxy.url + "/healthz", timeout=5).status_code)
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=30)
    proxy.process.wait(timeout=30)
    exited_at = time.monotonic()

    assert accepted == []  # no new connection once shutdown began
    assert outcome["slow"] == 200  # the request in flight finished
    assert outcome["stream"] == "ended" and outcome["events"] >= 3, outcome  # a clear end, not a killed connection
    assert outcome["stream_ended_at"] <= exited_at
    assert proxy.process.returncode == 0, proxy.logs()[-2000:]
