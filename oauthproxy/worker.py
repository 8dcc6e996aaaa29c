"""gunicorn's gevent worker with read deadlines and a cap on connections still waiting for a request (slow clients),
and a quick quit that never leaves a stray SystemExit behind."""

from __future__ import annotations

import socket
import sys
import time
from collections import OrderedDict
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from oauthproxy.config import load_server_settings
from oauthproxy.heap import trimmer

# Greenlets do not record who spawned them and from where (gevent's spawning tree, kept for debugging tools): one
# greenlet is spawned per client connection, and the record costs CPU at each spawn and memory for as long as a
# connection (an event stream) stays open (bench/analysis.md).
gevent.config.track_greenlet_tree = False

_SERVER = load_server_settings()  # gunicorn.conf.py has already reported any problem with these, and exited
# A request head (request line and headers) must arrive within this many seconds of a new connection or of its
# first byte on a kept-alive one; nginx's client_header_timeout plays the same part. Real clients send it at once.
REQUEST_HEAD_TIMEOUT = _SERVER.request_head_timeout
# A request body may pause at most this long between two reads (nginx's client_body_timeout). MCP bodies are
# JSON-RPC messages sent whole, and the authorization server's are small forms; none pauses for seconds.
REQUEST_BODY_TIMEOUT = _SERVER.request_body_timeout

_HEAD_TIMED_OUT_BODY = (
    b'{"error": "invalid_request", "error_description": "the request head did not arrive within '
    + str(REQUEST_HEAD_TIMEOUT).encode()
    + b' s"}'
)
_HEAD_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_HEAD_TIMED_OUT_BODY), _HEAD_TIMED_OUT_BODY)
)


class ClientConnection:
    """The client socket as gunicorn's parser and the application read it, with a deadline on every read.

    Between requests (and while a head comes in) a read waits at most until the head deadline, or for the next
    request on a kept-alive connection until `keepalive`; a read that runs out looks like the client closing (after a
    408 when part of a head had come), which gunicorn handles quietly. While a request is served, each read of its
    body waits at most REQUEST_BODY_TIMEOUT, and then the connection is closed as if the client had left mid-body.
    Everything else (writes, fileno, the raw `_sock` the proxy watches) is the socket's own.
    """

    __slots__ = ("_client", "_head_deadline", "_head_partial", "_keepalive", "_serving", "evicted")

    def __init__(self, client: socket.socket, keepalive: float) -> None:
        self._client = client
        self._keepalive = keepalive or REQUEST_HEAD_TIMEOUT
        # The first head must be complete this long after the connection came; later heads, after their first byte.
        self._head_deadline: float | None = time.monotonic() + REQUEST_HEAD_TIMEOUT
        self._head_partial = False  # some of the current head has come
        self._serving = False
        self.evicted = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def recv(self, size: int, *flags: int) -> bytes:
        if self._serving:
            data = self._timed_recv(size, flags, REQUEST_BODY_TIMEOUT)
            if data is None:
                # Treated as the client leaving mid-body (which the application handles already): it reads the end
                # of its input, and the connection is closed, so nothing more is read or answered on it.
                self.evict()
                return b""
            return data
        if self.evicted:
            return b""
        if self._head_deadline is None:  # idle between requests on a kept-alive connection
            data = self._timed_recv(size, flags, self._keepalive)
            if data:
                self._head_deadline = time.monotonic() + REQUEST_HEAD_TIMEOUT
                self._head_partial = True
            return data or b""
        remaining = self._head_deadline - time.monotonic()
        data = self._timed_recv(size, flags, remaining) if remaining > 0 else None
        if data is None:
            if self._head_partial:
                self._refuse_slow_head()
            return b""
        self._head_partial = True
        return data

    def _timed_recv(self, size: int, flags: tuple[int, ...], timeout: float) -> bytes | None:
        """What one read returns, or None when nothing came within `timeout` seconds."""
        self._client.settimeout(timeout)
        try:
            return self._client.recv(size, *flags)
        except TimeoutError:
            return None
        except OSError:
            if self.evicted:  # gevent wakes a read on a socket shut by another greenlet with EBADF
                return b""
            raise
        finally:
            self._client.settimeout(None)  # writes (event streams) keep blocking as gunicorn expects

    def _refuse_slow_head(self) -> None:
        self._client.settimeout(1)
        try:
            self._client.sendall(_HEAD_TIMED_OUT)
        except OSError:
            pass
        finally:
            self._client.settimeout(None)

    def serving(self) -> None:
        """The head has been parsed: from now on reads are of this request's body."""
        self._serving = True

    def waiting(self) -> None:
        """The response is done: the next read waits for another request on this kept-alive connection."""
        self._serving = False
        self._head_deadline = None
        self._head_partial = False

    def evict(self) -> None:
        """Shut this connection: a read waiting on it returns at once, as if the client had closed it."""
        self.evicted = True
        try:
            self._client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class BoundedGeventWorker(GeventWorker):
    """The gevent worker, with read deadlines per connection (`ClientConnection`) and at most
    `max_waiting` connections waiting for a request: when one more arrives, the one waiting longest is closed.

    Without the cap, connections that send half a request and stop fill the worker's `worker_connections` slots,
    and it stops accepting: /healthz and real clients get no answer until the slow ones time out.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_waiting = _SERVER.max_waiting_connections or max(1, self.worker_connections // 2)
        self.waiting: OrderedDict[ClientConnection, None] = OrderedDict()
        self.run_ended = False
        self.connections = 0  # client connections open (streams among them), for the heap trimmer

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.run_ended = True

    def handle_quit(self, sig: int, frame: Any) -> None:
        # SIGQUIT (and Ctrl-C, which the master turns into SIGQUIT): gunicorn's gevent worker raises SystemExit from
        # a greenlet 0.1 s later to end the run loop. When the loop has already ended by then (a loaded machine),
        # that greenlet runs during interpreter exit and gevent prints its SystemExit as a traceback per worker.
        gevent.spawn(self._quit)

    def _quit(self) -> None:
        self.alive = False
        self.cfg.worker_int(self)
        gevent.sleep(0.1)
        if not self.run_ended:
            sys.exit(0)

    def _wait(self, connection: ClientConnection) -> None:
        while len(self.waiting) >= self.max_waiting:
            oldest, _ = self.waiting.popitem(last=False)
            oldest.evict()
        self.waiting[connection] = None

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        connection = ClientConnection(client, self.cfg.keepalive)
        self._wait(connection)
        self.connections += 1
        trimmer.opened(self.connections)
        try:
            super().handle(listener, connection, addr)
        finally:
            self.waiting.pop(connection, None)
            self.connections -= 1
            trimmer.closed(self.connections)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        self.waiting.pop(sock, None)
        sock.serving()
        try:
            super().handle_request(listener_name, req, sock, addr)
        finally:
            if not sock.evicted:
                sock.waiting()
                self._wait(sock)
        # Give way once per answered request, before reading the next one from this connection. A request the proxy
        # answers itself (a 401, a denied tool call) never waits on I/O, and a client that sends its next request as
        # soon as it has the answer always has one ready: its greenlet would serve it request after request while
        # the worker's other connections starve. Measured: 20 connections of 401s kept a forwarded request from
        # another client waiting 0.2-3.2 s (bench/analysis.md).
        gevent.sleep(0)
