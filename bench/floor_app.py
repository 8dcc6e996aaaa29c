"""The floor: the least a Flask + `requests` streaming passthrough on gunicorn/gevent can do, with no auth at all.

Whatever the real proxy costs beyond this app is our own overhead; what this app costs is the stack's. Run by
`bench/floor_gunicorn_conf.py` with `FLOOR_DOWNSTREAM_URL` (e.g. `http://127.0.0.1:9000/mcp`): `/mcp` and everything
under it go there. Bench-only: it forwards every header it is sent and checks nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import requests
from flask import Flask, Response, request

DOWNSTREAM_URL = os.environ.get("FLOOR_DOWNSTREAM_URL", "http://127.0.0.1:9/mcp")
#: WSGI servers refuse hop-by-hop headers from an application; requests recomputes the body framing.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

app = Flask(__name__)
# Imported in each worker after the fork (no preload), so each worker has its own pool. trust_env off: otherwise
# requests reads the proxy environment variables on every call, a cost of the defaults, not of the stack.
session = requests.Session()
session.trust_env = False


def _body(upstream: requests.Response) -> Iterator[bytes]:
    try:
        # Chunk by chunk as the downstream writes them (read_chunked under the hood for chunked responses).
        yield from upstream.raw.stream(65536, decode_content=False)
    finally:
        upstream.close()


@app.route("/mcp", methods=["GET", "POST", "DELETE"])
@app.route("/mcp/<path:rest>", methods=["GET", "POST", "DELETE"])
def passthrough(rest: str = "") -> Response:
    url = DOWNSTREAM_URL + (f"/{rest}" if rest else "")
    if request.query_string:
        url += "?" + request.query_string.decode("latin-1")
    headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
    upstream = session.request(
        request.method,
        url,
        headers=headers,
        data=request.get_data(),
        stream=True,
        allow_redirects=False,
        timeout=(5, 300),
    )
    response_headers = [
        (name, value)
        for name, value in upstream.raw.headers.items()
        if name.lower() not in HOP_BY_HOP or name.lower() == "content-length"
    ]
    return Response(_body(upstream), status=upstream.status_code, headers=response_headers, direct_passthrough=True)
