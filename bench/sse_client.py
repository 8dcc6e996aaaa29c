"""An asyncio event-stream client light enough to hold thousands of streams from one process.

Raw sockets and a small chunked-transfer decoder rather than an HTTP library: the load generator must not be the
bottleneck at 5,000 streams, and each event's arrival is stamped the moment its bytes are read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class StreamFailed(Exception):
    pass


@dataclass
class EventStream:
    """One open `GET` event stream: its status, and each event's text with the time it arrived."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)
    ended: bool = False  # the stream ended (terminating chunk) or the connection closed
    _buffer: bytes = b""

    async def _read_chunk(self) -> bytes | None:
        line = await self.reader.readline()
        if not line:
            return None
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            await self.reader.readline()
            return None
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def next_events(self) -> list[tuple[float, str]]:
        """Read one chunk and return the events it completed (empty at the end of the stream)."""
        try:
            chunk = await self._read_chunk()
        except (asyncio.IncompleteReadError, ConnectionError):
            chunk = None
        arrived = time.time()
        if chunk is None:
            self.ended = True
            return []
        self._buffer += chunk
        completed = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            completed.append((arrived, event.decode()))
        self.events.extend(completed)
        return completed

    def close(self) -> None:
        self.writer.close()


async def open_stream(url: str, headers: dict[str, str], timeout: float = 30.0) -> EventStream:
    """Send `GET url` and read the response head; raises StreamFailed unless it is a 200 event stream."""
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), timeout)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Accept: text/event-stream",
        *(f"{name}: {value}" for name, value in headers.items()),
        "",
        "",
    ]
    writer.write("\r\n".join(lines).encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    stream = EventStream(reader, writer)
    stream.status = int(head.split(b" ", 2)[1])
    if stream.status != 200 or b"chunked" not in head.lower():
        writer.close()
        raise StreamFailed(f"GET {url} answered {head[:200]!r}")
    return stream


@dataclass
class HoldResult:
    requested: int
    opened: int  # answered 200 with their first bytes
    open_after_hold: int  # no end of stream seen while idle
    downstream_open: int  # the downstream's own count of connected idle streams
    released_ok: int  # received the downstream's final event after the hold
    open_seconds: float  # time to open them all
    samples: dict[str, float] = field(default_factory=dict)


async def hold_idle_streams(
    url: str,
    headers: dict[str, str],
    count: int,
    hold_seconds: float,
    control_url: str,
    on_open: Callable[[], dict[str, float]],
    open_concurrency: int = 200,
) -> HoldResult:
    """Open `count` idle streams, keep them `hold_seconds`, call `on_open` (memory sample) while all are open, then
    have the downstream end them and count those that got their last event: all of it bounded in time."""
    started = time.monotonic()

    async def make(_index: int) -> EventStream:
        stream = await open_stream(url, headers)
        first = await asyncio.wait_for(stream.next_events(), 30)  # the proxy's (or downstream's) opening comment
        if not first:
            raise StreamFailed("stream ended before its first bytes")
        return stream

    results = await _gather_safe(count, open_concurrency, make)
    streams = [stream for stream in results if stream is not None]
    open_seconds = time.monotonic() - started

    async def watch(stream: EventStream) -> None:
        while not stream.ended:
            if any("data: bye" in text for _, text in await stream.next_events()):
                return

    watchers = [asyncio.ensure_future(watch(stream)) for stream in streams]
    await asyncio.sleep(hold_seconds)
    open_after_hold = sum(not stream.ended for stream in streams)
    samples = on_open()
    downstream_open = (await _control(control_url + "/control/stats"))["idle_open"]
    await _control(control_url + "/control/release")
    _, pending = await asyncio.wait(watchers, timeout=60) if watchers else (set(), set())
    for task in pending:
        task.cancel()
    released_ok = sum(any("data: bye" in text for _, text in stream.events) for stream in streams)
    for stream in streams:
        stream.close()
    await asyncio.sleep(0.5)  # let the closes reach the servers before the next measurement
    return HoldResult(count, len(streams), open_after_hold, downstream_open, released_ok, open_seconds, samples)


def _safe(make: Callable[[int], Awaitable[EventStream]]) -> Callable[[int], Awaitable[EventStream | None]]:
    async def safe(index: int) -> EventStream | None:
        try:
            return await make(index)
        except (StreamFailed, OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            return None

    return safe


async def _gather_safe(
    count: int, limit: int, make: Callable[[int], Awaitable[EventStream]]
) -> list[EventStream | None]:
    semaphore = asyncio.Semaphore(limit)
    safe = _safe(make)

    async def one(index: int) -> EventStream | None:
        async with semaphore:
            return await safe(index)

    return list(await asyncio.gather(*(one(index) for index in range(count))))


async def _control(url: str) -> dict:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    method = "POST" if parts.path.endswith("/release") else "GET"
    writer.write(f"{method} {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: 0\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    length = int(
        next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    body = await reader.readexactly(length)
    writer.close()
    return json.loads(body)


async def event_delays(
    url: str, headers: dict[str, str], streams: int, interval: float, count: int
) -> tuple[list[tuple[int, float]], int]:
    """Open `streams` ticking streams at once; return each event's number in its stream and its delay (arrival minus
    the time the downstream wrote it, in seconds), and how many events were expected."""

    async def one(index: int) -> list[tuple[int, float]]:
        await asyncio.sleep(interval * index / streams)  # spread the ticks over the interval
        stream = await open_stream(f"{url}?interval={interval}&count={count}", headers)
        delays = []
        try:
            while not stream.ended:
                for arrived, text in await asyncio.wait_for(stream.next_events(), interval * 20 + 5):
                    if text.startswith("data: "):
                        event = json.loads(text[6:])
                        delays.append((event["n"], arrived - event["t"]))
        finally:
            stream.close()
        return delays

    per_stream = await asyncio.gather(*(one(index) for index in range(streams)))
    return [delay for delays in per_stream for delay in delays], streams * count
