"""The request that leaves for the downstream: the client's body (whole, streamed or refused) and its framing."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import IO, Any

import requests

from oauthproxy.proxy.transport import CHUNK_SIZE, SMALL_BODY, DownstreamError

log = logging.getLogger(__name__)


def body_too_large(limit: int) -> DownstreamError:
    return DownstreamError(
        413,
        "request_too_large",
        f"the request body is larger than {limit} bytes, this server's limit (MCP_MAX_BODY_BYTES)",
    )


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


def request_body(environ: dict[str, Any], stream: IO[bytes], limit: int, on_end: Callable[[], None]) -> Any:
    """What goes downstream as the body: bytes (small), a sized or chunked stream, or None; 413 past `limit`.
    `on_end` is called once a streamed body has been read to its end."""
    length = environ.get("CONTENT_LENGTH", "")
    if length.isdigit():
        size = int(length)
        if size > limit:
            raise body_too_large(limit)  # before a byte goes downstream
        if size <= SMALL_BODY:
            # Also spares requests' check whether a body is a readable stream, a runtime Protocol check
            # that is slow for what it does (bench/analysis.md).
            return _read_whole(stream, size) if size else None
        return _SizedBody(stream, size, on_end)
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return _chunks(stream, limit, on_end)
    return None


def whole_body(environ: dict[str, Any], stream: IO[bytes], limit: int, too_large: DownstreamError) -> bytes:
    """The client's whole body, read before anything is forwarded (a route with tool rules must see the JSON-RPC
    message first); `too_large` past `limit`, from Content-Length before a byte is read, or as a chunked body
    grows. Forwarded afterwards as bytes, with a Content-Length."""
    length = environ.get("CONTENT_LENGTH", "")
    if length.isdigit():
        if int(length) > limit:
            raise too_large
        return _read_whole(stream, int(length))
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    parts, received = [], 0
    while data := _read_chunked(stream, 0, 2**62):  # the limit is checked here, with the caller's answer
        received += len(data)
        if received > limit:
            raise too_large
        parts.append(data)
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _prepared_url(url: str) -> str:
    """requests' normalisation of a URL (IDNA host, percent-encoding), once per distinct URL: work that an MCP
    client, posting to the same URL over and over, would otherwise pay on every request (bench/analysis.md)."""
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    return prepared.url  # type: ignore[return-value]  # set by prepare_url


def prepare_request(method: str, url: str, headers: dict[str, str | bytes], body: Any) -> requests.PreparedRequest:
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
