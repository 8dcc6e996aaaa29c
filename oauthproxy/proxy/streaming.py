"""The streaming passthrough to a downstream MCP server: body in as it comes, response out chunk by chunk."""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterator
from typing import IO, Any

import requests
import urllib3
from urllib3.response import HTTPResponse
from werkzeug.wrappers import Response

from oauthproxy import audit
from oauthproxy.downstream_credentials import Caller
from oauthproxy.proxy.disconnects import ClientDisconnected, ClientWatch, abort_downstream
from oauthproxy.proxy.forwarding import HeaderRules, PathRefused, downstream_url
from oauthproxy.proxy.request_body import prepare_request, request_body
from oauthproxy.proxy.tool_gate import (
    POLICY_BODY_LIMIT,
    RESPONSE_LIMIT,
    FilteredEvents,
    Refusal,
    ToolGate,
    inspect_request,
)
from oauthproxy.proxy.transport import CHUNK_SIZE, DownstreamError, DownstreamTransport, gevent_hub_running
from oauthproxy.routes import ProxySettings, Route

log = logging.getLogger(__name__)

#: Sent as the first bytes of an event stream so the status line and headers leave the WSGI server at once
#: (gunicorn sends them only with the first body chunk); SSE parsers ignore comment lines.
SSE_OPENING_COMMENT = b": stream open\n\n"


class ProxiedResponse(Response):
    """The client's response to a forwarded request, with the downstream's `Mcp-Session-Id` (if any) at hand."""

    mcp_session_id: str | None = None


class DownstreamProxy:
    """Forwards requests to downstream MCP servers and streams their answers back (transport.py holds the pool)."""

    def __init__(
        self, settings: ProxySettings, public_url: str, proxy_cookie_names: frozenset[str], ca_bundle: str | None = None
    ):
        self.settings = settings
        self.transport = DownstreamTransport(settings, ca_bundle)
        self.header_rules = HeaderRules(public_url, proxy_cookie_names)

    def downstream_url(self, route: Route, environ: dict[str, Any]) -> str:
        """forwarding.downstream_url, with the client's 400 for a path outside the route."""
        try:
            return downstream_url(route, environ)
        except PathRefused as refused:
            raise DownstreamError(400, "invalid_request", str(refused)) from None

    def forward(self, route: Route, environ: dict[str, Any], stream: IO[bytes], caller: Caller) -> ProxiedResponse:
        """Send the request downstream and return a response whose body streams the downstream's as it arrives."""
        url = self.downstream_url(route, environ)
        gate = None
        if route.tool_policy is not None:  # routes without tool rules pay this test, and nothing else
            inspected = inspect_request(
                route, environ, stream, caller, min(POLICY_BODY_LIMIT, self.settings.max_body_bytes)
            )
            if isinstance(inspected, Refusal):
                return _refusal(inspected)
            gate = inspected
        watch = ClientWatch(environ)
        if gate is not None and gate.body is not None:
            body: Any = gate.body
        else:
            body = request_body(environ, stream, self.settings.max_body_bytes, watch.start)
        audit.note_tool_calls(environ, route.name, body)  # the tool names it calls, recorded when the answer ends
        headers = self.header_rules.request_headers(route, environ, caller)
        if gate is not None and gate.filters_answer:
            headers["Accept-Encoding"] = "identity"  # a compressed tools/list answer could not be filtered
        prepared = prepare_request(environ["REQUEST_METHOD"], url, headers, body)
        if body is None or isinstance(body, bytes):
            watch.start()  # the whole body has been read
        try:
            if prepared.method == "GET" and gevent_hub_running():
                downstream = self._send_apart(route, prepared, watch)
            else:
                downstream = self.transport.send(route, prepared)
        except ClientDisconnected:
            watch.stop()
            # urllib3 closed the downstream connection on the way out, so the downstream sees the cancellation.
            log.info("client left before downstream %s answered; request closed", route.name)
            return ProxiedResponse(status=499)  # nginx's "client closed request"; nobody is there to read it
        except BaseException:
            watch.stop()
            raise
        try:
            watch.attach(downstream)
            # The WSGI server keeps environ for as long as the response streams, and werkzeug parked the whole
            # Request object in it; the request context has its own reference, for as long as it needs one.
            environ.pop("werkzeug.request", None)
            response = self._response(route, environ, downstream, watch)
            if gate is not None and gate.filters_answer:
                _filter_tools_list(route, gate, response)
            return response
        except BaseException:
            watch.stop()
            downstream.close()  # unread: the connection is closed, not reused
            downstream.release_conn()
            raise

    def _send_apart(self, route: Route, prepared: requests.PreparedRequest, watch: ClientWatch) -> HTTPResponse:
        """`DownstreamTransport.send` on a greenlet of its own, for GET: MCP's listening streams, held open for minutes
        or hours.

        Waiting for the downstream's headers runs deepest into requests, urllib3 and http.client. Every greenlet keeps
        the memory its deepest moment touched (its Python 3.11 frame stack, its C stack), and the request's greenlet
        goes on to hold the stream: on a greenlet that ends with the exchange, an idle stream holds less. A fresh
        frame stack costs CPU, hence not for POST, whose answers end with their call (bench/analysis.md).
        """
        from greenlet import getcurrent, greenlet

        current = getcurrent()
        apart = greenlet(lambda: self.transport.send(route, prepared), parent=current)
        apart.gr_context = current.gr_context  # the request's context variables (Flask's request, for log lines)
        watch.waiting_in(apart)  # a client that leaves now interrupts the greenlet that waits
        try:
            return apart.switch()  # its result, or its exception, comes back here when it ends
        finally:
            watch.waiting_in(current)

    def _response(
        self, route: Route, environ: dict[str, Any], downstream: HTTPResponse, watch: ClientWatch
    ) -> ProxiedResponse:
        content_type = downstream.headers.get("Content-Type", "")
        is_event_stream = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
        # A comment cannot be spliced into a compressed body; such a stream starts with its own first bytes.
        opening = SSE_OPENING_COMMENT if is_event_stream and not downstream.headers.get("Content-Encoding") else b""
        if is_event_stream:
            self.transport.set_stream_idle_timeout(downstream)
        headers, session_id = self.header_rules.response_headers(route, downstream, bool(opening))
        body = DownstreamBody(
            route, downstream, opening, watch, listening=is_event_stream and environ.get("REQUEST_METHOD") == "GET"
        )
        response = ProxiedResponse(body, status=downstream.status, headers=headers, direct_passthrough=True)
        # Noted while the headers were copied, not looked up afterwards in Werkzeug's (or requests') headers: a lookup
        # costs CPU on every request (bench/analysis.md).
        response.mcp_session_id = session_id
        if not content_type:
            del response.headers["Content-Type"]  # werkzeug adds text/html by default
        return response


def _refusal(refusal: Refusal) -> ProxiedResponse:
    response = ProxiedResponse(
        json.dumps(refusal.document, ensure_ascii=False), status=refusal.status, content_type="application/json"
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def _filter_tools_list(route: Route, gate: ToolGate, response: ProxiedResponse) -> None:
    """Remove the tools the caller may not use from the answer to a `tools/list`: a JSON body is read whole and
    replaced; an event stream is filtered event by event as it streams."""
    body = response.response
    assert isinstance(body, DownstreamBody)
    mimetype = response.mimetype
    if mimetype not in ("application/json", "text/event-stream"):
        return
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise DownstreamError(
            502,
            "downstream_unavailable",
            f"the downstream MCP server {route.name} compressed its answer although asked not to; the proxy reads "
            "it to apply the route's tool rules",
        )
    tools_filter = gate.tools_list_filter()
    if mimetype == "text/event-stream":
        response.response = FilteredEvents(body, tools_filter, body.watch.abort_client)
        response.headers.pop("Content-Length", None)
        return
    data = body.read_whole(RESPONSE_LIMIT)
    response.set_data(tools_filter.json_body(data) or data)


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
            # A listening stream waits for its next event here, at the shallowest point (transport's wait_readable).
            parsed = getattr(raw, "_original_response", None)
            wait_readable = getattr(parsed, "wait_readable", None) if self.listening and gevent_hub_running() else None
            # What has arrived, as soon as it has (for a chunked body, at most the rest of the current chunk): one
            # SSE event reaches the client as soon as the downstream sends it. Not urllib3's read_chunked(): one
            # generator less between the WSGI server and the socket is a smaller stack for an idle stream to keep.
            while True:
                if wait_readable is not None:
                    wait_readable()
                chunk = raw.read1(CHUNK_SIZE, decode_content=False)
                if not chunk:
                    break
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

    def read_whole(self, limit: int) -> bytes:
        """The whole body, for an answer the proxy must read before passing it on (a JSON tools/list answer on a
        route with tool rules); 502 when it is larger than `limit` or the downstream breaks off."""
        parts, size = [], 0
        try:
            while chunk := self.raw.read1(CHUNK_SIZE, decode_content=False):
                size += len(chunk)
                if size > limit:
                    raise DownstreamError(
                        502,
                        "downstream_unavailable",
                        f"the downstream MCP server {self.route.name} answered with more than {limit} bytes, more "
                        "than the proxy reads to apply the route's tool rules",
                    )
                parts.append(chunk)
            self._completed = True
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            log.warning("downstream %s broke off its answer to %s: %r", self.route.name, self.route.path, error)
            raise DownstreamError(
                502, "downstream_unavailable", f"the downstream MCP server {self.route.name} broke off its answer"
            ) from None
        finally:
            self.close()
        return b"".join(parts)

    def end_for_shutdown(self) -> None:
        self._shutting_down = True
        abort_downstream(self.raw)  # wakes the read above

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
