"""Connections to downstream MCP servers: the tuned urllib3 pool, timeouts, one retry, and the 502/504 answers."""

from __future__ import annotations

import errno
import functools
import http.client
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import HTTPResponse

from oauthproxy.routes import ProxySettings, Route

log = logging.getLogger(__name__)

#: Block size of bodies streamed through, in either direction.
CHUNK_SIZE = 65536
#: Request bodies up to this size (MCP JSON-RPC messages) are read whole and leave in the same write as the request
#: headers; larger ones stream through block by block.
SMALL_BODY = 65536
#: Read buffer of a downstream response (http.client's default: 8 KiB). It lives as long as the response, so an idle
#: stream holds it; response heads and SSE chunk lines fit in far less, and larger reads bypass it.
RESPONSE_BUFFER = 1024
#: Detects a dead downstream peer on a long idle stream (Linux option names; others fall back to defaults).
KEEPALIVE_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4))
    if hasattr(socket, name)
]
#: Distinct downstream URLs whose pool and request target are kept (then the cache starts again).
ROUTES_CACHED = 1024
#: RFC 9110 §9.2.2: a request with one of these methods may be sent again after a broken connection.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class DownstreamError(Exception):
    """A request that cannot be forwarded, with the client's answer: 502 or 504 when the downstream could not be
    reached or did not answer in time, 503 (with `retry_after` seconds) when the proxy itself cannot open another
    connection now, 400 or 413 for a request the downstream must not receive."""

    def __init__(self, status: int, error: str, description: str, retry_after: int | None = None):
        super().__init__(description)
        self.status, self.error, self.description, self.retry_after = status, error, description, retry_after


@functools.cache
def gevent_hub_running() -> bool:
    """Whether this process runs under gevent (gunicorn's gevent worker), where waits go through the hub."""
    # Once per process: gevent's workers patch before they import the app, and nothing unpatches.
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("socket"))


def _gevent_sleep(seconds: float) -> None:
    from gevent import sleep

    sleep(seconds)


@functools.cache
def _unpatched_poll() -> Callable[[], Any]:
    monkey = sys.modules.get("gevent.monkey")
    return monkey.get_original("select", "poll") if monkey is not None else select.poll


class _SmallBufferResponse(http.client.HTTPResponse):
    def __init__(self, sock: Any, debuglevel: int = 0, method: str | None = None, url: str | None = None):
        super().__init__(sock, debuglevel, method, url)
        default, self.fp = self.fp, sock.makefile("rb", RESPONSE_BUFFER)
        default.close()  # nothing was read through it yet; closing it leaves the socket open
        self._socket = sock

    def wait_readable(self) -> None:
        """Under gevent, wait until the body has bytes to read (or the connection ends, or its timeout passes:
        TimeoutError), at the caller's depth: an idle stream parks here rather than deep inside http.client, its
        buffered reader and gevent's socket, and a parked greenlet keeps the memory its stack touched (its saved C
        stack, its Python frames): bench/analysis.md. Returns at once when bytes are buffered already."""
        from gevent.socket import wait_read

        sock = self._socket
        if self.fp is None:
            return
        buffered = self._buffered(sock)
        # Nothing, or only the CRLF that ends the chunk just read (http.client leaves it, and reading past it waits
        # for the next chunk's size line): wait. Anything else is read1's to finish.
        if buffered is not None and (not buffered or (buffered == b"\r\n" and self.chunk_left == 0)):
            wait_read(sock.fileno(), timeout=sock.gettimeout())

    def _buffered(self, sock: Any) -> bytes | None:
        """The bytes that have arrived and not been read: the read buffer's, else what one read that does not wait
        finds on the socket (BufferedReader.peek reads only when its buffer is empty, and keeps what it read); None
        when that cannot be told (TLS wanting more bytes to decrypt, a socket shut meanwhile)."""
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            return self.fp.peek(1)
        except (OSError, ValueError):
            return None
        finally:
            sock.settimeout(timeout)


class _Tuned:
    """What our connections to the downstream do differently from urllib3's (the figures: bench/analysis.md,
    "Figures formerly in code comments").

    - The check before reusing a pooled connection: urllib3 polls with `select.poll` and a zero timeout. Under gevent
      that is the patched poll, which still arms a timer and makes a trip through the hub, CPU paid on every
      request. The unpatched poll answers the same question (anything to read, or closed?) in one system call that
      never blocks.
    - A small request body leaves in the same write as the request head; urllib3 writes them separately: one more
      system call and TCP segment per request, for the downstream too.
    - Responses read through a small buffer (RESPONSE_BUFFER), memory that each open stream holds.
    - A connection idle in the pool longer than `idle_limit` is not reused: the downstream closes idle keep-alive
      connections on its own schedule (uvicorn: after 5 s), and a request sent as it does so is lost (a reset, and
      for a POST no way to tell whether the tool ran).
    """

    sock: Any
    response_class = _SmallBufferResponse
    _body_with_headers: bytes | None = None
    idle_limit = 4.0
    #: Pooled connections idle since before this moment are not reused (set when one of them turned out broken).
    retire_idle_before = 0.0
    #: When it went back to the pool (monotonic); None while in use or before its first request.
    idle_since: float | None = None
    #: For the request under way: whether it went out on a pooled connection, and whether its first write left.
    _reused = _sent = False

    @property
    def is_connected(self) -> bool:
        if self.sock is None:
            return False
        if self.idle_since is not None and (
            time.monotonic() - self.idle_since > self.idle_limit or self.idle_since <= self.retire_idle_before
        ):
            return False  # urllib3 closes it and opens a fresh one
        poller = _unpatched_poll()()
        poller.register(self.sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **options: Any) -> None:
        self._body_with_headers = None
        self._reused, self._sent, self.idle_since = self.sock is not None and self.idle_since is not None, False, None
        if isinstance(body, bytes) and len(body) <= SMALL_BODY and headers and "Content-Length" in headers:
            # Framed by the Content-Length header that prepare_request set, so urllib3 adds no framing of its own.
            self._body_with_headers, body = body, None
        super().request(method, url, body, headers, **options)  # type: ignore[misc]
        if gevent_hub_running():
            # Give way once per request, while the downstream works on it. On a busy worker in front of a fast
            # downstream every socket is ready whenever a greenlet looks, so it never waits: it would serve its
            # connection request after request while the others starve (their p99: bench/analysis.md). Not the same
            # as the worker's yield after each answer (worker.py): without this one too, p99 at 20 connections in
            # front of nginx went from 20 to 49 ms.
            _gevent_sleep(0)

    def send(self, data: Any) -> None:
        body, self._body_with_headers = self._body_with_headers, None
        super().send(data + body if body is not None else data)  # type: ignore[misc]  # the first write: the head
        self._sent = True

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        except (http.client.HTTPException, OSError) as error:
            # urllib3 wraps this in ProtocolError and drops the connection: note what _may_send_again needs to know.
            error.oauthproxy_attempt = (self._reused, self._sent)  # type: ignore[union-attr]
            raise


class _Connection(_Tuned, HTTPConnection):  # type: ignore[misc]  # response_class: http.client's, ours a subclass
    pass


class _TLSConnection(_Tuned, HTTPSConnection):  # type: ignore[misc]  # as _Connection
    pass


class _IdleNoting:
    pool: Any

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            conn.idle_since = time.monotonic()
            if self.pool is not None and self.pool.full():
                # More streams ended together than the pool keeps (DOWNSTREAM_POOL_SIZE): the extra connections are
                # closed, as urllib3 would, but without its warning for each (10,000 lines when 10,000 streams end).
                conn.close()
                return
        super()._put_conn(conn)  # type: ignore[misc]


class _Pool(_IdleNoting, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_IdleNoting, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _PooledAdapter(HTTPAdapter):
    connection_classes: tuple[type[_Connection], type[_TLSConnection]]

    def __init__(self, idle_limit: float, **kwargs: Any):
        self.idle_limit = idle_limit  # read by init_poolmanager, which HTTPAdapter.__init__ calls
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = HTTPConnection.default_socket_options + KEEPALIVE_OPTIONS
        super().init_poolmanager(*args, **kwargs)
        limit = {"idle_limit": self.idle_limit}
        self.connection_classes = (
            type("_Connection", (_Connection,), limit),
            type("_TLSConnection", (_TLSConnection,), limit),
        )
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("_Pool", (_Pool,), {"ConnectionCls": self.connection_classes[0]}),
            "https": type("_TLSPool", (_TLSPool,), {"ConnectionCls": self.connection_classes[1]}),
        }

    def retire_idle_connections(self) -> None:
        """Pooled connections idle until now are not reused: the downstream has been closing them."""
        for connection_class in self.connection_classes:
            connection_class.retire_idle_before = time.monotonic()


def _may_send_again(prepared: requests.PreparedRequest, error: urllib3.exceptions.ProtocolError) -> bool:
    """Whether a request that failed on a broken connection may go out once more, on a fresh connection.

    Only when it went out on a pooled connection (one the downstream may have been closing as we sent), broke before
    any byte of an answer, has a body we still hold, and either never left or is idempotent (RFC 9110 §9.2.2): a
    reset does not prove that a POST was not processed, and a tool must not run twice.
    """
    if len(error.args) < 2:
        return False
    reused, sent = getattr(error.args[1], "oauthproxy_attempt", (False, True))
    return (
        reused
        and (prepared.body is None or isinstance(prepared.body, bytes))
        and (not sent or prepared.method in IDEMPOTENT_METHODS)
    )


#: Seconds a client is asked to wait when this worker has no file descriptor left for a downstream connection.
NO_DESCRIPTORS_RETRY_AFTER = 5


def _innermost_cause(error: BaseException) -> BaseException:
    """The error the system raised under urllib3's wrappers (refused, unreachable, no descriptors): urllib3 raises
    its own from the socket's, so the chain leads there."""
    cause = error
    for _ in range(10):  # a chain, never a cycle, but bounded all the same
        following = cause.__cause__ or cause.__context__
        if following is None:
            break
        cause = following
    return cause


def _downstream_error(route: Route, error: urllib3.exceptions.HTTPError | OSError) -> DownstreamError:
    """The client's answer for a failed downstream request, named for what happened."""
    # NewConnectionError is a ConnectTimeoutError in urllib3's hierarchy (for history's sake): it is a refusal.
    if isinstance(error, urllib3.exceptions.ConnectTimeoutError) and not isinstance(
        error, urllib3.exceptions.NewConnectionError
    ):
        return DownstreamError(
            504, "downstream_timeout", f"timed out connecting to the downstream MCP server {route.name!r}"
        )
    if isinstance(error, urllib3.exceptions.ReadTimeoutError):
        return DownstreamError(
            504, "downstream_timeout", f"the downstream MCP server {route.name!r} did not answer in time"
        )
    if isinstance(error, urllib3.exceptions.ProtocolError):
        # Connected, sent, and the connection broke (reset or closed) before an answer came.
        log.warning("downstream %s closed the connection without answering: %r", route.name, error)
        return DownstreamError(
            502,
            "downstream_unavailable",
            f"the downstream MCP server {route.name!r} closed the connection without answering",
        )
    if isinstance(error, urllib3.exceptions.NewConnectionError | urllib3.exceptions.SSLError | OSError):
        cause = _innermost_cause(error)
        # Its message names no URL, header or credential: "[Errno 111] Connection refused".
        log.warning("could not connect to downstream %s: %s", route.name, str(cause) or type(cause).__name__)
        if isinstance(cause, OSError) and cause.errno in (errno.EMFILE, errno.ENFILE):
            # The proxy's own limit (open streams hold two descriptors each), not the downstream's failure.
            return DownstreamError(
                503,
                "temporarily_unavailable",
                f"the proxy has too many connections open to reach the downstream MCP server {route.name!r} now; "
                "retry after the Retry-After delay",
                retry_after=NO_DESCRIPTORS_RETRY_AFTER,
            )
        return DownstreamError(
            502, "downstream_unavailable", f"could not connect to the downstream MCP server {route.name!r}"
        )
    log.warning("request to downstream %s failed: %r", route.name, error)
    return DownstreamError(502, "downstream_error", f"the request to the downstream MCP server {route.name!r} failed")


class DownstreamTransport:
    """Sends prepared requests to downstream MCP servers over one pool of tuned connections per worker process."""

    def __init__(self, settings: ProxySettings, ca_bundle: str | None = None):
        self.settings = settings
        self.ca_bundle = ca_bundle  # CA_BUNDLE: downstream servers with certificates from a private PKI
        self._adapter: _PooledAdapter | None = None
        self._adapter_pid = 0
        self._adapter_lock = threading.Lock()
        self._routes: dict[str, tuple[HTTPConnectionPool, str]] = {}  # per process, with the adapter
        self._pools: dict[str, HTTPConnectionPool] = {}
        self._timeout = urllib3.Timeout(
            connect=settings.downstream_connect_timeout, read=settings.downstream_read_timeout
        )

    @property
    def adapter(self) -> _PooledAdapter:
        # Per process: gunicorn forks workers, and a pool shared across a fork would share sockets.
        if self._adapter is None or self._adapter_pid != os.getpid():
            with self._adapter_lock:
                if self._adapter is None or self._adapter_pid != os.getpid():
                    self._adapter = _PooledAdapter(
                        self.settings.downstream_pool_idle_timeout,
                        pool_connections=16,
                        pool_maxsize=self.settings.downstream_pool_size,
                    )
                    self._adapter_pid = os.getpid()
                    self._routes, self._pools = {}, {}
        return self._adapter

    def send(self, route: Route, prepared: requests.PreparedRequest) -> HTTPResponse:
        """The downstream's response, its body still to be read (then `release_conn()`); DownstreamError when there
        is none."""
        try:
            try:
                return self._urlopen(prepared)
            except urllib3.exceptions.ProtocolError as error:
                if not _may_send_again(prepared, error):
                    raise
                log.info(
                    "downstream %s closed a pooled connection before answering %s; sent again on a fresh one",
                    route.name,
                    prepared.method,
                )
            self.adapter.retire_idle_connections()
            return self._urlopen(prepared)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _downstream_error(route, error) from None

    def _urlopen(self, prepared: requests.PreparedRequest) -> HTTPResponse:
        # Straight to urllib3's pool, with what requests' adapter would pass it: not through a `requests.Session`,
        # which would keep downstream cookies in a jar shared by every user of this worker, read proxy variables and
        # .netrc (and might route the downstream's traffic, credentials included, through an HTTP(S)_PROXY), and
        # read a 3xx body before we could stream it; and not through the adapter's `send` either, whose per-request
        # work (the pool looked up from a parsed URL, a `requests.Response` with a copy of the headers and a cookie
        # jar) was about 60-100 µs of CPU per request (bench/analysis.md).
        pool, target = self._route_to(prepared)
        body = prepared.body
        return pool.urlopen(  # type: ignore[return-value]  # preload_content=False: an HTTPResponse to stream
            prepared.method or "GET",
            target,
            body=body,
            headers=prepared.headers,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=False,
            retries=False,  # errors as they are; the one retry that is safe is ours (send)
            timeout=self._timeout,
            chunked=body is not None and "Content-Length" not in prepared.headers,
            release_conn=False,
        )

    def _route_to(self, prepared: requests.PreparedRequest) -> tuple[HTTPConnectionPool, str]:
        """The pool for the request's URL and its request target, looked up once per distinct URL. One pool per
        origin (scheme, host, port), made by requests' adapter with its TLS settings, kept for the process: the
        origins are the routes' downstream URLs, a fixed few."""
        adapter = self.adapter  # first: in a forked worker it starts these caches again, so no pool is shared
        url = prepared.url or ""
        found = self._routes.get(url)
        if found is None:
            origin = "/".join(url.split("/", 3)[:3])  # scheme://host:port, as requests normalised it
            pool = self._pools.get(origin)
            if pool is None:
                verify = self.ca_bundle or True  # CA_BUNDLE, per request: the environment's CA variables do not apply
                made = adapter.get_connection_with_tls_context(prepared, verify)
                assert isinstance(made, HTTPConnectionPool)  # ours: _Pool or _TLSPool (init_poolmanager)
                adapter.cert_verify(made, url, verify, None)
                pool = self._pools[origin] = made
            if len(self._routes) >= ROUTES_CACHED:
                self._routes.clear()
            found = self._routes[url] = (pool, adapter.request_url(prepared, {}))
        return found

    def set_stream_idle_timeout(self, raw: HTTPResponse) -> None:
        # The read timeout bounded the wait for headers; between events of a stream the idle limit applies.
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(self.settings.downstream_stream_idle_timeout or None)
