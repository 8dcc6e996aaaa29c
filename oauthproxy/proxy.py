"""The streaming passthrough to a downstream MCP server: body in as it comes, response out chunk by chunk."""

from __future__ import annotations

import _socket
import functools
import http.client
import logging
import os
import select
import socket
import ssl
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import HTTPResponse
from werkzeug.wrappers import Response

from oauthproxy.downstream_credentials import Caller, credential_header_names, downstream_auth_headers
from oauthproxy.routes import ProxySettings, Route

log = logging.getLogger(__name__)

#: RFC 9110 §7.6.1: connection-specific fields, never forwarded (WSGI servers also refuse them from apps).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Client headers never forwarded: the client's token (no token passthrough, MCP P-6), headers the proxy sets
#: itself (Host: SDK servers answer 421 to a foreign one; X-Forwarded-*: a client must not choose them),
#: Origin (checked here; SDK servers answer 403 to a foreign one), and the body framing requests recomputes.
DROPPED_REQUEST_HEADERS = frozenset(
    {"host", "authorization", "origin", "content-length", "expect", "forwarded", "x-real-ip"}
)
#: Client headers other stacks trust for identity, the client address or the original URL, removed as the
#: X-Forwarded-* ones are: a downstream behind another proxy, or a framework that reads them, must not take a
#: client's word for who it is (Apache's and IIS's Remote-User, X-Original-URL and X-Rewrite-URL; CDN client
#: addresses).
IDENTITY_SPOOFING_HEADERS = frozenset(
    {
        "remote-user",
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "fastly-client-ip",
    }
)
#: The same, by prefix: X-Forwarded-* (ours to set), oauth2-proxy's X-Auth-Request-*, Kubernetes' and Apache's
#: X-Remote-*, Azure's X-MS-Client-Principal*, Google IAP's, AWS ALB's and Cloudflare Access's identity headers.
IDENTITY_SPOOFING_PREFIXES = (
    "x-forwarded-",
    "x-auth-request-",
    "x-remote-",
    "x-ms-client-principal",
    "x-goog-authenticated-user-",
    "x-amzn-oidc-",
    "cf-access-",
)
#: The WSGI server writes its own.
DROPPED_RESPONSE_HEADERS = frozenset({"date", "server"})
_NEVER_FORWARDED = HOP_BY_HOP | DROPPED_REQUEST_HEADERS | IDENTITY_SPOOFING_HEADERS
#: Sent as the first bytes of an event stream so the status line and headers leave the WSGI server at once
#: (gunicorn sends them only with the first body chunk); SSE parsers ignore comment lines.
SSE_OPENING_COMMENT = b": stream open\n\n"
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


class DownstreamError(Exception):
    """The downstream could not be reached or did not answer in time: 502 or 504."""

    def __init__(self, status: int, error: str, description: str):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


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


#: RFC 9110 §9.2.2: a request with one of these methods may be sent again after a broken connection.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class _Tuned:
    """What our connections to the downstream do differently from urllib3's (measured in docs/benchmarks.md).

    - The check before reusing a pooled connection: urllib3 polls with `select.poll` and a zero timeout. Under gevent
      that is the patched poll, which still arms a timer and makes a trip through the hub: ~40 µs of CPU per
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
            # Framed by the Content-Length header that _prepare set, so urllib3 adds no framing of its own.
            self._body_with_headers, body = body, None
        super().request(method, url, body, headers, **options)  # type: ignore[misc]
        if _gevent_hub_running():
            # Give way once per request, while the downstream works on it. On a busy worker in front of a fast
            # downstream every socket is ready whenever a greenlet looks, so it never waits: it would serve its
            # connection request after request while the others starve (p99 at 20 connections 150 ms → 25 ms).
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


class _Connection(_Tuned, HTTPConnection):
    pass


class _TLSConnection(_Tuned, HTTPSConnection):
    pass


class _IdleNoting:
    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            conn.idle_since = time.monotonic()
        super()._put_conn(conn)  # type: ignore[misc]


class _Pool(_IdleNoting, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_IdleNoting, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _PooledAdapter(HTTPAdapter):
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


@functools.lru_cache(maxsize=1024)
def _prepared_url(url: str) -> str:
    """requests' normalisation of a URL (IDNA host, percent-encoding), once per distinct URL: ~40 µs that an MCP
    client, posting to the same URL over and over, would otherwise pay on every request."""
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    return prepared.url  # type: ignore[return-value]  # set by prepare_url


def _read_whole(stream: IO[bytes], length: int) -> bytes:
    parts, remaining = [], length
    while remaining > 0:
        data = stream.read(remaining)
        if not data:
            break  # Werkzeug raises ClientDisconnected first when the client sent less than it announced
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


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


def _read_chunked(stream: IO[bytes], received: int, limit: int) -> bytes:
    """The next block of a chunked upload, or the client's answer: 400 for broken framing, 413 past `limit`."""
    try:
        data = stream.read(CHUNK_SIZE)
    except Exception as error:  # gunicorn's ParseException is no OSError; werkzeug raises OSError or ValueError
        log.info("malformed chunked request body: %s", type(error).__name__)
        raise DownstreamError(
            400,
            "invalid_request",
            "the request body is not valid chunked transfer coding "
            "(RFC 9112 §7.1): a chunk size or extension is malformed",
        ) from None
    if received + len(data) > limit:
        raise body_too_large(limit)
    return data


def body_too_large(limit: int) -> DownstreamError:
    return DownstreamError(
        413,
        "request_too_large",
        f"the request body is larger than {limit} bytes, this server's limit (MCP_MAX_BODY_BYTES)",
    )


def _chunks(stream: IO[bytes], limit: int, on_end: Callable[[], None]) -> Iterator[bytes]:
    """A chunked upload, forwarded as it arrives. The first block is read before the downstream is contacted, so a
    body broken (or too large) from the start is refused without a byte sent; a later bad block raises out of
    urllib3's send loop, which then closes the connection before the terminating chunk: the downstream never
    receives a complete request."""
    first = _read_chunked(stream, 0, limit)

    def blocks(data: bytes) -> Iterator[bytes]:
        received = 0
        while data:
            yield data
            received += len(data)
            data = _read_chunked(stream, received, limit)
        on_end()

    return blocks(first)


def _without_cookies(value: str, names: frozenset[str]) -> str:
    return "; ".join(
        part.strip() for part in value.split(";") if part.strip() and part.split("=", 1)[0].strip() not in names
    )


#: Rounds of percent-decoding a path segment gets; a segment still encoded after this many is refused.
DECODING_ROUNDS = 4


class PathRefused(ValueError):
    """A request path that could reach the downstream outside its route's prefix, in some server's reading."""


def _fully_decoded(value: str, decode: Callable[[str], str] = unquote) -> str | None:
    """`value` percent-decoded until nothing changes, as a server that decodes again might read it; None when it
    still changes after DECODING_ROUNDS."""
    for _round in range(DECODING_ROUNDS):
        decoded = decode(value)
        if decoded == value:
            return value
        value = decoded
    return None


def _decoded_segment(segment: str) -> str:
    decoded = _fully_decoded(segment)
    if decoded is None:
        raise PathRefused("a path segment is percent-encoded too many times over")
    return decoded


def _check_segment(decoded: str) -> None:
    # Everything before a `;` (path parameters: Tomcat and Spring read `/..;x/` as `/../`); Windows servers drop
    # trailing dots and spaces, so `...` and `.. ` are dot segments too.
    if "." in decoded and not decoded.split(";", 1)[0].strip(" ."):
        raise PathRefused("the path may not contain . or .. segments, in any spelling")
    if "/" in decoded or "\\" in decoded:
        raise PathRefused("the path may not contain an encoded / or a \\ (%2F, %5C)")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in decoded):
        raise PathRefused("the path may not contain control characters (%00 to %1F, %7F)")


def confined_suffix(route_path: str, raw_path: str) -> str:
    """The part of `raw_path` (the path as sent) below the route's path, kept as sent, or PathRefused.

    The rule (README, "Path confinement"): the route matches on a segment boundary only; no segment of the whole
    path, percent-decoded repeatedly, is `.` or `..` (also as `..;param`, `...`), contains `/` or `\\` or a control
    character; and no segment below the route is empty (`//`). A downstream that decodes `%2F`, resolves dot
    segments or splits on backslashes (nginx, IIS, Tomcat) then still serves a path under the route's prefix.
    """
    segments = raw_path.split("/")
    decoded = [_decoded_segment(segment) for segment in segments]
    for segment in decoded:
        _check_segment(segment)
    prefix = route_path.rstrip("/").split("/")  # "/mcp": ["", "mcp"]; "/": [""]
    if decoded[: len(prefix)] != [unquote(segment) for segment in prefix]:
        raise PathRefused("the path is not under this route's path")
    below = segments[len(prefix) :]
    if not below or (below == [""] and route_path == "/"):
        return ""
    if "" in below[:-1]:
        raise PathRefused("the path may not contain empty segments (//)")
    return "/" + "/".join(below)


def _is_token_parameter(name: str) -> bool:
    decoded = _fully_decoded(name, unquote_plus)
    return decoded is None or decoded.strip().lower() == "access_token"


def query_without_tokens(query: str) -> str:
    """The query as sent, less every `access_token` parameter in any spelling (`access%5Ftoken`, `%61ccess_token`,
    `ACCESS_TOKEN`, encoded twice, after a `;` that some servers take as a separator): tokens are accepted only in
    the Authorization header (RS-3), and one in the query is never passed on."""
    if "%" not in query and "access_token" not in query.lower():
        return query
    return "&".join(
        pair
        for pair in query.split("&")
        if not any(_is_token_parameter(part.split("=", 1)[0]) for part in pair.split(";"))
    )


class ProxiedResponse(Response):
    """The client's response to a forwarded request, with the downstream's `Mcp-Session-Id` (if any) at hand."""

    mcp_session_id: str | None = None


class DownstreamProxy:
    """Forwards requests to downstream MCP servers with one pooled `requests.Session` per worker process."""

    def __init__(
        self, settings: ProxySettings, public_url: str, proxy_cookie_names: frozenset[str], ca_bundle: str | None = None
    ):
        self.settings = settings
        self.ca_bundle = ca_bundle  # CA_BUNDLE: downstream servers with certificates from a private PKI
        parts = urlsplit(public_url)
        self.public_host, self.public_scheme = parts.netloc, parts.scheme
        self.proxy_cookie_names = proxy_cookie_names
        self._session: requests.Session | None = None
        self._session_pid = 0
        self._session_lock = threading.Lock()
        self._own_headers: dict[str, frozenset[str]] = {}  # per route name: what credential_header_names says

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
                    adapter = _PooledAdapter(
                        self.settings.downstream_pool_idle_timeout,
                        pool_connections=16,
                        pool_maxsize=self.settings.downstream_pool_size,
                    )
                    session.mount("http://", adapter)
                    session.mount("https://", adapter)
                    self._session, self._session_pid = session, os.getpid()
        return self._session

    # -- request ----------------------------------------------------------------------------------

    def downstream_url(self, route: Route, environ: dict[str, Any]) -> str:
        """The route's downstream URL plus whatever followed the route's public path, and the query string."""
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if raw:
            raw_path = raw.split("?", 1)[0].split("#", 1)[0]
            if not raw_path.startswith("/"):
                raw_path = urlsplit(raw_path).path  # the absolute form, `GET http://host/mcp HTTP/1.1`
        else:
            raw_path = requests.utils.quote(environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=-._~%")
        try:
            suffix = confined_suffix(route.path, raw_path)
        except PathRefused as refused:
            raise DownstreamError(400, "invalid_request", str(refused)) from None
        query = query_without_tokens(environ.get("QUERY_STRING", ""))
        base = urlsplit(route.downstream_url)
        path = base.path + suffix
        return urlunsplit((base.scheme, base.netloc, path or "/", "&".join(q for q in (base.query, query) if q), ""))

    def request_headers(self, route: Route, environ: dict[str, Any], caller: Caller) -> dict[str, str | bytes]:
        own = self._own_headers.get(route.name)
        if own is None:
            own = self._own_headers[route.name] = credential_header_names(route)
        connection_tokens = {token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(",")}
        headers: dict[str, str | bytes] = {}
        for key, value in environ.items():
            if not key.startswith("HTTP_"):
                if key == "CONTENT_TYPE" and value:
                    headers["Content-Type"] = value
                continue
            lower = key[5:].replace("_", "-").lower()
            if (
                lower in _NEVER_FORWARDED
                or lower in connection_tokens
                or lower in own
                or lower.startswith(IDENTITY_SPOOFING_PREFIXES)
            ):
                continue
            if lower == "cookie":
                # The proxy's own session and consent cookies are its secrets, not the downstream's.
                value = _without_cookies(value, self.proxy_cookie_names)
                if not value:
                    continue
            headers[lower.title()] = value
        headers.update(
            {
                "X-Forwarded-For": environ.get("REMOTE_ADDR", ""),
                "X-Forwarded-Host": self.public_host,
                "X-Forwarded-Proto": self.public_scheme,
            }
        )
        headers.update(downstream_auth_headers(route, caller))
        return headers

    def _body(self, environ: dict[str, Any], stream: IO[bytes], on_end: Callable[[], None]) -> Any:
        length = environ.get("CONTENT_LENGTH", "")
        if length.isdigit():
            size = int(length)
            if size > self.settings.max_body_bytes:
                raise body_too_large(self.settings.max_body_bytes)  # before a byte goes downstream
            if size <= SMALL_BODY:
                # Also spares requests' check whether a body is a readable stream, a runtime Protocol check
                # that cost ~0.1 ms.
                return _read_whole(stream, size) if size else None
            return _SizedBody(stream, size, on_end)
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return _chunks(stream, self.settings.max_body_bytes, on_end)
        return None

    # -- response ---------------------------------------------------------------------------------

    def forward(self, route: Route, environ: dict[str, Any], stream: IO[bytes], caller: Caller) -> ProxiedResponse:
        """Send the request downstream and return a response whose body streams the downstream's as it arrives."""
        url = self.downstream_url(route, environ)
        watch = ClientWatch(environ)
        body = self._body(environ, stream, watch.start)
        prepared = _prepare(environ["REQUEST_METHOD"], url, self.request_headers(route, environ, caller), body)
        if body is None or isinstance(body, bytes):
            watch.start()  # the whole body has been read
        try:
            if prepared.method == "GET" and _gevent_hub_running():
                downstream = self._send_apart(route, url, prepared, watch)
            else:
                downstream = self._send(route, url, prepared)
        except ClientDisconnected:
            watch.stop()
            # urllib3 closed the downstream connection on the way out, so the downstream sees the cancellation.
            log.info("client left before downstream %s answered; request closed", route.name)
            return ProxiedResponse(status=499)  # nginx's "client closed request"; nobody is there to read it
        except BaseException:
            watch.stop()
            raise
        try:
            watch.attach(downstream.raw)
            # The WSGI server keeps environ for as long as the response streams, and werkzeug parked the whole
            # Request object in it; the request context has its own reference, for as long as it needs one.
            environ.pop("werkzeug.request", None)
            return self._response(route, environ, downstream, watch)
        except BaseException:
            watch.stop()
            downstream.close()
            raise

    def _send_apart(
        self, route: Route, url: str, prepared: requests.PreparedRequest, watch: ClientWatch
    ) -> requests.Response:
        """`_send` on a greenlet of its own, for GET: MCP's listening streams, held open for minutes or hours.

        Waiting for the downstream's headers runs deepest into requests, urllib3 and http.client. Every greenlet keeps
        the memory its deepest moment touched (its Python 3.11 frame stack, its C stack), and the request's greenlet
        goes on to hold the stream: on a greenlet that ends with the exchange, ~4 KB less per idle stream. It costs
        ~50 µs (a fresh frame stack), hence not for POST, whose answers end with their call (docs/benchmarks.md).
        """
        from greenlet import getcurrent, greenlet

        current = getcurrent()
        apart = greenlet(lambda: self._send(route, url, prepared), parent=current)
        apart.gr_context = current.gr_context  # the request's context variables (Flask's request, for log lines)
        watch.waiting_in(apart)  # a client that leaves now interrupts the greenlet that waits
        try:
            return apart.switch()  # its result, or its exception, comes back here when it ends
        finally:
            watch.waiting_in(current)

    def _send(self, route: Route, url: str, prepared: requests.PreparedRequest) -> requests.Response:
        # Straight to the session's pooled adapter, not `Session.request`: that would keep downstream cookies in a jar
        # shared by every user of this worker, and read a 3xx body before we could stream it.
        adapter = self.session.get_adapter(url)
        timeout = (self.settings.downstream_connect_timeout, self.settings.downstream_read_timeout)
        verify = self.ca_bundle or True  # CA_BUNDLE, per request: the environment's CA variables do not override it
        try:
            try:
                return adapter.send(prepared, stream=True, verify=verify, timeout=timeout)
            except requests.ConnectionError as error:
                if not _may_send_again(prepared, error):
                    raise
                log.info(
                    "downstream %s closed a pooled connection before answering %s; sent again on a fresh one",
                    route.name,
                    prepared.method,
                )
            adapter.retire_idle_connections()
            return adapter.send(prepared, stream=True, verify=verify, timeout=timeout)
        except requests.RequestException as error:
            raise _downstream_error(route, error) from None

    def _response(
        self, route: Route, environ: dict[str, Any], downstream: requests.Response, watch: ClientWatch
    ) -> ProxiedResponse:
        content_type = downstream.headers.get("Content-Type", "")
        is_event_stream = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
        # A comment cannot be spliced into a compressed body; such a stream starts with its own first bytes.
        opening = SSE_OPENING_COMMENT if is_event_stream and not downstream.headers.get("Content-Encoding") else b""
        if is_event_stream:
            self._set_stream_idle_timeout(downstream)
        connection_tokens = {token.strip().lower() for token in downstream.headers.get("Connection", "").split(",")}
        headers = []
        session_id = None
        for name, value in downstream.raw.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in DROPPED_RESPONSE_HEADERS or lower in connection_tokens:
                continue
            if lower == "content-length" and opening:
                continue
            if lower == "location":
                value = self._public_location(route, value)
            elif lower == "mcp-session-id":
                session_id = value
            headers.append((name, value))
        headers.append(("X-Accel-Buffering", "no"))  # nginx and similar front proxies: do not buffer this
        body = DownstreamBody(
            route, downstream.raw, opening, watch, listening=is_event_stream and environ.get("REQUEST_METHOD") == "GET"
        )
        response = ProxiedResponse(body, status=downstream.status_code, headers=headers, direct_passthrough=True)
        # Noted on the way, not looked up: a lookup in Werkzeug's (or requests') headers costs 3-7 µs a request.
        response.mcp_session_id = session_id
        if not content_type:
            del response.headers["Content-Type"]  # werkzeug adds text/html by default
        return response

    def _public_location(self, route: Route, location: str) -> str:
        base = route.downstream_url.split("?", 1)[0]
        base_path = urlsplit(base).path
        if location.startswith(base):
            return route.resource + location[len(base) :]
        if base_path and (location.startswith(base_path + "/") or location == base_path):
            return route.path.rstrip("/") + location[len(base_path) :]
        return location

    def _set_stream_idle_timeout(self, downstream: requests.Response) -> None:
        # The read timeout bounded the wait for headers; between events of a stream the idle limit applies.
        sock = getattr(getattr(downstream.raw, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(self.settings.downstream_stream_idle_timeout or None)


#: Bodies being streamed in this process, for `end_open_streams` at shutdown.
_open_bodies: weakref.WeakSet[DownstreamBody] = weakref.WeakSet()


def end_open_streams() -> int:
    """End every response still streaming, for a worker that must exit (gunicorn.conf.py, at GRACEFUL_TIMEOUT).

    A listening stream (GET) ends normally: an SSE client reconnects, and reaches an instance that stays. Any other
    (a tool call still running) is cut, so its client sees it incomplete rather than as an answer. Returns how many.
    """
    bodies = list(_open_bodies)
    for body in bodies:
        body.end_for_shutdown()
    return len(bodies)


class DownstreamBody:
    """The response body: the downstream's bytes as they arrive. `close()` always ends the downstream request,
    also when the WSGI server never iterates the body (HEAD, 204, 304) or stops because the client left."""

    def __init__(self, route: Route, raw: HTTPResponse, opening: bytes, watch: ClientWatch, listening: bool = False):
        # urllib3's response only: requests' Response (its copy of the headers, its cookie jar, the prepared
        # request it came from) is then freed, rather than held by every open stream.
        self.route, self.raw, self.opening, self.watch, self.listening = route, raw, opening, watch, listening
        self._completed = self._closed = self._shutting_down = False

    def __iter__(self) -> Iterator[bytes]:
        raw = self.raw
        _open_bodies.add(self)
        try:
            if self.opening:
                yield self.opening
            # What has arrived, as soon as it has (for a chunked body, at most the rest of the current chunk): one
            # SSE event reaches the client as soon as the downstream sends it. Not urllib3's read_chunked(): one
            # generator less between the WSGI server and the socket is a smaller stack for an idle stream to keep.
            while chunk := raw.read1(CHUNK_SIZE, decode_content=False):
                yield chunk
            self._completed = True
        except (urllib3.exceptions.HTTPError, OSError, ValueError, ClientDisconnected) as error:
            if self._shutting_down:
                log.info("stream from downstream %s ended for shutdown", self.route.name)
                if not self.listening and not self.watch.abort_client():
                    raise
            elif self.watch.client_gone or isinstance(error, ClientDisconnected):
                log.debug("stream from downstream %s ended early: %r", self.route.name, error)  # we shut it
            else:
                # The downstream died or stalled mid-answer. Ending normally would send the client a final chunk, a
                # complete-looking answer; cut the connection instead, so the client sees it truncated.
                log.warning(
                    "downstream %s broke off its answer to %s: %r; client connection aborted",
                    self.route.name,
                    self.route.path,
                    error,
                )
                if not self.watch.abort_client():
                    raise  # no socket of ours to cut (TLS, HTTP/2): the WSGI server drops the connection itself
        finally:
            self.close()

    def end_for_shutdown(self) -> None:
        self._shutting_down = True
        _abort(self.raw)  # wakes the read above

    def close(self) -> None:
        # Reached through GeneratorExit too, when the WSGI server closes the body because the client left:
        # the downstream request is closed at once (in MCP 2026-07-28 that is how a client cancels).
        if self._closed:
            return
        self._closed = True
        _open_bodies.discard(self)
        self.watch.stop()
        if not self._completed:
            self.raw.close()  # what requests' Response.close() does with a body it did not read
        self.raw.release_conn()  # complete: back to the pool for the next request


def _may_send_again(prepared: requests.PreparedRequest, error: requests.ConnectionError) -> bool:
    """Whether a request that failed on a broken connection may go out once more, on a fresh connection.

    Only when it went out on a pooled connection (one the downstream may have been closing as we sent), broke before
    any byte of an answer, has a body we still hold, and either never left or is idempotent (RFC 9110 §9.2.2): a
    reset does not prove that a POST was not processed, and a tool must not run twice.
    """
    cause = error.args[0] if error.args else None
    if not isinstance(cause, urllib3.exceptions.ProtocolError) or len(cause.args) < 2:
        return False
    reused, sent = getattr(cause.args[1], "oauthproxy_attempt", (False, True))
    return (
        reused
        and (prepared.body is None or isinstance(prepared.body, bytes))
        and (not sent or prepared.method in IDEMPOTENT_METHODS)
    )


def _downstream_error(route: Route, error: requests.RequestException) -> DownstreamError:
    """The client's answer for a failed downstream request, named for what happened."""
    if isinstance(error, requests.ConnectTimeout):
        return DownstreamError(
            504, "downstream_timeout", f"timed out connecting to the downstream MCP server {route.name!r}"
        )
    if isinstance(error, requests.ReadTimeout):
        return DownstreamError(
            504, "downstream_timeout", f"the downstream MCP server {route.name!r} did not answer in time"
        )
    if isinstance(error, requests.ConnectionError):
        if isinstance(error.args[0] if error.args else None, urllib3.exceptions.ProtocolError):
            # Connected, sent, and the connection broke (reset or closed) before an answer came.
            log.warning("downstream %s closed the connection without answering: %r", route.name, error)
            return DownstreamError(
                502,
                "downstream_unavailable",
                f"the downstream MCP server {route.name!r} closed the connection without answering",
            )
        return DownstreamError(
            502, "downstream_unavailable", f"could not connect to the downstream MCP server {route.name!r}"
        )
    log.warning("request to downstream %s failed: %r", route.name, error)
    return DownstreamError(502, "downstream_error", f"the request to the downstream MCP server {route.name!r} failed")


def _prepare(method: str, url: str, headers: dict[str, str | bytes], body: Any) -> requests.PreparedRequest:
    """What `requests.Request(method, url, headers=headers, data=body).prepare()` makes, without the generic work it
    does on every call: the URL is prepared once per distinct URL, the cookie jar and auth have nothing to add (no
    jar; downstream URLs carry no credentials, routes.py refuses them), and the body's framing is known here."""
    prepared = requests.PreparedRequest()
    prepared.method = method.upper()
    prepared.url = _prepared_url(url)
    prepared.prepare_headers(headers)  # requests' header validation stays
    if isinstance(body, bytes | _SizedBody):
        prepared.headers["Content-Length"] = str(len(body))
    elif body is not None:
        prepared.headers["Transfer-Encoding"] = "chunked"  # a chunked upload, forwarded as it arrives
    elif prepared.method not in ("GET", "HEAD"):
        prepared.headers["Content-Length"] = "0"
    prepared.body = body
    prepared.hooks = {"response": []}
    return prepared


def _abort(raw: HTTPResponse) -> None:
    """Wake the reader by shutting the downstream socket, which also tells the downstream at once that nobody is
    listening any more."""
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@functools.cache
def _gevent_hub_running() -> bool:
    # Once per process: gevent's workers patch before they import the app, and nothing unpatches.
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

    One is alive per open stream: slots, and bound methods rather than closures, keep it small.
    """

    __slots__ = (
        "_downstream",
        "_gevent",
        "_guard",
        "_raw",
        "_sock",
        "_started",
        "_stop_callback",
        "_stopped",
        "_waiting_greenlet",
        "_watcher",
        "client_gone",
    )

    def __init__(self, environ: dict[str, Any]):
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        usable = (
            sock is not None
            and not isinstance(sock, ssl.SSLSocket)
            and str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1")
        )
        self._sock = sock if usable else None
        self._gevent = _gevent_hub_running()
        self._waiting_greenlet: Any = None  # the greenlet a disconnect interrupts until the downstream answers
        if self._gevent:
            from greenlet import getcurrent

            self._waiting_greenlet = getcurrent()
        self._guard = threading.Lock()
        self._started = self._stopped = self.client_gone = False
        self._downstream: HTTPResponse | None = None
        self._watcher: Any = None
        self._raw: _socket.socket | None = None
        self._stop_callback: Callable[[], None] | None = None

    def start(self) -> None:
        """Begin watching; called once the request body has been read to its end."""
        with self._guard:
            if self._started or self._stopped or self._sock is None:
                return
            self._started = True
        sock = self._sock
        raw = getattr(sock, "_sock", None)  # gevent's socket wraps a plain, non-blocking `_socket.socket`
        if self._gevent and isinstance(raw, _socket.socket):
            # A bare I/O watcher whose callback runs in gevent's hub, rather than a greenlet per request: spawning
            # one (gevent records each greenlet's spawning stack) and killing it cost ~0.13 ms of CPU per proxied
            # request, and a parked greenlet's saved stack is memory held by every open stream (docs/benchmarks.md).
            from gevent import get_hub

            self._raw = raw
            self._watcher = get_hub().loop.io(sock.fileno(), 1)  # 1: readable, in libev and libuv alike
            self._watcher.start(self._on_readable)
            return

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
            self._stop_callback = lambda: greenlet.kill(block=False)
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
        self._stop_callback = stopped.set

    def _on_readable(self) -> None:
        """In the hub, where nothing may wait: the plain socket, non-blocking. Readable with nothing to read is EOF."""
        self._watcher.stop()  # level-triggered: once is enough, whatever the answer
        try:
            gone = self._raw.recv(1, socket.MSG_PEEK) == b""  # type: ignore[union-attr]  # set with the watcher
        except BlockingIOError:
            gone = False
        except (OSError, ValueError):
            gone = True
        if gone:
            self._disconnected()

    def abort_client(self) -> bool:
        """End the client's connection at once, without the end of the response (a final chunk, the rest of a
        Content-Length); the WSGI server's last write then fails and it drops the connection."""
        if self._sock is None:
            return False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def waiting_in(self, greenlet: Any) -> None:
        """The downstream's answer is awaited in this greenlet now: a disconnect interrupts it instead."""
        self._waiting_greenlet = greenlet

    def attach(self, downstream: HTTPResponse) -> None:
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
            elif self._waiting_greenlet is not None:
                from gevent import get_hub

                # Raised at its wait, from the hub's next round; checked again then, for by that time the answer may
                # have come (attach) or the greenlet ended.
                get_hub().loop.run_callback(self._interrupt, self._waiting_greenlet)

    def _interrupt(self, greenlet: Any) -> None:
        with self._guard:
            if self._stopped or self._downstream is not None or greenlet.dead or greenlet is not self._waiting_greenlet:
                return
        greenlet.throw(ClientDisconnected)

    def stop(self) -> None:
        with self._guard:
            self._stopped = True
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = self._raw = None
        elif self._stop_callback is not None:
            self._stop_callback()
            self._stop_callback = None
