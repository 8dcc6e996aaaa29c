"""Raw HTTP/1.1 answers read off a socket, for tests that speak to the server byte by byte."""

from __future__ import annotations


def content_length(answer: bytes, missing: int = 0) -> int:
    """The Content-Length of the head in `answer`; `missing` when it has none."""
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return missing
