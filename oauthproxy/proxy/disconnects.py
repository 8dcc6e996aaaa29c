"""Noticing an MCP client that leaves mid-request (slow tool, idle SSE stream), and ending its downstream request."""

from __future__ import annotations

import _socket
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from urllib3.response import HTTPResponse

from oauthproxy.proxy.transport import gevent_hub_running


def abort_downstream(raw: HTTPResponse) -> None:
    """Wake the reader by shutting the downstream socket, which also tells the downstream at once that nobody is
    listening any more."""
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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
        self._gevent = gevent_hub_running()
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
            # one (gevent records each greenlet's spawning stack) and killing it was a large share of the CPU of a
            # proxied request, and a parked greenlet's saved stack is memory held by every open stream
            # (bench/analysis.md).
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
            abort_downstream(downstream)

    def _disconnected(self) -> None:
        with self._guard:  # never after stop(): the downstream connection may be back in the pool by then
            if self._stopped:
                return
            self.client_gone = True
            if self._downstream is not None:
                abort_downstream(self._downstream)
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
