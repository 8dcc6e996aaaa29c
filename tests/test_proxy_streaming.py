"""Streaming under real gunicorn with the gevent worker: events as sent, disconnects, timeouts, many open streams."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import resource
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.interop_fixtures import worker_pids
from tests.proxy_fixtures import EchoServer, GunicornProxy, Login, McpDownstream, log_in, sse_events


@pytest.fixture
def echo_proxy(
    start_gunicorn: Callable[..., GunicornProxy], echo_downstream: EchoServer
) -> tuple[GunicornProxy, Login]:
    proxy = start_gunicorn(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_READ_TIMEOUT="1")
    return proxy, log_in(proxy.url, proxy.url + "/mcp")


def test_events_reach_the_client_as_the_downstream_sends_them(
    echo_proxy: tuple[GunicornProxy, Login], echo_downstream: EchoServer
) -> None:
    proxy, login = echo_proxy
    started = time.time()
    # The pauses (1.2 s) are longer than DOWNSTREAM_READ_TIMEOUT (1 s): a quiet open stream is not a timeout.
    response = requests.get(proxy.url + "/mcp/sse?events=4&pause=1.2", headers=login.bearer, stream=True, timeout=10)
    headers_at = time.time()
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    # Once: the downstream's own (the MCP SDK's servers send one) gives way to the proxy's.
    assert response.raw.headers.getlist("X-Accel-Buffering") == ["no"]
    events = list(sse_events(response))
    assert events[0][1] == ": stream open"
    data = [(at, text) for at, text in events[1:]]
    assert [text for _, text in data] == [f"id: {n}\ndata: event {n}" for n in range(4)]
    sent = echo_downstream.stream_events_sent
    assert len(sent) == 4
    # Headers leave gunicorn at once (an SSE comment goes first), not with the first event 1.2 s later.
    assert headers_at < sent[0], (headers_at - started, sent[0] - started)
    # Each event reaches the client before the downstream sends the next one: nothing is held back.
    # (How many milliseconds the proxy adds is measured by the benchmarks, not asserted here.)
    # (The downstream notes `sent_at` just after its write, so an arrival may precede it by microseconds.)
    for (arrived, _), sent_at, next_sent_at in zip(data, sent, [*sent[1:], float("inf")], strict=True):
        assert arrived < next_sent_at, (arrived - started, sent_at - started)
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(data)]
    assert all(gap > 1.0 for gap in gaps), gaps


@pytest.mark.parametrize("pause", [0.3, 5.0])
def test_a_client_disconnect_closes_the_downstream_request_at_once(
    echo_proxy: tuple[GunicornProxy, Login], echo_downstream: EchoServer, pause: float
) -> None:
    proxy, login = echo_proxy
    response = requests.get(
        f"{proxy.url}/mcp/sse?events=100&pause={pause}", headers=login.bearer, stream=True, timeout=10
    )
    wanted = 2 if pause < 1 else 1  # with long pauses: leave while the stream is quiet (only the comment came)
    for count, _event in enumerate(sse_events(response), start=1):
        if count == wanted:
            break
    closed_at = time.time()
    response.close()
    deadline = time.time() + 3
    while not echo_downstream.disconnects and time.time() < deadline:
        time.sleep(0.01)
    assert echo_downstream.disconnects, "the downstream request stayed open"
    # Noticed from the client socket itself, not at the next event (which would come `pause` seconds later).
    assert echo_downstream.disconnects[0] - closed_at < 0.5
    assert len(echo_downstream.stream_events_sent) < 5


def test_closing_a_tool_call_stream_cancels_the_tool(
    start_gunicorn: Callable[..., GunicornProxy], mcp_downstream: McpDownstream
) -> None:
    proxy = start_gunicorn(MCP_SERVER_URL=mcp_downstream.url)
    login = log_in(proxy.url, proxy.url + "/mcp")
    label = f"cancel-{time.time()}"

    async def scenario() -> tuple[float, object]:
        async with (
            httpx2.AsyncClient(headers=login.bearer, timeout=30) as http,
            Client(streamable_http_client(proxy.url + "/mcp", http_client=http)) as client,
        ):
            with anyio.move_on_after(1.0):  # the client gives up: in 2026-07-28 it closes the POST's stream
                await client.call_tool("wait", {"seconds": 30, "label": label})
            cancelled_at = time.time()
            await anyio.sleep(0.5)
            after = await client.call_tool("progress", {"steps": 1, "pause": 0.01})  # the session still works
            return cancelled_at, after

    cancelled_at, after = anyio.run(scenario)
    mine = {event["event"]: event["at"] for event in mcp_downstream.events() if event.get("label") == label}
    assert "wait_started" in mine and "wait_finished" not in mine
    assert mine["wait_cancelled"] - cancelled_at < 0.5  # the downstream tool was cancelled at once, not in 30 s
    assert after.structured_content == {"result": "finished 1 steps"}


def test_an_unreachable_downstream_is_a_502_naming_it(start_gunicorn: Callable[..., GunicornProxy]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        proxy = start_gunicorn(MCP_SERVER_URL=f"http://127.0.0.1:{port}/mcp")
        login = log_in(proxy.url, proxy.url + "/mcp")
        response = requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=10)
    assert response.status_code == 502
    assert response.json() == {
        "error": "downstream_unavailable",
        "error_description": "could not connect to the downstream MCP server 'mcp'",
    }
    assert response.headers["X-Downstream"] == "mcp"
    assert str(port) not in response.text  # the internal address is not shown
    # The operator's log says why, in the system's words.
    assert "could not connect to downstream mcp: [Errno 111] Connection refused" in proxy.logs()


def test_a_worker_without_descriptors_left_answers_503_to_retry_and_recovers(
    echo_proxy: tuple[GunicornProxy, Login],
) -> None:
    # Every open stream holds two descriptors in the worker (the client's, the downstream's). When its limit is
    # reached, a request that needs a new downstream connection is the proxy's own capacity problem: 503 and
    # Retry-After, not a 502 blaming the downstream; once a stream ends, requests go through again.
    proxy, login = echo_proxy
    (worker,) = worker_pids(proxy)
    host, port = proxy.url.removeprefix("http://").split(":")
    listening, caller = http.client.HTTPConnection(host, int(port)), http.client.HTTPConnection(host, int(port))
    for connection in (listening, caller):  # both accepted (and the token cached) before the limit
        connection.request("POST", "/mcp", body=b"{}", headers={**login.bearer, "Content-Type": "application/json"})
        assert connection.getresponse().read() and True
    _, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    used = len(os.listdir(f"/proc/{worker}/fd"))
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (used, hard))
    try:
        listening.request("GET", "/mcp/sse?events=1&pause=3", headers=login.bearer)  # takes the pooled connection
        stream = listening.getresponse()
        assert stream.status == 200
        caller.request("POST", "/mcp", body=b"{}", headers={**login.bearer, "Content-Type": "application/json"})
        refused = caller.getresponse()
        body = json.loads(refused.read())
        assert refused.status == 503, body
        assert refused.getheader("Retry-After") == "5"
        assert body["error"] == "temporarily_unavailable"
        assert "too many connections open" in body["error_description"]
        assert "could not connect to downstream mcp: [Errno 24] Too many open files" in proxy.logs()
    finally:
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (hard, hard))
    assert b"event 0" in stream.read()  # the open stream was never disturbed
    caller.request("POST", "/mcp", body=b"{}", headers={**login.bearer, "Content-Type": "application/json"})
    assert caller.getresponse().status == 200
    listening.close()
    caller.close()
    # Nothing else in the worker broke meanwhile (its metrics files, for one, open on demand and lose a sample).
    assert "Traceback" not in proxy.logs()


def test_a_downstream_that_does_not_answer_in_time_is_a_504(echo_proxy: tuple[GunicornProxy, Login]) -> None:
    proxy, login = echo_proxy  # DOWNSTREAM_READ_TIMEOUT=1
    started = time.monotonic()
    response = requests.post(proxy.url + "/mcp/slow?delay=3", headers=login.bearer, json={}, timeout=10)
    assert response.status_code == 504
    assert 0.9 < time.monotonic() - started < 2.5
    assert response.json() == {
        "error": "downstream_timeout",
        "error_description": "the downstream MCP server 'mcp' did not answer in time",
    }


def test_one_worker_holds_many_open_streams(
    start_gunicorn: Callable[..., GunicornProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_gunicorn(MCP_SERVER_URL=echo_downstream.url + "/mcp", WEB_CONCURRENCY="1")
    login = log_in(proxy.url, proxy.url + "/mcp")
    streams = 100

    def one_stream(_: int) -> list[str]:
        with requests.get(
            proxy.url + "/mcp/sse?events=2&pause=1.5", headers=login.bearer, stream=True, timeout=60
        ) as response:
            return [text for _, text in sse_events(response)]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        futures = [pool.submit(one_stream, n) for n in range(streams)]
        time.sleep(1.0)  # all streams are open and quiet now; the worker still answers at once
        assert requests.get(proxy.url + "/.well-known/oauth-protected-resource/mcp", timeout=10).status_code == 200
        # The worker answered while holding the streams open, not after they ended.
        still_open = sum(not future.done() for future in futures)
        results = [future.result() for future in futures]
    elapsed = time.monotonic() - started
    assert all(result[1:] == ["id: 0\ndata: event 0", "id: 1\ndata: event 1"] for result in results)
    assert still_open > 0
    # Concurrently (about 3 s when the machine is idle); one after another would take 100 x 3 s = 300 s.
    # A structural bound, not a speed target: speed is measured by the benchmarks.
    assert elapsed < 150, elapsed


def test_gunicorn_refuses_to_start_with_bad_settings(start_gunicorn: Callable[..., GunicornProxy]) -> None:
    with pytest.raises(RuntimeError, match="exited with 2") as caught:
        start_gunicorn(MCP_SERVER_URL="", MCP_ROUTES_FILE="/nonexistent/routes.toml")
    assert "MCP_ROUTES_FILE: cannot read /nonexistent/routes.toml" in str(caught.value)
