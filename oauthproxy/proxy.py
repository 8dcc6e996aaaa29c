"""The streaming passthrough to a downstream MCP server: body in as it comes, response out chunk by chunk."""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from werkzeug.wrappers import Response

from oauthproxy.downstream_credentials import Caller, credential_header_names, downstream_auth_headers
from oauthproxy.routes import ProxySettings, Route

log = logging.getLogger(__name__)

#: RFC 9110 §7.6.1: connection-specific fields, never forwarded (WSGI servers also refuse them from apps).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
#: Client headers never forwarded: the client's token (no token passthrough, MCP P-6), headers the proxy sets
#: itself (Host: SDK servers answer 421 to a foreign one; X-Forwarded-*: a client must not choose them),
#: Origin (checked here; SDK servers answer 403 to a foreign one), and the body framing requests recomputes.
DROPPED_REQUEST_HEADERS = frozenset({"host", "authorization", "origin", "content-length", "expect", "forwarded",
                                     "x-real-ip"})
#: The WSGI server writes its own.
DROPPED_RESPONSE_HEADERS = frozenset({"date", "server"})
#: Sent as the first bytes of an event stream so the status line and headers leave the WSGI server at once
#: (gunicorn sends them only with the first body chunk); SSE parsers ignore comment lines.
SSE_OPENING_COMMENT = b": stream open\n\n"
CHUNK_SIZE = 65536
#: Detects a dead downstream peer on a long idle stream (Linux option names; others fall back to defaults).
KEEPALIVE_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)) if hasattr(socket, name)
]


class DownstreamError(Exception):
    """The downstream could not be reached or did not answer in time: 502 or 504."""

    def __init__(self, status: int, error: str, description: str):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


class _PooledAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = HTTPConnection.default_socket_options + KEEPALIVE_OPTIONS
        super().init_poolmanager(*args, **kwargs)


class _SizedBody:
    """The client's body with its declared length: requests sends Content-Length and reads it block by block."""

    def __init__(self, stream: IO[bytes], length: int, on_end: Callable[[], None]):
        self._stream, self._length, self._remaining, self._on_end = stream, length, length, on_end

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._remaining -= len(data)
        if not data or self._remaining <= 0:
            self._on_end()
        return data


def _chunks(stream: IO[bytes], on_end: Callable[[], None]) -> Iterator[bytes]:
    while data := stream.read(CHUNK_SIZE):
        yield data
    on_end()


def _client_headers(environ: dict[str, Any]) -> list[tuple[str, str]]:
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
        elif key == "CONTENT_TYPE" and value:
            headers.append(("Content-Type", value))
    return headers


def _without_cookies(value: str, names: frozenset[str]) -> str:
    return "; ".join(part.strip() for part in value.split(";")
                     if part.strip() and part.split("=", 1)[0].strip() not in names)


def _dot_segment(segment: str) -> bool:
    return segment.lower().replace("%2e", ".") in (".", "..")


class DownstreamProxy:
    """Forwards requests to downstream MCP servers with one pooled `requests.Session` per worker process."""

    def __init__(self, settings: ProxySettings, public_url: str, proxy_cookie_names: frozenset[str]):
        self.settings = settings
        parts = urlsplit(public_url)
        self.public_host, self.public_scheme = parts.netloc, parts.scheme
        self.proxy_cookie_names = proxy_cookie_names
        self._session: requests.Session | None = None
        self._session_pid = 0
        self._session_lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        # Per process: gunicorn forks workers, and a pool shared across a fork would share sockets.
        if self._session is None or self._session_pid != os.getpid():
            with self._session_lock:
                if self._session is None or self._session_pid != os.getpid():
                    session = requests.Session()
                    # Otherwise requests re-reads proxy variables and .netrc on every call (and might route
                    # the downstream's traffic, credentials included, through an HTTP(S)_PROXY).
                    session.trust_env = False
                    session.headers.clear()  # forward what the client sent, not requests' defaults
                    adapter = _PooledAdapter(pool_connections=16, pool_maxsize=self.settings.downstream_pool_size)
                    session.mount("http://", adapter)
                    session.mount("https://", adapter)
                    self._session, self._session_pid = session, os.getpid()
        return self._session

    # -- request ----------------------------------------------------------------------------------

    def downstream_url(self, route: Route, environ: dict[str, Any]) -> str:
        """The route's downstream URL plus whatever followed the route's public path, and the query string."""
        raw_path = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or "").split("?", 1)[0]
        if not raw_path.startswith(route.path):
            raw_path = requests.utils.quote(environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=-._~%")
        suffix = raw_path[len(route.path):] if route.path != "/" else raw_path[1:]
        if any(_dot_segment(segment) for segment in suffix.split("/")):
            # `/mcp/a/../admin` must not reach `/admin` on the downstream host, outside the route's prefix.
            raise DownstreamError(400, "invalid_request", "the path may not contain . or .. segments")
        query = environ.get("QUERY_STRING", "")
        if "access_token" in query:
            # Tokens are accepted only in the Authorization header (RS-3); one in the query is never passed on.
            query = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "access_token"])
        base = urlsplit(route.downstream_url)
        if route.path == "/" and suffix:
            suffix = "/" + suffix
        path = base.path + suffix
        return urlunsplit((base.scheme, base.netloc, path or "/", "&".join(q for q in (base.query, query) if q), ""))

    def request_headers(self, route: Route, environ: dict[str, Any], caller: Caller) -> dict[str, str | bytes]:
        own = credential_header_names(route)
        connection_tokens = {token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(",")}
        headers: dict[str, str | bytes] = {}
        for name, value in _client_headers(environ):
            lower = name.lower()
            if (lower in HOP_BY_HOP or lower in DROPPED_REQUEST_HEADERS or lower in connection_tokens
                    or lower in own or lower.startswith("x-forwarded-")):
                continue
            if lower == "cookie":
                # The proxy's own session and consent cookies are its secrets, not the downstream's.
                value = _without_cookies(value, self.proxy_cookie_names)
                if not value:
                    continue
            headers[name] = value
        headers.update({"X-Forwarded-For": environ.get("REMOTE_ADDR", ""), "X-Forwarded-Host": self.public_host,
                        "X-Forwarded-Proto": self.public_scheme})
        headers.update(downstream_auth_headers(route, caller))
        return headers

    def _body(self, environ: dict[str, Any], stream: IO[bytes], on_end: Callable[[], None]) -> Any:
        length = environ.get("CONTENT_LENGTH", "")
        if length.isdigit():
            return _SizedBody(stream, int(length), on_end) if int(length) else None
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return _chunks(stream, on_end)  # forwarded chunked, as it arrives
        return None

    # -- response ---------------------------------------------------------------------------------

    def forward(self, route: Route, environ: dict[str, Any], stream: IO[bytes], caller: Caller) -> Response:
        """Send the request downstream and return a response whose body streams the downstream's as it arrives."""
        url = self.downstream_url(route, environ)
        watch = ClientWatch(environ)
        body = self._body(environ, stream, watch.start)
        prepared = requests.Request(environ["REQUEST_METHOD"], url, headers=self.request_headers(route, environ, caller),
                                    data=body).prepare()
        if body is None:
            watch.start()
        try:
            downstream = self._send(route, url, prepared)
        except ClientDisconnected:
            watch.stop()
            # urllib3 closed the downstream connection on the way out, so the downstream sees the cancellation.
            log.info("client left before downstream %s answered; request closed", route.name)
            return Response(status=499)  # nginx's "client closed request"; nobody is there to read it
        except BaseException:
            watch.stop()
            raise
        try:
            watch.attach(downstream)
            return self._response(route, environ, downstream, watch)
        except BaseException:
            watch.stop()
            downstream.close()
            raise

    def _send(self, route: Route, url: str, prepared: requests.PreparedRequest) -> requests.Response:
        try:
            # Straight to the session's pooled adapter, not `Session.request`: that would keep downstream cookies
            # in a jar shared by every user of this worker, and read a 3xx body before we could stream it.
            return self.session.get_adapter(url).send(
                prepared, stream=True,
                timeout=(self.settings.downstream_connect_timeout, self.settings.downstream_read_timeout))
        except requests.ConnectTimeout:
            raise DownstreamError(504, "downstream_timeout",
                                  f"timed out connecting to the downstream MCP server {route.name!r}") from None
        except requests.ReadTimeout:
            raise DownstreamError(504, "downstream_timeout",
                                  f"the downstream MCP server {route.name!r} did not answer in time") from None
        except requests.ConnectionError:
            raise DownstreamError(502, "downstream_unavailable",
                                  f"could not connect to the downstream MCP server {route.name!r}") from None
        except requests.RequestException as error:
            log.warning("request to downstream %s failed: %r", route.name, error)
            raise DownstreamError(502, "downstream_error",
                                  f"the request to the downstream MCP server {route.name!r} failed") from None

    def _response(self, route: Route, environ: dict[str, Any], downstream: requests.Response,
                  watch: ClientWatch) -> Response:
        content_type = downstream.headers.get("Content-Type", "")
        is_event_stream = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
        # A comment cannot be spliced into a compressed body; such a stream starts with its own first bytes.
        opening = SSE_OPENING_COMMENT if is_event_stream and not downstream.headers.get("Content-Encoding") else b""
        if is_event_stream:
            self._set_stream_idle_timeout(downstream)
        connection_tokens = {token.strip().lower() for token in downstream.headers.get("Connection", "").split(",")}
        headers = []
        for name, value in downstream.raw.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in DROPPED_RESPONSE_HEADERS or lower in connection_tokens:
                continue
            if lower == "content-length" and opening:
                continue
            if lower == "location":
                value = self._public_location(route, value)
            headers.append((name, value))
        headers.append(("X-Accel-Buffering", "no"))  # nginx and similar front proxies: do not buffer this
        response = Response(DownstreamBody(route, downstream, opening, watch), status=downstream.status_code,
                            headers=headers, direct_passthrough=True)
        if not content_type:
            del response.headers["Content-Type"]  # werkzeug adds text/html by default
        return response

    def _public_location(self, route: Route, location: str) -> str:
        base = route.downstream_url.split("?", 1)[0]
        base_path = urlsplit(base).path
        if location.startswith(base):
            return route.resource + location[len(base):]
        if base_path and (location.startswith(base_path + "/") or location == base_path):
            return route.path.rstrip("/") + location[len(base_path):]
        return location

    def _set_stream_idle_timeout(self, downstream: requests.Response) -> None:
        # The read timeout bounded the wait for headers; between events of a stream the idle limit applies.
        sock = getattr(getattr(downstream.raw, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(self.settings.downstream_stream_idle_timeout or None)


class DownstreamBody:
    """The response body: the downstream's bytes as they arrive. `close()` always ends the downstream request,
    also when the WSGI server never iterates the body (HEAD, 204, 304) or stops because the client left."""

    def __init__(self, route: Route, downstream: requests.Response, opening: bytes, watch: ClientWatch):
        self.route, self.downstream, self.opening, self.watch = route, downstream, opening, watch
        self._completed = self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        raw = self.downstream.raw
        try:
            if self.opening:
                yield self.opening
            if raw.chunked and raw.supports_chunked_reads():
                # Each chunk as the downstream wrote it: one SSE event reaches the client as soon as it is sent.
                yield from raw.read_chunked(decode_content=False)
            else:
                while chunk := raw.read1(CHUNK_SIZE, decode_content=False):
                    yield chunk
            self._completed = True
        except (urllib3.exceptions.HTTPError, OSError, ValueError, ClientDisconnected) as error:
            # The downstream went away mid-stream, or we shut it because the client did.
            log.debug("stream from downstream %s ended early: %r", self.route.name, error)
        finally:
            self.close()

    def close(self) -> None:
        # Reached through GeneratorExit too, when the WSGI server closes the body because the client left:
        # the downstream request is closed at once (in MCP 2026-07-28 that is how a client cancels).
        if self._closed:
            return
        self._closed = True
        self.watch.stop()
        if self._completed:
            self.downstream.raw.release_conn()  # back to the pool for the next request
        else:
            self.downstream.close()


def _abort(downstream: requests.Response) -> None:
    """Wake the reader by shutting the downstream socket, which also tells the downstream at once that nobody is
    listening any more."""
    sock = getattr(getattr(downstream.raw, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _gevent_hub_running() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("socket"))


class ClientDisconnected(Exception):
    """Thrown into a request's greenlet that waits for the downstream's headers when its client has gone."""


class ClientWatch:
    """Notices a client that closes its connection while its request is still being served, and ends the
    downstream request at once: in MCP 2026-07-28, closing the stream is how a client cancels.

    Without this a client that leaves during a quiet stretch (a slow tool that sends nothing, an idle GET
    stream) is noticed only at the next write, or never. Once the request body has been read, the client
    socket turns readable only on EOF (or a pipelined request, which ends the watch). Before the downstream's
    headers arrive the blocked request is interrupted (under gevent); afterwards its socket is shut.
    """

    def __init__(self, environ: dict[str, Any]):
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        usable = (sock is not None and not isinstance(sock, ssl.SSLSocket)
                  and str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1"))
        self._sock = sock if usable else None
        self._gevent = _gevent_hub_running()
        self._request_greenlet = None
        if self._gevent:
            import gevent

            self._request_greenlet = gevent.getcurrent()
        self._guard = threading.Lock()
        self._started = self._stopped = self.client_gone = False
        self._downstream: requests.Response | None = None
        self._stop_watcher: Callable[[], None] = lambda: None

    def start(self) -> None:
        """Begin watching; called once the request body has been read to its end."""
        with self._guard:
            if self._started or self._stopped or self._sock is None:
                return
            self._started = True
        sock = self._sock

        def client_is_gone() -> bool:
            try:
                return sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                return False
            except (OSError, ValueError):
                return True

        if self._gevent:
            import gevent
            from gevent.socket import wait_read

            def watch_greenlet() -> None:
                try:
                    wait_read(sock.fileno())
                except (OSError, ValueError):
                    pass
                if client_is_gone():
                    self._disconnected()

            greenlet = gevent.spawn(watch_greenlet)
            self._stop_watcher = lambda: greenlet.kill(block=False)
            return

        stopped = threading.Event()

        def watch_thread() -> None:
            while not stopped.is_set():
                try:
                    readable, _, _ = select.select([sock], [], [], 0.25)
                except (OSError, ValueError):
                    readable = [sock]
                if readable:
                    if client_is_gone():
                        self._disconnected()
                    return

        threading.Thread(target=watch_thread, daemon=True, name="client-watch").start()
        self._stop_watcher = stopped.set

    def attach(self, downstream: requests.Response) -> None:
        """The downstream's headers arrived: from now on a disconnect shuts its socket."""
        with self._guard:
            self._downstream = downstream
            gone = self.client_gone
        if gone:
            _abort(downstream)

    def _disconnected(self) -> None:
        with self._guard:  # never after stop(): the downstream connection may be back in the pool by then
            if self._stopped:
                return
            self.client_gone = True
            if self._downstream is not None:
                _abort(self._downstream)
            elif self._request_greenlet is not None:
                import gevent

                gevent.kill(self._request_greenlet, ClientDisconnected)  # asynchronous: raised at its wait

    def stop(self) -> None:
        with self._guard:
            self._stopped = True
        self._stop_watcher()
