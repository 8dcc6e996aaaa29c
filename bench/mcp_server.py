"""The real MCP server the load benchmarks run behind the proxy: the `mcp` SDK's server with one `echo` tool.

`python -m bench.mcp_server PORT --app stateless|stateful --workers N` serves it on 127.0.0.1 from N uvicorn
processes, each with a listening socket of its own on the same port (SO_REUSEPORT), so that the kernel spreads
connections over them. With one shared socket, whichever process accepted first often took every connection: wrk's
20 connections gave 835-947 req/s with one process doing all the work and 1,664-1,794 with both (6 runs of 4 s), so
a ratio to "direct" depended on that draw (bench/analysis.md).

*stateless* answers each request on its own (no session: any process can take any request), as a server scaled over
several processes must; *stateful* hands out an `Mcp-Session-Id` at `initialize` (run it with one process: its
sessions live in that process's memory). Both answer `tools/call` and `initialize` with an event stream, as the SDK
does by default and as most real servers do.

Not `uvicorn --workers`: its shared socket is made without the TCP protocol number, so asyncio never sets
TCP_NODELAY on the connections it accepts, and every keep-alive answer waits ~40 ms for the client's delayed ACK
(measured: 44 ms p50 per request at 1 connection, against 1.2-1.8 ms in one process). Here the listening socket has
TCP_NODELAY, which Linux passes on to every accepted connection.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("bench-mcp-server")


@server.tool()
def echo(message: str) -> str:
    """Echo a message."""
    return message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--app", choices=("stateless", "stateful"), default="stateless")
    parser.add_argument("--workers", type=int, default=1)
    arguments = parser.parse_args()
    # All bound before any process starts, so that no connection arrives while only some of them listen.
    listeners = [
        socket.create_server(("127.0.0.1", arguments.port), backlog=2048, reuse_port=True)
        for _ in range(arguments.workers)
    ]
    for listener in listeners:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    children = []
    for own in listeners:
        pid = os.fork()
        if pid == 0:
            for other in listeners:
                if other is not own:
                    other.close()  # a socket nobody accepts on would still be given its share of connections
            app = server.streamable_http_app(stateless_http=arguments.app == "stateless", host="127.0.0.1")
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
            uvicorn.Server(config).run(sockets=[own])
            os._exit(0)
        children.append(pid)
    for listener in listeners:
        listener.close()  # each is its process's now

    def stop(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for child in children:
            os.waitpid(child, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY {arguments.port}", flush=True)
    for _ in children:
        os.wait()


if __name__ == "__main__":
    main()
