"""A downstream that answers every request with an event stream, on plain asyncio (one process, thousands of sockets).

Run: `python -m bench.sse_server PORT`; prints `READY <port>` when listening on 127.0.0.1.

- `.../tick?interval=S&count=N`: N events, one every S seconds, each carrying the wall-clock time it was written
  (`data: {"n": i, "t": 1700000000.123456}`), so a client on the same machine can tell how late each one arrived.
- `.../idle`: a comment at once (so headers and first bytes leave every proxy in between), then nothing until
  `POST /control/release`, which sends every idle stream one `data: bye` event and ends it.
- `GET /control/stats`: `{"idle_open": n}`, the idle streams whose client is still connected.

Plain asyncio rather than a WSGI stack: the downstream must cost next to nothing, so the proxy is what is measured.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import parse_qs, urlsplit

#: Idle streams waiting for a release, each with the event that ends its wait.
IDLE: set[asyncio.Event] = set()
EVENT_STREAM_HEADERS = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """(method, target) of the next request, its body read and dropped; None when the client has gone."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip() or 0)
    if length:
        await reader.readexactly(length)
    return method, target


async def _answer_json(writer: asyncio.StreamWriter, document: object) -> None:
    body = json.dumps(document).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    await writer.drain()


async def _tick(writer: asyncio.StreamWriter, interval: float, count: int) -> None:
    writer.write(EVENT_STREAM_HEADERS + _chunk(b": ticking\n\n"))
    await writer.drain()
    for number in range(count):
        await asyncio.sleep(interval)
        writer.write(_chunk(f'data: {{"n": {number}, "t": {time.time():.6f}}}\n\n'.encode()))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Hold the stream until released (True: ended cleanly, keep the connection) or until the client leaves."""
    released = asyncio.Event()
    writer.write(EVENT_STREAM_HEADERS + _chunk(b": idle\n\n"))
    await writer.drain()
    IDLE.add(released)
    client_left = asyncio.ensure_future(reader.read(1))  # a request never has more to send: b"" means gone
    release = asyncio.ensure_future(released.wait())
    try:
        await asyncio.wait({client_left, release}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        IDLE.discard(released)
    if client_left.done():
        release.cancel()
        return False
    client_left.cancel()
    writer.write(_chunk(b"data: bye\n\n") + b"0\r\n\r\n")
    await writer.drain()
    return True


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (request := await _read_request(reader)) is not None:
            _, target = request
            parts = urlsplit(target)
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            if parts.path == "/control/stats":
                await _answer_json(writer, {"idle_open": len(IDLE)})
            elif parts.path == "/control/release":
                released = len(IDLE)
                for event in list(IDLE):
                    event.set()
                await _answer_json(writer, {"released": released})
            elif parts.path.endswith("/tick"):
                await _tick(writer, float(query.get("interval", "0.05")), int(query.get("count", "100")))
            elif parts.path.endswith("/idle"):
                if not await _idle(reader, writer):
                    break
            else:
                await _answer_json(writer, {"jsonrpc": "2.0", "id": 1, "result": {}})
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    print(f"READY {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
