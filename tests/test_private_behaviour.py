"""Private behaviour of dependencies that the code relies on, pinned one test each: an upgrade that changes one fails
here, and the comment above each test names the place that relies on it (pyproject.toml pins these packages)."""

from __future__ import annotations

import _socket
import inspect
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import gevent
import gevent.server
import gevent.socket
import gunicorn.http.wsgi
import psycopg
import pytest
import requests
import urllib3
import werkzeug.serving
from authlib.integrations.flask_client import OAuth
from flask import Flask, current_app
from gunicorn.http import unreader
from gunicorn.workers import base, base_async, ggevent
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from oauthproxy.database_faults import _bounded_psycopg_class
from oauthproxy.proxy import transport
from oauthproxy.proxy.request_body import prepare_request
from oauthproxy.routes import ProxySettings
from tests.conftest import POSTGRES_DSN


class _KeepAliveHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a connection goes back to the pool

    def do_GET(self) -> None:
        self.server.client_ports.append(self.client_address[1])  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def keepalive_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAliveHandler)
    server.client_ports = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _get(adapter: transport._PooledAdapter, url: str) -> requests.Response:
    response = adapter.send(prepare_request("GET", url, {}, None), stream=True, timeout=5)
    assert response.raw.read() == b"ok"
    response.raw.release_conn()
    return response


# -- urllib3, requests and http.client: oauthproxy/proxy/transport.py ----------------------------------------------


# transport._PooledAdapter: requests' init_poolmanager builds `poolmanager`, whose `pool_classes_by_scheme` picks
# the pool class (and so our tuned connection class) for each scheme.
def test_the_pool_manager_builds_pools_of_the_class_named_for_their_scheme() -> None:
    adapter = transport._PooledAdapter(3.0, pool_connections=1, pool_maxsize=1)
    for url, pool_class, connection_class in (
        ("http://127.0.0.1:9/", transport._Pool, transport._Connection),
        ("https://127.0.0.1:9/", transport._TLSPool, transport._TLSConnection),
    ):
        pool = adapter.poolmanager.connection_from_url(url)
        assert isinstance(pool, pool_class)
        assert issubclass(pool.ConnectionCls, connection_class) and pool.ConnectionCls.idle_limit == 3.0


# transport._IdleNoting: urllib3 hands a connection back through the pool's private `_put_conn` when its response
# is released; that is where the connection learns when it went idle (the idle limit).
def test_a_released_connection_goes_back_through_put_conn(keepalive_server: ThreadingHTTPServer) -> None:
    adapter = transport._PooledAdapter(4.0, pool_connections=1, pool_maxsize=1)
    url = f"http://127.0.0.1:{keepalive_server.server_port}/"
    response = adapter.send(prepare_request("GET", url, {}, None), stream=True, timeout=5)
    connection = response.raw.connection
    assert isinstance(connection, transport._Connection) and connection.idle_since is None  # in use
    assert response.raw.read() == b"ok"
    response.raw.release_conn()
    assert connection.idle_since is not None


# transport._Tuned.is_connected: urllib3 asks a pooled connection's `is_connected` before reusing it, so a False
# there (idle too long, retired by retire_idle_connections) makes it open a fresh connection.
def test_a_pooled_connection_is_reused_only_while_is_connected_says_so(keepalive_server: ThreadingHTTPServer) -> None:
    adapter = transport._PooledAdapter(4.0, pool_connections=1, pool_maxsize=1)
    url = f"http://127.0.0.1:{keepalive_server.server_port}/"
    _get(adapter, url)
    _get(adapter, url)
    ports = keepalive_server.client_ports  # type: ignore[attr-defined]
    assert len(set(ports)) == 1  # reused
    adapter.retire_idle_connections()
    _get(adapter, url)
    assert len(set(ports)) == 2  # not reused: is_connected said no


# transport._IdleNoting._put_conn: urllib3's pool is a queue of `maxsize` slots (placeholders or idle connections), so
# `pool.full()` says that a connection handed back has no slot; urllib3 itself then closes it and logs a warning.
def test_connections_beyond_the_pool_size_are_closed_without_a_warning(
    keepalive_server: ThreadingHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = transport._PooledAdapter(4.0, pool_connections=1, pool_maxsize=1)
    url = f"http://127.0.0.1:{keepalive_server.server_port}/"
    both = [adapter.send(prepare_request("GET", url, {}, None), stream=True, timeout=5) for _ in range(2)]
    connections = [response.raw.connection for response in both]
    pool = both[0].raw._pool
    for response in both:
        assert response.raw.read() == b"ok"
        response.raw.release_conn()
    assert "Connection pool is full" not in caplog.text
    assert pool.pool.qsize() == 1 and pool.pool.queue[0] is connections[0]  # the first kept, idle
    assert connections[1].sock is None  # the second closed
    adapter.close()


# transport._SmallBufferResponse: urllib3 parses the response with the connection's `response_class` (http.client's
# hook), and http.client's HTTPResponse reads through the `fp` attribute its constructor sets, which we replace.
def test_the_response_class_is_ours_and_reads_through_fp(keepalive_server: ThreadingHTTPServer) -> None:
    adapter = transport._PooledAdapter(4.0, pool_connections=1, pool_maxsize=1)
    response = adapter.send(
        prepare_request("GET", f"http://127.0.0.1:{keepalive_server.server_port}/", {}, None), stream=True, timeout=5
    )
    assert isinstance(response.raw._original_response, transport._SmallBufferResponse)
    response.close()

    ours, theirs = socket.socketpair()
    with ours, theirs:
        parsed = transport._SmallBufferResponse(ours)
        theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        assert parsed.fp.peek(1)  # our buffered reader, with what the socket had
        parsed.begin()
        assert (parsed.status, parsed.read()) == (200, b"hello")


# transport._Tuned.send: http.client writes the whole request head in one `send()` call before any body, which is
# the write a small body joins.
def test_the_request_head_leaves_in_one_send(keepalive_server: ThreadingHTTPServer) -> None:
    sent: list[bytes] = []

    class Recording(transport._Connection):
        def send(self, data: Any) -> None:
            sent.append(bytes(data))
            super().send(data)

    connection = Recording("127.0.0.1", keepalive_server.server_port)
    try:
        connection.request("POST", "/", body=b"0123456789", headers={"Content-Length": "10"})
        assert len(sent) == 1 and sent[0].startswith(b"POST / HTTP/1.1\r\n")
        assert sent[0].endswith(b"\r\n\r\n")  # the head, which Tuned.send completes with the body
    finally:
        connection.close()


# transport._may_send_again: urllib3 wraps an error of getresponse() in ProtocolError(message, error) with the
# original as args[1], and with retries=False its urlopen raises that ProtocolError itself: the attempt noted on the
# original error (pooled? sent?) comes through.
def test_a_broken_answer_keeps_the_original_error_inside_protocol_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def read_then_hang_up() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.close()

    threading.Thread(target=read_then_hang_up, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    with listener, pytest.raises(urllib3.exceptions.ProtocolError) as caught:
        _downstream_transport()._urlopen(prepare_request("GET", url, {}, None))
    assert caught.value.args[1].oauthproxy_attempt == (False, True)


# transport.DownstreamTransport._route_to: requests' adapter gives the pool for a request with its TLS settings
# (`get_connection_with_tls_context`, our pool class for the scheme) and the request target (`request_url`).
def test_the_adapter_gives_the_pool_and_the_request_target(keepalive_server: ThreadingHTTPServer) -> None:
    adapter = transport._PooledAdapter(4.0, pool_connections=1, pool_maxsize=1)
    prepared = prepare_request("GET", f"http://127.0.0.1:{keepalive_server.server_port}/a/b?c=d", {}, None)
    assert isinstance(adapter.get_connection_with_tls_context(prepared, True), transport._Pool)
    assert adapter.request_url(prepared, {}) == "/a/b?c=d"
    adapter.close()


# transport.DownstreamTransport._route_to: the pools it keeps are this process's; a forked worker makes its own
# (a pool shared across a fork would share its sockets between two processes).
def test_a_forked_process_gets_pools_of_its_own(keepalive_server: ThreadingHTTPServer) -> None:
    downstream = _downstream_transport()
    prepared = prepare_request("GET", f"http://127.0.0.1:{keepalive_server.server_port}/mcp", {}, None)
    parents, _ = downstream._route_to(prepared)
    assert downstream._route_to(prepared)[0] is parents  # kept within a process
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through its exit status)
        os._exit(0 if downstream._route_to(prepared)[0] is not parents else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# transport.DownstreamTransport._route_to: one pool per origin, and a cache of request targets that starts again after
# ROUTES_CACHED distinct URLs, so that a client sending endless distinct paths or queries cannot grow it.
def test_distinct_request_urls_share_one_pool_and_a_bounded_cache(keepalive_server: ThreadingHTTPServer) -> None:
    downstream = _downstream_transport()
    base = f"http://127.0.0.1:{keepalive_server.server_port}/mcp"
    pools = set()
    for n in range(transport.ROUTES_CACHED * 3):
        pool, target = downstream._route_to(prepare_request("GET", f"{base}/{n}?q=%2F{n}", {}, None))
        assert target == f"/mcp/{n}?q=%2F{n}"
        pools.add(id(pool))
        assert len(downstream._routes) <= transport.ROUTES_CACHED
    assert len(pools) == 1 and len(downstream._pools) == 1


def _downstream_transport() -> transport.DownstreamTransport:
    return transport.DownstreamTransport(ProxySettings(), None)


# -- gevent: oauthproxy/proxy/disconnects.py ------------------------------------------------------------------------


# disconnects.ClientWatch.start: gevent's cooperative socket keeps the plain, non-blocking socket as `_sock`, which
# the watcher's callback peeks at from the hub, where nothing may wait.
def test_a_gevent_socket_wraps_a_plain_socket_as_sock() -> None:
    with gevent.socket.socket() as sock:
        assert isinstance(sock._sock, _socket.socket) and sock._sock.fileno() == sock.fileno()


# disconnects.ClientWatch.start: the hub's loop makes a bare I/O watcher with `loop.io(fd, 1)`, 1 meaning readable
# in libev and libuv alike, and runs its callback in the hub.
def test_a_loop_io_watcher_with_events_1_fires_on_readable() -> None:
    ours, theirs = socket.socketpair()
    fired = threading.Event()
    watcher = gevent.get_hub().loop.io(ours.fileno(), 1)
    try:
        watcher.start(fired.set)
        gevent.sleep(0.01)
        assert not fired.is_set()
        theirs.send(b"x")
        gevent.sleep(0.05)
        assert fired.is_set()
    finally:
        watcher.stop()
        watcher.close()
        ours.close()
        theirs.close()


# -- gunicorn: oauthproxy/worker.py and gunicorn.conf.py -----------------------------------------------------------


# gunicorn.conf.py _graceful_exit: GeventWorker.run() looks StreamServer up in gunicorn's ggevent module when it
# builds its servers, so replacing that module attribute before run() gives it ours.
def test_the_gevent_worker_finds_stream_server_in_its_module_at_run() -> None:
    assert ggevent.StreamServer is gevent.server.StreamServer
    assert "StreamServer" in ggevent.GeventWorker.run.__code__.co_names


# worker.BoundedGeventWorker: handle(listener, client, addr) passes the client socket on as handle_request's `sock`,
# so the ClientConnection wrapper given to handle() is what handle_request sees; gunicorn's parser reads it with
# recv(); gunicorn.conf.py replaces the worker's handle_exit; handle_quit takes (sig, frame).
def test_the_gevent_worker_hooks_we_override_keep_their_shape() -> None:
    assert ggevent.GeventWorker.handle.__code__.co_varnames[:4] == ("self", "listener", "client", "addr")
    assert base_async.AsyncWorker.handle_request.__code__.co_varnames[:5] == (
        "self",
        "listener_name",
        "req",
        "sock",
        "addr",
    )
    assert "handle_request" in base_async.AsyncWorker.handle.__code__.co_names
    assert "recv" in unreader.SocketUnreader.chunk.__code__.co_names
    assert ggevent.GeventWorker.handle_quit.__code__.co_varnames[:3] == ("self", "sig", "frame")
    assert callable(base.Worker.handle_exit)
    assert "worker_connections" in base_async.AsyncWorker.__init__.__code__.co_names


# -- werkzeug and gunicorn environ keys: oauthproxy/proxy/streaming.py, oauthproxy/proxy/disconnects.py -------------


# streaming.DownstreamProxy.forward: werkzeug's Request parks itself in environ["werkzeug.request"], which the
# proxy removes so a long stream does not keep the whole Request alive.
def test_a_werkzeug_request_parks_itself_in_its_environ() -> None:
    environ = EnvironBuilder().get_environ()
    request = Request(environ)
    assert environ["werkzeug.request"] is request


# disconnects.ClientWatch: the client socket comes from environ["gunicorn.socket"] (gunicorn) or
# environ["werkzeug.socket"] (werkzeug's development server).
def test_the_servers_put_the_client_socket_in_environ() -> None:
    assert '"gunicorn.socket"' in inspect.getsource(gunicorn.http.wsgi)
    assert '"werkzeug.socket"' in inspect.getsource(werkzeug.serving)


# -- psycopg: oauthproxy/database_faults.py --------------------------------------------------------------------------


# database_faults._bounded_psycopg_class: Connection.wait(gen, interval, timeout) is where every wait for the server
# happens, and it raises psycopg.errors._WaitTimeout when the timeout runs out.
def test_a_bounded_postgres_wait_ends_with_wait_timeout() -> None:
    bounded = _bounded_psycopg_class(0.3)
    connection = bounded.connect(POSTGRES_DSN, connect_timeout=5)
    try:
        with pytest.raises(psycopg.OperationalError, match=r"did not answer within 0\.3 s"):
            connection.execute("SELECT pg_sleep(5)")
        assert connection.closed
    finally:
        connection.close()


# -- Flask-Limiter: oauthproxy/rate_limits.py ---------------------------------------------------------------------


# rate_limits.init_rate_limits: Flask-Limiter's init_app registers its bound `_check_request_limit` as an app-wide
# before_request function, which the proxy removes; a view's own limit is checked in its decorator's wrapper.
def test_flask_limiter_checks_decorated_views_without_its_before_request_pass() -> None:
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    app = Flask(__name__)
    limiter = Limiter(get_remote_address, app=app, storage_uri="memory://")
    assert limiter._check_request_limit in app.before_request_funcs[None]
    app.before_request_funcs[None].remove(limiter._check_request_limit)

    @app.route("/limited")
    @limiter.limit("1 per minute")
    def limited() -> str:
        return "ok"

    client = app.test_client()
    assert [client.get("/limited").status_code for _ in range(2)] == [200, 429]


# -- Authlib and Flask: oauthproxy/providers/base.py (upstream.py before the providers split), components.py ----------


# The provider's init_app (providers/base.py; upstream.UpstreamProvider.init_app before): Authlib's Flask OAuth
# caches each created client in `_clients` by name, and a second register() under the same name takes effect only
# once the cached client is dropped from it.
def test_authlib_caches_clients_by_name_in_clients() -> None:
    oauth = OAuth(Flask(__name__))
    endpoints = {"authorize_url": "https://idp.example/a", "access_token_url": "https://idp.example/t"}
    oauth.register("provider", client_id="first", client_secret="s", **endpoints)
    assert oauth.create_client("provider").client_id == "first"
    oauth.register("provider", client_id="second", client_secret="s", **endpoints)
    assert oauth.create_client("provider").client_id == "first"  # the cached one
    oauth._clients.pop("provider", None)
    oauth.register("provider", client_id="second", client_secret="s", **endpoints)
    assert oauth.create_client("provider").client_id == "second"


# components.current_application (and its callers: cli.py, operations.py, resource_server.py): the application
# object behind Flask's current_app proxy comes from werkzeug LocalProxy's `_get_current_object()`.
def test_current_app_gives_its_application_through_get_current_object() -> None:
    app = Flask(__name__)
    with app.app_context():
        assert current_app._get_current_object() is app
